"""What a deployment holds after traffic, and whether its money invariants hold.

`summarize(settings)` reads the database and the `billing-usage` and `dead-letters` topics once and
returns a `Summary`; `render(summary)` prints it as plain aligned tables. `wait_quiescent` polls
until the processor has nothing left to do (every accepted turn settled, no reserve held, every
outbox row published, nothing parked, no input record left unconsumed) or a deadline passes.

Money is integer micro-credits throughout; credits are shown by integer division, never floats.
Nothing here reads or prints message content.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Final
from uuid import UUID

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from minichat.models.events import dedupe_key
from minichat.models.topics import INPUT_TOPICS, TopicNames
from minichat.settings import Settings
from minichat.storage.summary import backlog_counts, summary_rows

MICRO_PER_CREDIT = 1_000_000


def format_credits(micro: int) -> str:
    """`1234567` -> `"1.234567"`: integer division only, six decimals."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Plain-text table: columns padded to their widest cell, integers right-aligned."""
    body = [list(row) for row in rows]
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in body]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(body) and all(isinstance(row[i], int) for row in body) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    out = [line(cells[0]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells[1:])
    if not body:
        out.append("(none)")
    return "\n".join(out)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class TenantCredits:
    tenant_id: UUID
    settled_turns: int
    charged_micro: int
    """Sum of `committed_credits_micro` of the tenant's settled turns (the database's view)."""
    billed_micro: int
    """Sum over the tenant's turns on `billing-usage` of the latest charge (adjusted, else settled)."""


@dataclass(frozen=True)
class Summary:
    """One look at a deployment (or at some of its tenants); `failures` names broken invariants."""

    turns_by_state: dict[tuple[str, str], int]
    """(state, billing_outcome or "-" while unsettled) -> turns."""
    decisions: dict[tuple[str, str, str], int]
    """(command, decision, error_code or "-") -> stored decisions (one per decided command)."""
    credits: tuple[TenantCredits, ...]
    accepted_turns: int
    """Stored decisions that accepted a turn (allow or downgrade)."""
    stored_turns: int
    settled_turns: int
    adjusted_turns: int
    reserved_credits_micro: int
    """Sum of `reserved_credits_micro` over the quota rows: 0 once every turn settled."""
    billing_records: int
    """Records on `billing-usage` before de-duplication (the relay may repeat one)."""
    settled_events: int
    """Distinct `dedupe_key`s of `usage.settled`."""
    adjusted_events: int
    """Distinct `dedupe_key`s of `usage.adjusted`."""
    missing_billing: int
    """Settled turns without a `usage.settled` event."""
    unexpected_billing: int
    """Distinct `usage.settled` keys that match no settled turn."""
    missing_adjustments: int
    """Adjusted turns without a `usage.adjusted` event."""
    unpublished_outbox: int
    dead_letters: int
    parked_events: int
    quota_mismatches: tuple[str, ...]
    """`total` rows whose `spent` differs from the charges of the turns settled on them."""
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def charged_micro(self) -> int:
        return sum(c.charged_micro for c in self.credits)


def check_invariants(s: Summary) -> tuple[str, ...]:
    """The failed invariants of a summary, each as one line (empty when all hold)."""
    failures: list[str] = []
    unsettled = s.stored_turns - s.settled_turns
    if unsettled:
        failures.append(f"{unsettled} accepted turn(s) not settled")
    if s.accepted_turns != s.stored_turns:
        failures.append(f"accepted decisions ({s.accepted_turns}) != stored turns ({s.stored_turns})")
    if s.reserved_credits_micro:
        failures.append(f"reserves still held: {s.reserved_credits_micro} micro-credits (must be 0)")
    if s.settled_events != s.settled_turns:
        failures.append(
            f"billing: {s.settled_events} distinct usage.settled event(s) "
            f"!= {s.settled_turns} settled turn(s)"
        )
    if s.missing_billing:
        failures.append(f"billing: {s.missing_billing} settled turn(s) have no usage.settled event")
    if s.unexpected_billing:
        failures.append(f"billing: {s.unexpected_billing} usage.settled event(s) match no settled turn")
    if s.missing_adjustments or s.adjusted_events != s.adjusted_turns:
        failures.append(
            f"billing: {s.adjusted_events} distinct usage.adjusted event(s) for {s.adjusted_turns} "
            f"adjusted turn(s), {s.missing_adjustments} missing"
        )
    differing = [c for c in s.credits if c.billed_micro != c.charged_micro]
    if differing:
        failures.append(
            f"billed credits differ from stored charges for {len(differing)} tenant(s): "
            + ", ".join(f"{c.tenant_id} billed {c.billed_micro} stored {c.charged_micro}" for c in differing)
        )
    if s.quota_mismatches:
        failures.append(
            f"quota spent != settled charges on {len(s.quota_mismatches)} total row(s): "
            + "; ".join(s.quota_mismatches[:5])
        )
    if s.unpublished_outbox:
        failures.append(f"{s.unpublished_outbox} outbox row(s) not published")
    if s.parked_events:
        failures.append(f"{s.parked_events} parked event(s) left")
    return tuple(failures)


OK_LINE: Final = "OK: every accepted turn settled once, no reserve held, billing complete"


def render(s: Summary, *, verdict: bool = True) -> str:
    """The summary as plain-text tables, then (with `verdict`) one line per failed invariant or OK."""
    parts: list[str] = []
    parts.append("turns by state and billing outcome")
    parts.append(
        format_table(
            ["state", "billing_outcome", "turns"],
            [[state, outcome, n] for (state, outcome), n in sorted(s.turns_by_state.items())],
        )
    )
    parts.append("\ncredits charged per tenant")
    rows: list[list[object]] = [
        [str(c.tenant_id), c.settled_turns, c.charged_micro, format_credits(c.charged_micro), c.billed_micro]
        for c in s.credits
    ]
    rows.append(
        [
            "all",
            sum(c.settled_turns for c in s.credits),
            s.charged_micro,
            format_credits(s.charged_micro),
            sum(c.billed_micro for c in s.credits),
        ]
    )
    parts.append(format_table(["tenant", "turns", "charged_micro", "credits", "billed_micro"], rows))
    parts.append("\ndecisions")
    parts.append(
        format_table(
            ["command", "decision", "error_code", "count"],
            [[*key, n] for key, n in sorted(s.decisions.items())],
        )
    )
    parts.append("\ninvariants")
    checks: list[list[object]] = [
        ["accepted turns (decisions)", s.accepted_turns],
        ["stored turns", s.stored_turns],
        ["settled turns", s.settled_turns],
        ["reserves held (micro-credits, must be 0)", s.reserved_credits_micro],
        ["billing-usage records (raw)", s.billing_records],
        ["usage.settled after dedupe (must = settled turns)", s.settled_events],
        ["settled turns missing a usage.settled", s.missing_billing],
        ["usage.settled matching no settled turn", s.unexpected_billing],
        ["adjusted turns", s.adjusted_turns],
        ["usage.adjusted after dedupe (must = adjusted turns)", s.adjusted_events],
        ["outbox rows not published", s.unpublished_outbox],
        ["quota total rows off their charges", len(s.quota_mismatches)],
        ["parked events left", s.parked_events],
        ["dead letters", s.dead_letters],
    ]
    parts.append(format_table(["check", "value"], checks))
    if verdict:
        parts.append("")
        parts.extend([f"FAILED: {f}" for f in s.failures] or [OK_LINE])
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Reading the database and the topics
# --------------------------------------------------------------------------------------------


async def topic_partitions(bootstrap: str, topics: Sequence[str]) -> dict[str, list[TopicPartition]]:
    """The partitions of each existing topic (a missing topic is left out)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return {
        t["topic"]: [
            TopicPartition(t["topic"], p["partition"]) for p in sorted(t["partitions"], key=_partition)
        ]
        for t in described
        if t["error_code"] == 0 and t["partitions"]
    }


def _partition(p: dict[str, Any]) -> int:
    return int(p["partition"])


async def read_topic(
    bootstrap: str, topic: str, *, within: float = 60.0
) -> list[tuple[bytes | None, bytes | None]]:
    """Every record of `topic` up to the end offsets taken at the start: (key, value) pairs. Raises
    `TimeoutError` when those offsets are not reached `within` seconds."""
    tps = (await topic_partitions(bootstrap, [topic])).get(topic, [])
    if not tps:
        return []
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + within
        pending = {tp for tp in tps if end[tp] > 0}
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: end offsets not reached in {within}s")
            batches = await consumer.getmany(*pending, timeout_ms=200)
            for tp, batch in batches.items():
                records.extend((r.key, r.value) for r in batch if r.offset < end[tp])
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
        return records
    finally:
        await consumer.stop()


class InputLag:
    """Records on the input topics that the workers' consumer group has not committed yet.
    One admin client and one consumer, reused across measurements."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False
        )
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> InputLag:
        names = TopicNames(self._settings.topic_prefix)
        topics = [names.full(t) for t in INPUT_TOPICS]
        found = await topic_partitions(self._settings.kafka_bootstrap_servers, topics)
        self._partitions = [tp for t in topics for tp in found.get(t, [])]
        await self._admin.start()
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()
        await self._admin.close()

    async def measure(self) -> int:
        tps = self._partitions
        end = await self._consumer.end_offsets(tps)
        committed = await self._admin.list_consumer_group_offsets(self._settings.group_id, partitions=tps)
        lag = 0
        for tp in tps:
            meta = committed.get(tp)
            done = meta.offset if meta is not None and meta.offset >= 0 else 0
            lag += max(end[tp] - done, 0)
        return lag


