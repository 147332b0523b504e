"""`minichat replay` end to end: check the database, take the input log's range, read the recorded
decisions and store the recorded alerts (each to an end taken after the range's), then apply the
range and count what each record did."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TextIO

import asyncpg
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from minichat.kafka_security import kafka_client_options
from minichat.models.policy import Policy, load_policy
from minichat.models.topics import TopicNames
from minichat.processors.app import build_batches
from minichat.processors.turn_requests import TurnRequests
from minichat.settings import Settings
from minichat.storage.db import connect
from minichat.storage.metrics import state_gauges
from minichat.storage.rebuild import turn_fingerprint_sql
from minichat.storage.recorded import create_recorded
from minichat.storage.schema import pending_migrations
from minichat.tools.kafka import partitions_of
from minichat.tools.progress import Progress
from minichat.tools.rebuild.afresh import Afresh, Seen, SelectiveTurnRequests, selective
from minichat.tools.rebuild.apply import Ranges, Rebuild, merge_and_apply
from minichat.tools.rebuild.counting import CommandOutcomes, RebuildSummary, TurnEventOutcomes
from minichat.tools.rebuild.recorded_order import RecordedOrder, read_order, recorded_count
from minichat.tools.rebuild.sources import (
    RebuildSetupError,
    group_free_consumer,
    input_partitions,
    offset_ranges,
    read_recorded_alerts,
    read_recorded_decisions,
    workers_behind,
)
from minichat.tools.rebuild.versions import check_recorded_versions, load_versions

logger = logging.getLogger("minichat.replay")  # the command's name, as before the move

PROGRESS_EVERY_S = 5.0
"""Off a terminal (logs, CI), a progress line this often."""


async def run_rebuild(
    settings: Settings,
    *,
    from_time: datetime | None = None,
    progress: TextIO | None = None,
    show_progress: bool = True,
    check_workers: bool = True,
    between_reads: Callable[[], Awaitable[None]] | None = None,
    follow_order_log: bool = True,
    follow_recorded_alerts: bool = True,
    afresh: Afresh | None = None,
    inspect: Callable[[asyncpg.Connection, Seen], Awaitable[None]] | None = None,
    label: str = "replay",
) -> RebuildSummary:
    """Rebuild the state from the input topics into `settings.database_url` (`minichat rebuild`;
    see the package docstring). `between_reads` runs after the inputs' end offsets are taken and
    before `turn-decisions`' are (tests: what is decided in between must change nothing). Without
    `follow_order_log` every record is applied in the timestamp merge (tests: what the log changes).
    `policy diff`: `afresh`, commands decided under the policy file although recorded, by event
    time; no `follow_recorded_alerts`, every alert derived; `inspect` runs on the rebuild's
    connection (recorded decisions still there) at the end. Raises `RebuildSetupError` (schema or
    topics missing), `PolicyError`, `PolicyConflict`."""
    names = TopicNames(settings.topic_prefix)
    topics = [names.turn_requests, names.provider_responses, names.usage]
    policy = load_policy(settings.policy_file)
    summary = RebuildSummary(read_by_topic=dict.fromkeys(topics, 0))
    started = time.monotonic()

    def bar_for(total: int) -> Progress | None:
        return _bar(total, progress, label) if show_progress else None

    # One connection for everything: the recorded decisions live in a temporary table.
    con = await connect(settings)
    try:
        await _prepare(con)
        versions = await load_versions(con, settings, policy)
        summary.parked_at_start = (await state_gauges(con)).parked_events
        rebuild = await _wire(con, settings, policy, versions, names, summary, afresh)
        admin = AIOKafkaAdminClient(**kafka_client_options(settings), client_id="minichat-replay-admin")
        await admin.start()
        try:
            partitions = await input_partitions(admin, topics)
            async with group_free_consumer(settings, "inputs") as consumer:
                # The inputs' end offsets first, the recorded facts' after: a command of the range
                # a worker had decided is then in the recorded table (and its alerts stored).
                ranges = await offset_ranges(consumer, partitions, from_time)
                await _warn_if_behind(admin, settings, ranges, check_workers)
                if between_reads is not None:
                    await between_reads()
                alerts_into = summary if follow_recorded_alerts else None
                await _read_recorded(con, admin, settings, names, versions, alerts_into)
                order = await read_order(settings, names, ranges) if follow_order_log else None
                await _apply_log(consumer, settings, rebuild, ranges, from_time, bar_for, order)
        finally:
            await admin.close()
        await _finish(con, rebuild, names, inspect)
    finally:
        await con.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


def _bar(total: int, stream: TextIO | None, label: str) -> Progress:
    return Progress(total, stream, label, unit="events", every_s=PROGRESS_EVERY_S)


async def _finish(
    con: asyncpg.Connection,
    rebuild: Rebuild,
    names: TopicNames,
    inspect: Callable[[asyncpg.Connection, Seen], Awaitable[None]] | None,
) -> None:
    """The summary's last counts and warning; then `inspect`, with what the rebuild saw."""
    rebuild.summary.parked_at_end = (await state_gauges(con)).parked_events
    _warn_if_decided(rebuild.summary, names)
    if inspect is not None:
        chosen = rebuild.commands.inner
        users = chosen.users if isinstance(chosen, SelectiveTurnRequests) else {}
        await inspect(con, Seen(rebuild.commands.tenants, users))


