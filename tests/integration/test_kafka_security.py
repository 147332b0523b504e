"""Kafka over SASL_SSL with ACLs: a broker started by `scripts/stack.sh up-kafka` in secure mode
(its own state dir and ports, the jar cache of the normal stack), minichat's principal creating
its topics and running a worker, a `GatewayClient` as the gateway principal sending a turn end to
end, and that principal refused where docs/security.md says it is.

minichat's principal creates the topics itself (it holds every operation on its topic prefix), as
a deployment whose operator lets `minichat topics create` run under the worker's user would."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from pydantic import SecretStr

from minichat.client import GatewayClient
from minichat.kafka_security import KafkaSecurity
from minichat.models.events import Usage
from minichat.models.topics import TopicNames
from minichat.processors.topics import create_topics
from minichat.settings import Settings
from minichat.tools.kafka import read_topic
from tests.support import ROOT, Endpoints, run_worker, scratch_database, wait_until

pytestmark = pytest.mark.integration

PREFIX = "minichat."  # the topic prefix the stack's ACLs cover (its default)
GROUP = "minichat"


@dataclass(frozen=True)
class SecureBroker:
    bootstrap: str
    ca_file: Path
    secrets: Path  # <user>.password files

    def password(self, user: str) -> str:
        return (self.secrets / f"{user}.password").read_text().strip()


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stack_env(state_dir: Path) -> dict[str, str]:
    """Its own state dir and ports; the jar cache of the normal stack (no download when it ran)."""
    libs = os.environ.get("MINICHAT_STACK_KAFKA_LIBS") or str(
        Path(os.environ.get("MINICHAT_STACK_DIR") or ROOT / ".stack") / "kafka" / "libs"
    )
    port, controller = _free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICHAT_")}
    env.update(
        MINICHAT_STACK_DIR=str(state_dir),
        MINICHAT_STACK_KAFKA_LIBS=libs,
        MINICHAT_STACK_KAFKA_PORT=str(port),
        MINICHAT_STACK_KAFKA_CONTROLLER_PORT=str(controller),
        MINICHAT_STACK_KAFKA_SECURE="1",
        MINICHAT_STACK_KAFKA_TOPIC_PREFIX=PREFIX,
        MINICHAT_STACK_KAFKA_GROUP_ID=GROUP,
    )
    if "MINICHAT_STACK_MVN_ARGS" in os.environ:
        env["MINICHAT_STACK_MVN_ARGS"] = os.environ["MINICHAT_STACK_MVN_ARGS"]
    return env


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    env = _stack_env(tmp_path_factory.mktemp("kafka-secure"))
    stack = [str(ROOT / "scripts" / "stack.sh")]
    started = subprocess.run(
        [*stack, "up-kafka"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in started.stdout.splitlines()
            if line.startswith("export ")
        )
        assert exports["MINICHAT_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert exports["MINICHAT_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        yield SecureBroker(
            exports["MINICHAT_KAFKA_BOOTSTRAP_SERVERS"],
            Path(exports["MINICHAT_KAFKA_SSL_CAFILE"]),
            Path(exports["MINICHAT_STACK_KAFKA_SECURE_DIR"]),
        )
    finally:
        subprocess.run([*stack, "stop-kafka"], env=env, capture_output=True, timeout=120, check=False)


def _minichat_settings(broker: SecureBroker, database_url: str) -> Settings:
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="minichat",
        kafka_sasl_password_file=broker.secrets / "minichat.password",
        kafka_ssl_cafile=broker.ca_file,
        database_url=database_url,
        topic_prefix=PREFIX,
        group_id=GROUP,
        partitions=2,
        web_enabled=False,
    )


def _worker_env(settings: Settings, password: str) -> dict[str, str]:
    """The worker's settings from the environment, the password in MINICHAT_KAFKA_SASL_PASSWORD."""
    return {
        "MINICHAT_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "MINICHAT_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "MINICHAT_KAFKA_SASL_MECHANISM": str(settings.kafka_sasl_mechanism),
        "MINICHAT_KAFKA_SASL_USERNAME": str(settings.kafka_sasl_username),
        "MINICHAT_KAFKA_SASL_PASSWORD": password,
        "MINICHAT_KAFKA_SSL_CAFILE": str(settings.kafka_ssl_cafile),
        "MINICHAT_DATABASE_URL": settings.database_url,
        "MINICHAT_TOPIC_PREFIX": settings.topic_prefix,
        "MINICHAT_GROUP_ID": settings.group_id,
        "MINICHAT_PARTITIONS": str(settings.partitions),
        "MINICHAT_WEB_ENABLED": "false",
        "MINICHAT_LOG_LEVEL": "INFO",
    }