@dataclass(frozen=True)
class Backlog:
    """What the processor still has to do; all zeros means quiescent."""

    unsettled_turns: int
    reserved_credits_micro: int
    unpublished_outbox: int
    parked_events: int
    input_lag: int

    @property
    def quiescent(self) -> bool:
        return not (
            self.unsettled_turns
            or self.reserved_credits_micro
            or self.unpublished_outbox
            or self.parked_events
            or self.input_lag
        )

    def describe(self) -> str:
        return (
            f"unsettled {self.unsettled_turns}, reserved {self.reserved_credits_micro}, "
            f"outbox {self.unpublished_outbox}, parked {self.parked_events}, lag {self.input_lag}"
        )


async def backlog(con: asyncpg.Connection, lag: InputLag, tenants: Collection[UUID] | None) -> Backlog:
    """One look at what is left to do (database first, then the consumer group's lag)."""
    counts = await backlog_counts(con, tenants)
    return Backlog(
        unsettled_turns=counts.unsettled_turns,
        reserved_credits_micro=counts.reserved_credits_micro,
        unpublished_outbox=counts.unpublished_outbox,
        parked_events=counts.parked_events,
        input_lag=await lag.measure(),
    )


async def wait_quiescent(
    settings: Settings,
    tenants: Collection[UUID] | None,
    *,
    within: float,
    on_poll: Callable[[Backlog], None] | None = None,
    interval: float = 0.25,
) -> Backlog:
    """Poll until the backlog is empty twice in a row, or `within` seconds pass; returns the last look."""
    deadline = time.monotonic() + within
    con = await asyncpg.connect(settings.database_url)
    try:
        async with InputLag(settings) as lag:
            return await _poll_backlog(con, lag, tenants, deadline, on_poll, interval)
    finally:
        await con.close()


