"""A real worker's `/metrics` (docs/operations.md, "Metrics" and "Alerts"): a fresh scrape has
every counter at 0 and every histogram; it answers while PostgreSQL is unreachable; the alert
rules and the dashboard name only metrics a real scrape has; the gauges count a premium reserve
once; an unknown failure code is counted and logged by name."""

from __future__ import annotations

import json
import re
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from minichat.models.topics import TopicNames
from minichat.processors.metrics import SHARED_GAUGES, SPECS
from minichat.processors.web import GAUGE_REFRESH_S
from tests.conftest import Deployment
from tests.gateway import Gateway
from tests.pgproxy import PgProxy
from tests.support import MetricSamples, TopicReader, WorkerProcess, run_worker, wait_until

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
NAMES = re.compile(r"\b((?:minichat|process|python)_[a-z_]+)\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> MetricSamples | None:
    """The page, parsed; None while the server does not answer. Any answer but 200 fails."""
    try:
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
            status = response.status
    except aiohttp.ClientError:
        return None
    assert status == 200, (status, text[:2000])
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@contextmanager
def worker_on(deployment: Deployment, tmp_path: Path, **env: str) -> Iterator[tuple[WorkerProcess, int]]:
    port = free_port()
    full = {**deployment.env(), "MINICHAT_WEB_ENABLED": "true", "MINICHAT_WEB_PORT": str(port), **env}
    with run_worker(full, tmp_path / "worker.log") as worker:
        yield worker, port


def sample_names(found: MetricSamples) -> set[str]:
    return {name for name, _ in found}


async def test_a_fresh_scrape_has_everything_and_answers_with_postgres_unreachable(
    deployment: Deployment, tmp_path: Path
) -> None:
    database = urlsplit(deployment.env()["MINICHAT_DATABASE_URL"])
    async with PgProxy(database.hostname or "127.0.0.1", database.port or 5432) as proxy:
        url = proxy.url(deployment.env()["MINICHAT_DATABASE_URL"])
        with worker_on(deployment, tmp_path, MINICHAT_DATABASE_URL=url) as (worker, port):

            async def read_once() -> MetricSamples | None:
                # the database gauges read, and the partitions assigned (the lag series are per
                # partition the worker owns: none exist before its first assignment)
                found = await scrape(port)
                age = found and found.get(("minichat_db_gauges_age_seconds", ()))
                owns = found and any(name == "minichat_consumer_lag" for name, _ in found)
                return found if owns and age is not None and age < GAUGE_REFRESH_S * 3 else None

            fresh = await wait_until(read_once, timeout=90, what="gauges read, partitions owned")
            assert worker.proc.poll() is None, worker.log()[-3000:]

            # every counter at 0 and every histogram there, before any record
            for name, spec in SPECS.items():
                for values in spec.known:
                    labels = tuple(sorted(zip(spec.labels, values, strict=True)))
                    if spec.kind == "counter":
                        assert fresh[(name, labels)] == 0, (name, labels)
                    elif spec.kind == "histogram":
                        assert fresh[(f"{name}_count", labels)] == 0, (name, labels)
            dead_letter = (
                "minichat_dead_letters_total",
                (("code", "malformed_json"), ("topic", "turn_requests")),
            )
            assert fresh[dead_letter] == 0
            deadlocks = ("minichat_batch_retries_total", (("error", "DeadlockDetectedError"),))
            assert fresh[deadlocks] == 0
            assert fresh[("minichat_parked_events", ())] == 0
            assert any(name == "minichat_build_info" for name, _ in fresh)

            # the alert rules and the dashboard name metrics this scrape has; shared gauges by max
            rules = yaml.safe_load((DOCS / "alerts.yml").read_text())["groups"][0]["rules"]
            board = json.loads((DOCS / "grafana" / "minichat.json").read_text())
            exprs = [rule["expr"] for rule in rules]
            exprs += [t["expr"] for panel in board["panels"] for t in panel["targets"]]
            named = {name for expr in exprs for name in NAMES.findall(expr)}
            assert named and named <= sample_names(fresh), sorted(named - sample_names(fresh))
            for expr in exprs:
                for gauge in SHARED_GAUGES & set(NAMES.findall(expr)):
                    assert re.search(rf"max(\s+by\s*\([^)]*\))?\s*\(\s*{gauge}\b", expr), expr
                    assert not re.search(rf"sum(\s+by\s*\([^)]*\))?\s*\(\s*{gauge}\b", expr), expr

            # PostgreSQL unreachable (the proxy closed, the shared server untouched): the page
            # still answers 200, with the last gauges and their growing age
            await proxy.close()

            async def stale() -> MetricSamples | None:
                found = await scrape(port)
                age = found and found.get(("minichat_db_gauges_age_seconds", ()))
                return found if age is not None and age > GAUGE_REFRESH_S * 2 else None

            found = await wait_until(stale, timeout=60, what="the gauges' age to grow without PostgreSQL")
            assert worker.proc.poll() is None, worker.log()[-3000:]
            assert found[("minichat_parked_events", ())] == 0  # the last reading
            assert found[dead_letter] == 0
            assert "metrics gauges not refreshed" in worker.log()


async def test_a_premium_reserve_is_counted_once_and_an_unknown_code_is_counted(
    deployment: Deployment, tmp_path: Path
) -> None:
    names = TopicNames(deployment.settings.topic_prefix)
    with worker_on(deployment, tmp_path) as (worker, port):
        async with TopicReader(deployment.settings.kafka_bootstrap_servers, names.turn_decisions) as reader:
            gateway = Gateway(deployment.settings, reader)
            tenant = uuid.uuid4()
            premium = gateway.requested(tenant, uuid.uuid4(), uuid.uuid4(), model="gpt-5.2")
            standard = gateway.requested(tenant, uuid.uuid4(), uuid.uuid4(), model="gpt-5-mini")
            decisions = await gateway.decide(premium, standard, timeout=90)
            assert [d["decision"] for d in decisions] == ["allow", "allow"], decisions
            assert decisions[0]["effective_model"] == "gpt-5.2"
            reserved = [int(d["reserved_credits_micro"]) for d in decisions]
            assert all(r > 0 for r in reserved)

            async def reading(at_least: float) -> MetricSamples | None:
                found = await scrape(port)
                value = found and found.get(("minichat_reserved_credits_micro", ()))
                return found if value is not None and value >= at_least else None

            found = await wait_until(lambda: reading(sum(reserved)), timeout=60, what="the reserves")
            # each reserve once: the premium turn's second row (bucket tier:premium) is not added
            assert found[("minichat_reserved_credits_micro", ())] == sum(reserved)

            # a gateway's typo of context_length_exceeded: charged, not released, and counted
            await gateway.send_provider(
                gateway.provider("turn.failed", standard, error_code="context_length")
            )
            key = ("minichat_failed_unknown_code_total", (("code", "context_length"),))

            async def counted() -> MetricSamples | None:
                found = await scrape(port)
                return found if found and found.get(key) == 1 else None

            found = await wait_until(counted, timeout=60, what="the unknown code counted")
            assert found[("minichat_failed_unknown_code_total", (("code", "other"),))] == 0
        assert worker.terminate() == 0, worker.log()[-3000:]
    assert "unknown error_code 'context_length'" in worker.log()
