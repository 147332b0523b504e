"""One broker's clock skewed (libfaketime, tests/cluster.py `restart(node, faketime=...)`) on the
three-broker cluster: the gateway's promise holds with the causal token `after`, and the books
rebuild exactly.

Node `SKEWED` runs with its wall clock off by an offset, so the LogAppendTime of every record it
appends as a leader is off too. The replica orders put its leadership where the skew hurts: with
the clock ahead ("+2s", "+0.05s") it leads every partition of `provider-responses` and `usage` but
none of `turn-requests` (a terminal event's timestamp is later than the next request's); with the
clock behind ("-0.05s") it leads `turn-requests` only (the next request's timestamp is earlier
than the terminal event's). Each flip (restart the node with the next offset, place the leaders)
is followed by a burst: chats whose gateway sends the next request as soon as the previous turn's
terminal event and usage are acknowledged, half through `GatewayClient` (which fills `after`),
half through a client that sends no token. Token-carrying requests must never be refused
`generation_in_progress`; the tokenless refusals are counted and printed (the ordering by time alone
holds only within `ORDER_GRACE_MS`: docs/operations.md; at +2 s some must be refused, or the attack
missed). Then, as in every cluster run: nothing
lost or duplicated, every command answered, digest(live) == digest(rebuild): the rebuild follows
the order the worker recorded on `order-log`, not the skewed timestamps (docs/guarantees.md,
"Clock skew on three brokers").

Sizes: the CI version flips 3 times (+2s, -0.05s, +0.05s); the soak version (marker `soak`,
`make soak-cluster`) at least 50 times (`MINICHAT_CLUSTER_SKEW_FLIPS`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from minichat.client import GatewayClient
from minichat.client.messages import Command
from minichat.models.events import Usage
from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from tests.cluster import BROKERS, Cluster
from tests.conftest import Deployment, deployment_settings
from tests.integration.cluster_checks import verify
from tests.integration.test_crash import SESSION_TIMEOUT_S, Fleet, crash_policy, fresh_database, soak_selected
from tests.support import Endpoints

pytestmark = pytest.mark.integration

SKEWED = 2
OFFSETS = ("+2s", "-0.05s", "+0.05s")
FLIPS_ENV = "MINICHAT_CLUSTER_SKEW_FLIPS"
SOAK_FLIPS = max(51, int(os.environ.get(FLIPS_ENV) or 0))
CHATS, TURNS = 8, 4
"""Per burst and per client (with and without the token): chats, turns each."""
MODEL = "gpt-5-mini"


class TokenlessClient(GatewayClient):
    """A gateway that relies on time alone: never puts `after` on a command."""

    def with_token(self, command: Command) -> Command:
        return command


@dataclasses.dataclass
class Tally:
    """Per (offset, "token" | "none"): decisions by (decision, error_code)."""

    counts: dict[tuple[str, str], Counter[str]] = dataclasses.field(default_factory=dict)

    def add(self, offset: str, mode: str, outcome: str) -> None:
        self.counts.setdefault((offset, mode), Counter())[outcome] += 1

    def refused(self, offset: str | None, mode: str) -> int:
        return sum(
            c["reject generation_in_progress"]
            for (o, m), c in self.counts.items()
            if m == mode and offset in (None, o)
        )

    def requests(self, offset: str | None, mode: str) -> int:
        return sum(sum(c.values()) for (o, m), c in self.counts.items() if m == mode and offset in (None, o))


def placement(names: TopicNames, partitions: int, ahead: bool) -> dict[tuple[str, int], list[int]]:
    """Replica orders putting the skewed node first where the skew reorders a chat's facts and its
    next request, and second elsewhere."""
    others = [n for n in range(1, BROKERS + 1) if n != SKEWED]
    orders: dict[tuple[str, int], list[int]] = {}
    for p in range(partitions):
        other, rest = others[p % 2], others[(p + 1) % 2]
        skewed_first, other_first = [SKEWED, other, rest], [other, SKEWED, rest]
        facts, requests = (skewed_first, other_first) if ahead else (other_first, skewed_first)
        orders[(names.turn_requests, p)] = requests
        orders[(names.provider_responses, p)] = facts
        orders[(names.usage, p)] = facts
    return orders


async def chat(client: GatewayClient, offset: str, mode: str, tally: Tally) -> None:
    """One chat of `TURNS` turns, each next request sent as soon as the previous turn's terminal
    event and usage are acknowledged."""
    tenant, user, chat_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for turn in range(TURNS):
        request = uuid.uuid4()
        decision = await client.request_turn(
            tenant_id=tenant,
            chat_id=chat_id,
            user_id=user,
            request_id=request,
            content=f"turn {turn}",
            model=MODEL,
            timeout_s=60,
        )
        tally.add(offset, mode, f"{decision.decision} {decision.error_code or '-'}")
        if decision.decision != "allow":
            continue
        ids: dict[str, Any] = {"tenant_id": tenant, "chat_id": chat_id, "request_id": request}
        await client.completed(**ids, content="answer")
        await client.usage(**ids, usage=Usage(input_tokens=30, output_tokens=40))


async def burst(settings: Settings, offset: str, tally: Tally) -> None:
    """`CHATS` chats with the token and `CHATS` without, all at once."""
    servers, prefix = settings.kafka_bootstrap_servers, settings.topic_prefix
    async with (
        GatewayClient(servers, prefix, decision_timeout_s=60.0) as with_token,
        TokenlessClient(servers, prefix, decision_timeout_s=60.0) as without,
    ):
        await asyncio.gather(
            *(chat(with_token, offset, "token", tally) for _ in range(CHATS)),
            *(chat(without, offset, "none", tally) for _ in range(CHATS)),
        )


@pytest.fixture
def unskewed_afterwards(cluster: Cluster) -> Iterator[None]:
    """The cluster as the other tests expect it: every clock true."""
    yield
    if cluster.skews().get(SKEWED, "0") != "0":
        cluster.restart(SKEWED)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    flips: int
    soak: bool = False


VARIANTS = [Variant("skew-flips", len(OFFSETS)), Variant("soak-skew-flips", SOAK_FLIPS, soak=True)]


def _param(variant: Variant) -> Any:
    marks = [pytest.mark.timeout(240 + 90 * variant.flips)]
    if variant.soak:
        marks.append(pytest.mark.soak)
    return pytest.param(variant, id=variant.name, marks=marks)


@pytest.mark.parametrize("variant", [_param(v) for v in VARIANTS])
async def test_skewed_broker_clock_token_requests_never_refused_and_rebuild_matches(
    variant: Variant,
    cluster: Cluster,
    unskewed_afterwards: None,
    endpoints: Endpoints,
    template_database: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if variant.soak and not soak_selected(request.config):
        pytest.skip("soak test: run it with `make soak-cluster`")
    began = time.monotonic()
    on_cluster = cluster.endpoints(endpoints)
    tally = Tally()
    restart_s: list[float] = []
    async with (
        fresh_database(on_cluster, template_database, "skew") as live_url,
        fresh_database(on_cluster, template_database, "skewrebuilt") as rebuilt_url,
    ):
        settings = deployment_settings(on_cluster, live_url, policy_file=crash_policy(tmp_path))
        names = TopicNames(settings.topic_prefix)
        await create_topics(settings)
        env = {**Deployment(settings).env(), "MINICHAT_SESSION_TIMEOUT_S": SESSION_TIMEOUT_S}
        with ExitStack() as stack:
            fleet = Fleet(env, tmp_path, stack, 1)
            try:
                for flip in range(variant.flips):
                    offset = OFFSETS[flip % len(OFFSETS)]
                    await cluster.wait_in_sync(names.all(), timeout=90)
                    started = time.monotonic()
                    await asyncio.to_thread(cluster.restart, SKEWED, offset)
                    restart_s.append(time.monotonic() - started)
                    await cluster.wait_in_sync(names.all(), timeout=90)
                    ahead = offset.startswith("+")
                    await cluster.prefer(placement(names, settings.partitions, ahead))
                    fleet.check_alive()
                    await burst(settings, offset, tally)
                fleet.check_alive()
            except BaseException:
                print(fleet.tails())
                raise
            verdict = await verify(settings, fleet, rebuilt_url)

    per_offset = ", ".join(
        f"{o}: {tally.refused(o, 'none')} of {tally.requests(o, 'none')} refused without the token, "
        f"{tally.refused(o, 'token')} of {tally.requests(o, 'token')} with it"
        for o in OFFSETS
    )
    print(
        f"clock skew[{variant.name}]: {variant.flips} flips of node {SKEWED}'s clock "
        f"(restart {sum(restart_s) / max(1, len(restart_s)):.1f} s on average); {per_offset}; "
        f"{verdict.line()}; {time.monotonic() - began:.0f} s"
    )
    failures = list(verdict.failures)
    if tally.refused(None, "token"):
        failures.append(
            f"{tally.refused(None, 'token')} token-carrying request(s) refused generation_in_progress"
        )
    # the attack itself works: at +2 s, time alone refuses some of the tokenless requests
    if not tally.refused("+2s", "none"):
        failures.append("no tokenless request refused at +2s: the skew did not reorder anything")
    assert tally.requests(None, "token") == variant.flips * CHATS * TURNS
    assert not failures, "\n\n".join([*failures, verdict.books, verdict.logs])