async def _poll_backlog(
    con: asyncpg.Connection,
    lag: InputLag,
    tenants: Collection[UUID] | None,
    deadline: float,
    on_poll: Callable[[Backlog], None] | None,
    interval: float,
) -> Backlog:
    clean = 0
    while True:
        look = await backlog(con, lag, tenants)
        if on_poll is not None:
            on_poll(look)
        clean = clean + 1 if look.quiescent else 0
        if clean >= 2 or time.monotonic() > deadline:
            return look
        await asyncio.sleep(interval)


def _json_object(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        obj = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _in_scope(tenant: object, tenants: Collection[str] | None) -> bool:
    return tenants is None or (isinstance(tenant, str) and tenant in tenants)


async def summarize(settings: Settings, tenants: Collection[UUID] | None = None) -> Summary:
    """Read the database and the billing and dead-letter topics; `tenants` limits it to those."""
    names = TopicNames(settings.topic_prefix)
    con = await asyncpg.connect(settings.database_url)
    try:
        rows = await summary_rows(con, tenants)
    finally:
        await con.close()
    turn_rows, decision_rows, quota_rows = rows.turns, rows.decisions, rows.quota
    reserved = rows.backlog.reserved_credits_micro
    unpublished = rows.backlog.unpublished_outbox
    parked = rows.backlog.parked_events

    scope = None if tenants is None else {str(t) for t in tenants}
    billing = [
        v
        for v in (
            _json_object(value)
            for _, value in await read_topic(settings.kafka_bootstrap_servers, names.billing_usage)
        )
        if v is not None and _in_scope(v.get("tenant_id"), scope)
    ]
    dead = [
        value
        for _, value in await read_topic(settings.kafka_bootstrap_servers, names.dead_letters)
        if scope is None or _dead_letter_tenant(value) in scope
    ]
    return build_summary(
        turns=[dict(r) for r in turn_rows],
        decisions=[dict(r) for r in decision_rows],
        quota_rows=[dict(r) for r in quota_rows],
        reserved_credits_micro=int(reserved),
        unpublished_outbox=int(unpublished),
        parked_events=int(parked),
        billing=billing,
        dead_letters=len(dead),
    )


def _dead_letter_tenant(value: bytes | None) -> str | None:
    letter = _json_object(value)
    payload = letter.get("payload") if letter else None
    inner = _json_object(payload.encode("utf-8")) if isinstance(payload, str) else None
    tenant = inner.get("tenant_id") if inner else None
    return tenant if isinstance(tenant, str) else None


def build_summary(
    *,
    turns: Sequence[dict[str, Any]],
    decisions: Sequence[dict[str, Any]],
    quota_rows: Sequence[dict[str, Any]],
    reserved_credits_micro: int,
    unpublished_outbox: int,
    parked_events: int,
    billing: Sequence[dict[str, Any]],
    dead_letters: int,
) -> Summary:
    """The pure part of `summarize`: rows and decoded billing events in, `Summary` out."""
    by_state: Counter[tuple[str, str]] = Counter(
        (str(t["state"]), str(t["billing_outcome"] or "-")) for t in turns
    )
    by_decision: Counter[tuple[str, str, str]] = Counter()
    for d in decisions:
        by_decision[(str(d["command"]), str(d["decision"]), str(d["error_code"]))] += int(d["n"])
    accepted = sum(n for (_, decision, _), n in by_decision.items() if decision in ("allow", "downgrade"))

    settled = [t for t in turns if t["settled"]]
    settled_keys = {dedupe_key(t["tenant_id"], t["id"], t["request_id"]): t for t in settled}
    adjusted_keys = {
        dedupe_key(t["tenant_id"], t["id"], t["request_id"], adjusted=True) for t in settled if t["adjusted"]
    }

    settled_events: dict[str, dict[str, Any]] = {}
    adjusted_events: dict[str, dict[str, Any]] = {}
    for event in billing:
        key = event.get("dedupe_key")
        if not isinstance(key, str):
            continue
        if event.get("type") == "usage.settled":
            settled_events.setdefault(key, event)
        elif event.get("type") == "usage.adjusted":
            adjusted_events.setdefault(key, event)

    # What billing charges per turn: the adjusted amount when there is one, else the settled one.
    billed: dict[str, int] = {}
    billed_tenant: dict[str, str] = {}
    for key, event in settled_events.items():
        billed[key] = int(event.get("committed_credits_micro") or 0)
        billed_tenant[key] = str(event.get("tenant_id"))
    for key, event in adjusted_events.items():
        base = key.removesuffix("/adjusted")
        billed[base] = int(event.get("committed_credits_micro") or 0)
        billed_tenant[base] = str(event.get("tenant_id"))

    tenants = sorted({t["tenant_id"] for t in turns}, key=str)
    credits = tuple(
        TenantCredits(
            tenant_id=tenant,
            settled_turns=sum(1 for t in settled if t["tenant_id"] == tenant),
            charged_micro=sum(
                int(t["committed_credits_micro"] or 0) for t in settled if t["tenant_id"] == tenant
            ),
            billed_micro=sum(v for k, v in billed.items() if billed_tenant[k] == str(tenant)),
        )
        for tenant in tenants
    )

    summary = Summary(
        turns_by_state=dict(by_state),
        decisions=dict(by_decision),
        credits=credits,
        accepted_turns=accepted,
        stored_turns=len(turns),
        settled_turns=len(settled),
        adjusted_turns=len(adjusted_keys),
        reserved_credits_micro=reserved_credits_micro,
        billing_records=len(billing),
        settled_events=len(settled_events),
        adjusted_events=len(adjusted_events),
        missing_billing=len(settled_keys.keys() - settled_events.keys()),
        unexpected_billing=len(settled_events.keys() - settled_keys.keys()),
        missing_adjustments=len(adjusted_keys - adjusted_events.keys()),
        unpublished_outbox=unpublished_outbox,
        dead_letters=dead_letters,
        parked_events=parked_events,
        quota_mismatches=quota_mismatches(settled, quota_rows),
    )
    return _with_failures(summary)


def _with_failures(summary: Summary) -> Summary:
    return replace(summary, failures=check_invariants(summary))


def quota_mismatches(
    settled: Sequence[dict[str, Any]], quota_rows: Sequence[dict[str, Any]]
) -> tuple[str, ...]:
    """Compare each `total` row's `spent` with the sum of the charges of the turns settled on it
    (a turn settles on the daily and monthly rows of its stored periods, attributed to its requester)."""
    expected: Counter[tuple[UUID, UUID, str, date]] = Counter()
    for t in settled:
        user = t["requester_user_id"]
        charge = int(t["committed_credits_micro"] or 0)
        expected[(t["tenant_id"], user, "daily", t["period_daily"])] += charge
        expected[(t["tenant_id"], user, "monthly", t["period_monthly"])] += charge
    actual: dict[tuple[UUID, UUID, str, date], int] = {
        (r["tenant_id"], r["user_id"], str(r["period_type"]), r["period_start"]): int(
            r["spent_credits_micro"]
        )
        for r in quota_rows
    }
    problems = []
    for key in sorted(expected.keys() | actual.keys(), key=str):
        if expected.get(key, 0) != actual.get(key, 0):
            tenant, user, period_type, start = key
            spent, charges = actual.get(key, 0), expected.get(key, 0)
            problems.append(f"{tenant}/{user} {period_type} {start}: spent {spent}, charges {charges}")
    return tuple(problems)
