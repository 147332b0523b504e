"""`minichat worker` as a real process against the real broker and database."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from minichat.models.topics import TopicNames
from tests.conftest import Deployment, deployment_settings
from tests.support import Endpoints, TopicReader, produce, run_cli, run_worker

pytestmark = pytest.mark.integration


async def test_worker_refuses_to_start_without_schema_or_topics(
    endpoints: Endpoints, empty_database_url: str
) -> None:
    deployment = Deployment(deployment_settings(endpoints, empty_database_url))

    result = run_cli(deployment.env(), "worker")
    assert result.returncode == 2
    assert "run `minichat db migrate`" in result.stderr
    assert "run `minichat topics create`" in result.stderr

    assert run_cli(deployment.env(), "db", "migrate").returncode == 0
    result = run_cli(deployment.env(), "worker")
    assert result.returncode == 2
    assert "minichat db migrate" not in result.stderr
    assert "run `minichat topics create`" in result.stderr


async def test_worker_consumes_through_faust_and_stops_on_sigterm(
    deployment: Deployment, tmp_path: Path
) -> None:
    names = TopicNames(deployment.settings.topic_prefix)
    bootstrap = deployment.settings.kafka_bootstrap_servers
    with run_worker(deployment.env(), tmp_path / "worker.log") as worker:
        sent = await produce(bootstrap, names.turn_requests, [(b"some-key", b"{not json")])
        async with TopicReader(bootstrap, names.dead_letters) as reader:
            letters = await reader.wait_for(lambda vs: len(vs) >= 1, timeout=90, what="a dead letter")
        assert worker.proc.poll() is None, worker.log()[-3000:]
        assert worker.terminate() == 0, worker.log()[-3000:]
    [letter] = letters
    assert letter["error_code"] == "malformed_json"
    assert letter["source_topic"] == names.turn_requests
    assert (letter["partition"], letter["offset"]) == (sent[0].partition, sent[0].offset)
    assert letter["payload"] == "{not json"
    assert reader.records[0].key == b"some-key"


async def test_policy_versions_are_stored_once_and_a_changed_version_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    import asyncpg

    from minichat.models.policy import load_policy
    from minichat.storage.policies import PolicyConflict, ensure_policy_version
    from tests.gateway import policy_file

    policy = load_policy(deployment.settings.policy_file)
    changed = load_policy(policy_file(tmp_path, max_images=policy.max_images + 1))
    assert changed.version == policy.version
    con = await asyncpg.connect(deployment.settings.database_url)
    try:
        assert await ensure_policy_version(con, policy) is True
        assert await ensure_policy_version(con, policy) is False  # the same content again: nothing
        with pytest.raises(PolicyConflict, match="already stored with different content"):
            await ensure_policy_version(con, changed)
        assert await con.fetchval("SELECT count(*) FROM policy_versions") == 1
    finally:
        await con.close()

    # the worker refuses to start on it, naming the file
    env = {
        **deployment.env(),
        "MINICHAT_POLICY_FILE": str(changed_path := policy_file(tmp_path, max_images=9)),
    }
    result = run_cli(env, "worker")
    assert result.returncode == 2
    assert str(changed_path) in result.stderr and "new version number" in result.stderr


async def test_a_bad_policy_file_stops_the_worker_with_the_field_path(
    deployment: Deployment, tmp_path: Path
) -> None:
    from tests.gateway import policy_file

    bad = policy_file(tmp_path, max_images="four")
    result = run_cli({**deployment.env(), "MINICHAT_POLICY_FILE": str(bad)}, "worker")
    assert result.returncode == 2
    assert str(bad) in result.stderr and "max_images" in result.stderr


async def test_metrics_page_under_load_parses_and_moves(deployment: Deployment, tmp_path: Path) -> None:
    """`/metrics` read with prometheus_client's own parser, under load: the decision latency
    histogram moves with the traffic, and the counters, state gauges and lag are there."""
    import socket
    import uuid

    from tests.gateway import Gateway
    from tests.support import MetricSamples, scrape_metrics, wait_until

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**deployment.env(), "MINICHAT_WEB_ENABLED": "true", "MINICHAT_WEB_PORT": str(port)}
    names = TopicNames(deployment.settings.topic_prefix)
    bootstrap = deployment.settings.kafka_bootstrap_servers

    scrape = functools.partial(scrape_metrics, port)

    with run_worker(env, tmp_path / "worker.log") as worker:
        async with TopicReader(bootstrap, names.turn_decisions) as decisions:
            gateway = Gateway(deployment.settings, decisions)
            first = await wait_until(scrape, timeout=60, what="the metrics page")
            latency_count = ("minichat_decision_seconds_count", ())
            assert first.get(latency_count, 0) == 0
            tenant = uuid.uuid4()
            commands = [gateway.requested(tenant, uuid.uuid4(), uuid.uuid4()) for _ in range(200)]
            early = gateway.requested(
                tenant, uuid.uuid4(), uuid.uuid4()
            )  # never sent: its events stay parked
            await gateway.send_provider(gateway.provider("turn.progress", early))
            await gateway.decide(*commands)
            await produce(bootstrap, names.turn_requests, [(b"k", b"not json")])

            async def moved() -> MetricSamples | None:
                found = await scrape()
                dead = (
                    "minichat_dead_letters_total",
                    (("code", "malformed_json"), ("topic", "turn_requests")),
                )
                parked = ("minichat_parked_events", ())  # the gauges are refreshed every few seconds
                ready = found and found.get(latency_count, 0) >= 200 and found.get(dead) == 1
                ready = ready and found.get(parked) == 1
                return found if ready else None

            found = await wait_until(moved, timeout=60, what="the metrics to move")
        assert worker.terminate() == 0, worker.log()[-3000:]
    allowed = (("command", "turn.requested"), ("decision", "allow"), ("error_code", ""), ("replay", "false"))
    assert found[("minichat_decisions_total", allowed)] == 200
    assert found[("minichat_decision_seconds_bucket", (("le", "+Inf"),))] >= 200
    assert found[("minichat_decision_seconds_sum", ())] > 0
    assert found[("minichat_parked_events", ())] == 1
    assert ("minichat_parked_oldest_age_seconds", ()) in found and (
        "minichat_outbox_oldest_age_seconds",
        (),
    ) in found
    assert found[("minichat_batch_size_records_count", ())] >= 1
    assert any(name == "minichat_batch_stage_seconds_count" for name, _ in found)
    lags = {labels: v for (name, labels), v in found.items() if name == "minichat_consumer_lag"}
    assert len(lags) == 3 * deployment.settings.partitions and all(v >= 0 for v in lags.values())
    assert ("process_resident_memory_bytes", ()) in found