async def _prepare(con: asyncpg.Connection) -> None:
    """The schema must be current (the policy versions are stored next, `versions.py`)."""
    pending = await pending_migrations(con)
    if pending:
        raise RebuildSetupError(
            f"the database schema is missing or old ({len(pending)} migration(s) pending): "
            "run `minichat db migrate`"
        )
    await create_recorded(con)


async def _wire(
    con: asyncpg.Connection,
    settings: Settings,
    policy: Policy,
    versions: Mapping[int, Policy],
    names: TopicNames,
    summary: RebuildSummary,
    afresh: Afresh | None = None,
) -> Rebuild:
    """The worker's handlers (following the recorded decisions, each under its own policy
    version, but those `afresh` selects), each wrapped to count."""
    batches = build_batches(settings, policy, follow_recorded=True, versions=versions)
    if afresh is not None:
        assert isinstance(batches.turn_requests, TurnRequests)
        batches = dataclasses.replace(batches, turn_requests=selective(batches.turn_requests, afresh))
    commands = CommandOutcomes(batches.turn_requests)
    turn_events = TurnEventOutcomes(batches.turn_events, await turn_fingerprint_sql(con))
    # each step writes its turns: the counting wrappers compare the rows before and after a step
    wired = dataclasses.replace(batches, turn_requests=commands, turn_events=turn_events, hold_turns=False)
    return Rebuild(con, wired, commands, turn_events, names, summary)


async def _read_recorded(
    con: asyncpg.Connection,
    admin: Any,
    settings: Settings,
    names: TopicNames,
    versions: dict[int, Policy],
    alerts_into: RebuildSummary | None,
) -> None:
    """`turn-decisions` up to its end offsets taken now (after the inputs'), into the temporary
    table (every policy version they name must be known); then, with `alerts_into`, the recorded
    alerts. One consumer per pass: aiokafka's fetcher dies when a consumer's assignment is emptied
    and replaced (the rebuild then hung when turn-decisions was empty)."""
    decision_partitions = await input_partitions(admin, [names.turn_decisions])
    async with group_free_consumer(settings, "decisions") as decisions:
        recorded, named = await read_recorded_decisions(con, decisions, decision_partitions)
    logger.info("read %d recorded decisions of %s", recorded, names.turn_decisions)
    check_recorded_versions(named, versions)
    if alerts_into is not None:
        await _store_recorded_alerts(con, admin, settings, names, alerts_into)


async def _store_recorded_alerts(
    con: asyncpg.Connection, admin: Any, settings: Settings, names: TopicNames, summary: RebuildSummary
) -> None:
    """`quota-alerts` up to its end offsets taken now (after the inputs'), each alert stored as
    recorded before the log is applied: which settlement crossed a threshold depends on the order
    a user's settlements on different partitions were applied, which the rebuild does not know.
    Every recorded alert, whatever `--from-time` (an alert already announced stays announced). A
    missing or empty topic: every alert is derived."""
    alert_partitions = (await partitions_of(admin, [names.quota_alerts])).get(names.quota_alerts, [])
    async with group_free_consumer(settings, "alerts") as consumer:
        counts = await read_recorded_alerts(con, consumer, alert_partitions)
    summary.alerts_recorded, summary.alerts_ignored = counts.stored, counts.ignored
    logger.info(
        "read %d recorded alerts of %s, %d of them new to this database",
        counts.read, names.quota_alerts, counts.stored,
    )  # fmt: skip
    if counts.ignored:
        logger.warning(
            "%d record(s) of %s are not valid quota.threshold_crossed records; ignored",
            counts.ignored, names.quota_alerts,
        )  # fmt: skip


def _warn_if_decided(summary: RebuildSummary, names: TopicNames) -> None:
    if summary.decided_afresh:
        logger.warning(
            "%d command(s) had no recorded decision in %s and were decided by this rebuild "
            "under the current policy (their workers had not decided them when it started)",
            summary.decided_afresh,
            names.turn_decisions,
        )


async def _warn_if_behind(admin: Any, settings: Settings, ranges: Ranges, check_workers: bool) -> None:
    """Records of the range the workers have not committed yet have no decision to follow."""
    behind = await workers_behind(admin, settings.group_id, ranges) if check_workers else 0
    if behind:
        logger.warning(
            "the workers (group %s) have not committed %d record(s) of this range yet; if "
            "they run on this database, let them catch up first: a record the replay "
            "decides first is answered by them with replay: true",
            settings.group_id,
            behind,
        )


async def _apply_log(
    consumer: AIOKafkaConsumer,
    settings: Settings,
    rebuild: Rebuild,
    ranges: Ranges,
    from_time: datetime | None,
    bar_for: Callable[[int], Progress | None],
    order: RecordedOrder | None,
) -> None:
    """The input partitions' range, in the recorded order then merged, and applied (`apply.py`)."""
    rebuild.batches.placement.learn(ranges)  # every input partition: `wrong_partition` as live
    total = sum(max(0, end - start) for start, end in ranges.values())
    logger.info(
        "replaying %d records of %s %s", total, ", ".join(dict.fromkeys(tp.topic for tp in ranges)),
        f"from {from_time.isoformat()}" if from_time else "from the beginning",
    )  # fmt: skip
    rebuild.summary.in_recorded_order = recorded_count(order, ranges)
    bar = bar_for(total)
    await merge_and_apply(consumer, ranges, rebuild, settings, bar, order)
    if bar is not None:
        bar.finish()
