"""Every command, as a user runs it, with a database or broker it cannot reach, a malformed URL
or a bad policy file: one line on stderr naming the setting and the address (never the
password), and the exit status of docs/operations.md, "Exit codes" (70: a dependency is away, run
it again; 2: fix the setup)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest

from minichat import cli
from minichat.settings import PACKAGED_POLICY
from tests.conftest import Deployment, deployment_settings
from tests.support import Endpoints, run_cli
from tests.unit.test_cli_failures import _leaves

pytestmark = pytest.mark.integration

PASSWORD = "pw-3b1d-never-shown"

# Each command, its arguments, and the dependencies it uses (a malformed URL is refused for all).
COMMANDS: dict[str, tuple[list[str], set[str]]] = {
    "worker": ([], {"database", "broker", "policy"}),
    "rebuild": (["--no-progress"], {"database", "broker", "policy"}),
    "policy check": (["unused-policy.yaml"], set()),
    "policy diff": (["--candidate", str(PACKAGED_POLICY)], {"database", "broker"}),
    "digest": ([], {"database"}),
    "simulate": (
        ["--tenants", "1", "--users-per-tenant", "1", "--chats-per-user", "1", "--turns-per-chat", "1"],
        {"database", "broker", "policy"},
    ),
    "bench": (["--phases", "ceiling", "--turns", "100"], {"database", "broker"}),
    "db migrate": ([], {"database"}),
    "db grant-reader": (["--tenant", str(uuid.uuid4()), "--role", "nobody"], {"database"}),
    "db revoke-reader": (["--role", "nobody"], {"database"}),
    "topics create": ([], {"broker"}),
    "tokens add": (["--tenant", str(uuid.uuid4())], set()),
    "tokens list": ([], set()),
    "tokens revoke": (["0123456789ab"], set()),
    "schema export": (["--out", "unused"], set()),
}
ADMIN = {"db migrate", "db grant-reader", "db revoke-reader"}

CASES = [
    pytest.param(command, condition, id=f"{command}-{condition}")
    for command, (_, uses) in COMMANDS.items()
    for condition in ("database", "broker", "url", "policy")
    if condition in uses or condition == "url"
]


def closed_port() -> int:
    """A local port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_the_table_lists_every_command() -> None:
    parser = cli._parser()
    assert {leaf.prog.removeprefix(parser.prog).strip() for leaf in _leaves(parser)} == set(COMMANDS)


@pytest.mark.parametrize(("command", "condition"), CASES)
async def test_a_command_names_what_to_fix_in_one_line(
    command: str, condition: str, endpoints: Endpoints, database_url: str, tmp_path: Path
) -> None:
    env = Deployment(deployment_settings(endpoints, database_url)).env()
    env["MINICHAT_READ_TOKENS_FILE"] = str(tmp_path / "tokens")
    port = closed_port()
    if condition == "database":
        url = f"postgresql://minichat:{PASSWORD}@127.0.0.1:{port}/minichat"
        env["MINICHAT_DATABASE_URL"] = env["MINICHAT_ADMIN_DATABASE_URL"] = url
        status = 70
        setting = "MINICHAT_ADMIN_DATABASE_URL" if command in ADMIN else "MINICHAT_DATABASE_URL"
        named = [setting, f"127.0.0.1:{port}/minichat", "cannot reach PostgreSQL"]
    elif condition == "broker":
        env["MINICHAT_KAFKA_BOOTSTRAP_SERVERS"] = f"127.0.0.1:{port}"
        status, named = 70, ["MINICHAT_KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{port}", "cannot reach Kafka"]
    elif condition == "url":
        env["MINICHAT_DATABASE_URL"] = "foo"
        status, named = 2, ["MINICHAT_DATABASE_URL / --database-url", "not a PostgreSQL URL"]
    else:
        policy = tmp_path / "policy.yaml"
        policy.write_text(PACKAGED_POLICY.read_text() + "\nbogus_field: 1\n")
        env["MINICHAT_POLICY_FILE"] = str(policy)
        status, named = 2, ["MINICHAT_POLICY_FILE / --policy-file", "bogus_field"]
    args, _ = COMMANDS[command]
    result = run_cli(env, *command.split(), *args, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"minichat {command}: "), result.stderr
    assert all(part in lines[0] for part in named), lines[0]
    assert PASSWORD not in result.stderr + result.stdout


async def test_digest_refuses_a_malformed_url_given_as_an_option(
    endpoints: Endpoints, database_url: str
) -> None:
    env = Deployment(deployment_settings(endpoints, database_url)).env()
    result = run_cli(env, "digest", "--database-url", "foo")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "minichat digest: invalid settings: MINICHAT_DATABASE_URL / --database-url: not a PostgreSQL "
        "URL: it must start with postgresql://"
    ]
