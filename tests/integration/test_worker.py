"""`minichat worker` as a real process against the real broker and database."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from minichat.models.topics import TopicNames
from tests.conftest import Deployment, deployment_settings
from tests.support import ROOT, Endpoints, TopicReader, produce, run_worker, worker_env

pytestmark = pytest.mark.integration


def _run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "minichat.cli", *args],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


async def test_worker_refuses_to_start_without_schema_or_topics(
    endpoints: Endpoints, empty_database_url: str
) -> None:
    deployment = Deployment(deployment_settings(endpoints, empty_database_url))

    result = _run_cli(deployment.env(), "worker")
    assert result.returncode == 2
    assert "run `minichat db migrate`" in result.stderr
    assert "run `minichat topics create`" in result.stderr

    assert _run_cli(deployment.env(), "db", "migrate").returncode == 0
    result = _run_cli(deployment.env(), "worker")
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