def _gateway(broker: SecureBroker) -> GatewayClient:
    return GatewayClient(
        broker.bootstrap,
        PREFIX,
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="gateway",
        sasl_password=broker.password("gateway"),
        ssl_cafile=broker.ca_file,
    )


@pytest.fixture(scope="module")
async def secure_database(endpoints: Endpoints, template_database: str) -> AsyncIterator[str]:
    async with scratch_database(endpoints.database_url, "ks", template=template_database) as url:
        yield url


async def test_traffic_flows_over_sasl_ssl_and_the_gateway_reads_no_dead_letters(
    secure_broker: SecureBroker, secure_database: str, tmp_path: Path
) -> None:
    settings = _minichat_settings(secure_broker, secure_database)
    names = TopicNames(PREFIX)
    report = await create_topics(settings)  # as minichat's principal
    assert names.dead_letters in report.created + report.existing
    password = secure_broker.password("minichat")
    log_path = tmp_path / "worker.log"
    tenant, user, chat, request = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with run_worker(_worker_env(settings, password), log_path) as worker:
        command_line = await asyncio.to_thread(Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes)
        assert password.encode() not in command_line  # what `ps` shows
        async with _gateway(secure_broker) as gateway:
            decision = await gateway.request_turn(
                tenant_id=tenant,
                chat_id=chat,
                user_id=user,
                request_id=request,
                content="hi",
                model="gpt-5-mini",
            )
            assert (decision.decision, decision.request_id) == ("allow", request), decision
            await gateway.completed(
                tenant_id=tenant,
                chat_id=chat,
                request_id=request,
                content="hello",
                usage=Usage(input_tokens=3, output_tokens=5),
            )
            db = await asyncpg.connect(secure_database)
            try:

                async def settled() -> bool:
                    return bool(
                        await db.fetchval(
                            "SELECT settled_at IS NOT NULL FROM chat_turns"
                            " WHERE tenant_id = $1 AND request_id = $2",
                            tenant,
                            request,
                        )
                    )

                await wait_until(settled, timeout=30, what="the turn settled over SASL_SSL")
            finally:
                await db.close()

            async def billed() -> bool:
                events = [json.loads(v) for _, v in await read_topic(settings, names.billing_usage) if v]
                return any(e.get("request_id") == str(request) for e in events)

            await wait_until(billed, timeout=30, what="the billing event, read as minichat's principal")

        # the gateway's principal: no dead letters, no forged decisions
        gateway_security = KafkaSecurity(
            protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_username="gateway",
            sasl_password=SecretStr(secure_broker.password("gateway")),
            ssl_cafile=secure_broker.ca_file,
        )
        options = {"bootstrap_servers": secure_broker.bootstrap, **gateway_security.client_options()}
        letters = AIOKafkaConsumer(names.dead_letters, group_id=None, enable_auto_commit=False, **options)
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(letters.start(), 30)
        finally:
            await letters.stop()
        forger = AIOKafkaProducer(**options)
        await forger.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(forger.send_and_wait(names.turn_decisions, b"{}", key=b"x"), 30)
        finally:
            await forger.stop()
        # minichat's principal does read them (nothing was dead-lettered)
        assert await read_topic(settings, names.dead_letters) == []
        assert worker.terminate() == 0, worker.log()[-3000:]
    log = await asyncio.to_thread(log_path.read_text, errors="replace")
    assert "Authenticated as minichat via SCRAM-SHA-512" in log
    assert password not in log and secure_broker.password("gateway") not in log
