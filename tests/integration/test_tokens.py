"""Read API tokens against a live worker (docs/contract.md, "Read API tokens"): `minichat tokens
list` shows a token's id and tenant but neither it nor its digest; `tokens revoke` refuses it from
the next request on; an expired token is refused; a malformed file keeps the last good set, with
one log line, and no restart is needed for any of it."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from minichat.bench.workers import free_port
from minichat.processors.tokens import issue_token, read_tokens, token_digest, utc_now
from tests.conftest import Live, live_deployment
from tests.openapi_check import read_checked
from tests.support import Endpoints, run_cli, wait_until

pytestmark = pytest.mark.integration

MALFORMED_LOG = "is not a token file"


@dataclass
class Worker:
    live: Live
    base: str
    http: aiohttp.ClientSession
    tokens_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MINICHAT_READ_TOKENS_FILE": str(self.tokens_file)}

    async def status(self, token: str) -> int:
        """A read of an unknown user: 404 with a token the worker accepts, 401 without."""
        headers = {"Authorization": f"Bearer {token}"}
        async with self.http.get(f"{self.base}/v1/users/{uuid.uuid4()}/quota", headers=headers) as response:
            await read_checked(response)
            return response.status


@pytest.fixture(scope="module")
async def worker(
    endpoints: Endpoints, template_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Worker]:
    workdir = tmp_path_factory.mktemp("tokens")
    tokens_file = workdir / "tokens.json"
    issue_token(tokens_file, uuid.uuid4())
    port = free_port()
    env = {
        "MINICHAT_WEB_ENABLED": "true",
        "MINICHAT_WEB_PORT": str(port),
        "MINICHAT_READ_TOKENS_FILE": str(tokens_file),
    }
    async with (
        live_deployment(endpoints, template_database, workdir, env=env) as live,
        aiohttp.ClientSession() as http,
    ):
        found = Worker(live, f"http://127.0.0.1:{port}", http, tokens_file)

        async def ready() -> bool:
            try:
                async with http.get(f"{found.base}/ready") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout=60, what="/ready")
        yield found


async def test_list_hides_the_secret_and_revoke_refuses_the_token_on_the_next_request(worker: Worker) -> None:
    tenant = uuid.uuid4()
    added = run_cli(worker.env, "tokens", "add", "--tenant", str(tenant), "--expires-in", "30")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert await worker.status(token) == 404  # accepted without a restart
    [record] = [r for r in read_tokens(worker.tokens_file) if r.tenant_id == tenant]

    for listing in (("tokens", "list"), ("tokens", "list", "--json")):
        listed = run_cli(worker.env, *listing)
        assert listed.returncode == 0, listed.stderr
        assert record.id in listed.stdout and str(tenant) in listed.stdout
        assert token not in listed.stdout and token_digest(token) not in listed.stdout
    [shown] = [
        t for t in json.loads(run_cli(worker.env, "tokens", "list", "--json").stdout) if t["id"] == record.id
    ]
    assert shown["created_at"] and shown["expires_at"] and shown["expired"] is False

    unknown = run_cli(worker.env, "tokens", "revoke", "0000deadbeef")
    assert unknown.returncode == 2 and "no token has the id" in unknown.stderr
    assert "Traceback" not in unknown.stderr and await worker.status(token) == 404

    revoked = run_cli(worker.env, "tokens", "revoke", record.id)
    assert revoked.returncode == 0, revoked.stderr
    assert await worker.status(token) == 401  # the very next request
    assert record.id not in run_cli(worker.env, "tokens", "list").stdout


async def test_an_expired_token_is_refused(worker: Worker) -> None:
    now = utc_now()
    expired, old = issue_token(
        worker.tokens_file, uuid.uuid4(), expires_in=timedelta(days=1), now=now - timedelta(days=2)
    )
    lasting, _ = issue_token(
        worker.tokens_file, uuid.uuid4(), expires_in=timedelta(days=1), now=now - timedelta(hours=12)
    )
    assert await worker.status(expired) == 401
    assert await worker.status(lasting) == 404
    listed = run_cli(worker.env, "tokens", "list").stdout
    assert next(line for line in listed.splitlines() if line.startswith(old.id)).endswith("(expired)")


async def test_a_malformed_file_keeps_the_last_good_set_and_logs_one_line(worker: Worker) -> None:
    token, _ = issue_token(worker.tokens_file, uuid.uuid4())
    assert await worker.status(token) == 404
    good = worker.tokens_file.read_bytes()
    marker = "MARKER-tokens-file-5e0c"
    broken = worker.tokens_file.with_name("broken.json")
    try:
        for content in ('{"version": 2, "tokens": [' + json.dumps(marker), json.dumps([marker])):
            broken.write_text(content)
            os.replace(broken, worker.tokens_file)
            for _ in range(20):
                assert await worker.status(token) == 404  # the last good set
            assert await worker.status("not-a-token") == 401
    finally:
        broken.write_bytes(good)
        os.replace(broken, worker.tokens_file)
    assert await worker.status(token) == 404
    logs = "\n".join(w.log() for w in worker.live.workers)
    complaints = [line for line in logs.splitlines() if MALFORMED_LOG in line]
    assert len(complaints) == 2, complaints  # one per malformed version, not one per request
    assert "not JSON" in complaints[0] and "keeping the" in complaints[0]
    assert marker not in logs
