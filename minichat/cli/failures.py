"""The one place where a command's failure becomes one line for the operator and an exit status.

Every command lets what it cannot do propagate to `minichat.cli.main`, which asks `explain`: a
dependency it cannot reach (70: run it again when it is back), or a setting, login or file the
operator must fix (2). The line names the setting and the address, never a password and never an
error's own text (a database error can quote a row). Anything else is unexpected: the caller logs
its class and traceback and exits 70.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from minichat.processors.errors import EXIT_FATAL
from minichat.settings import Settings

EXIT_SETUP = 2
"""Exit status for a setup problem the operator must fix (missing schema, topics, bad policy)."""

ADMIN_COMMANDS = frozenset({"db migrate", "db grant-reader", "db revoke-reader"})
"""Commands that log in as MINICHAT_ADMIN_DATABASE_URL (the schema's owner)."""
BOTH_LOGINS = frozenset({"bench", "policy diff"})
"""Commands that use both logins (scratch databases as the admin, workers as themselves)."""

_UNREACHABLE_DB: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset
    socket.gaierror,  # a host name that does not resolve
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.TooManyConnectionsError,  # 53300
)
_REFUSED_LOGIN: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,  # 28000 (and 28P01, wrong password)
    asyncpg.InvalidCatalogNameError,  # 3D000: no such database
)


@dataclass(frozen=True)
class Refusal:
    """What to print (after `minichat COMMAND: `) and the exit status."""

    status: int
    text: str


def option(field: str) -> str:
    """A setting as the operator sets it: `MINICHAT_DATABASE_URL / --database-url`."""
    return f"MINICHAT_{field.upper()} / --{field.replace('_', '-')}"


def address(url: str) -> str:
    """A PostgreSQL URL without its password: `user@host:port/database`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "a malformed URL"
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    where = (f"{user}@" if user else "") + (hosts or "localhost") + (parts.path or "")
    return where


def one_line(text: str) -> str:
    """Whitespace (a YAML error's caret lines) folded into one line."""
    return " ".join(text.split())


def settings_refusal(exc: ValidationError) -> Refusal:
    """Refused settings: each named as the operator sets it, with what is wrong (never the value)."""
    problems = []
    for err in exc.errors(include_url=False):
        message = str(err["msg"]).removeprefix("Value error, ")
        field = str(err["loc"][0]) if err["loc"] else ""
        problems.append(f"{option(field)}: {message}" if field else message)
    return Refusal(EXIT_SETUP, "invalid settings: " + one_line("; ".join(problems)))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _database(settings: Settings, command: str) -> str:
    runtime = f"PostgreSQL at {address(settings.database_url)} ({option('database_url')})"
    admin = f"PostgreSQL at {address(settings.admin_url)} ({option('admin_database_url')})"
    if command in ADMIN_COMMANDS:
        return admin
    if command in BOTH_LOGINS and settings.admin_database_url is not None:
        return f"{runtime} or {admin}"
    return runtime


def explain(exc: BaseException, settings: Settings, command: str) -> Refusal | None:
    """The operator's line for a failure of `command`, or None when it is unexpected."""
    from minichat.models.policy import PolicyError

    for seen in _chain(exc):
        kind = type(seen).__name__
        if isinstance(seen, PolicyError):
            # a file given on the command line (`policy check FILE`) is named by the error itself
            setting = f"{option('policy_file')}: " if seen.path == settings.policy_file else ""
            return Refusal(EXIT_SETUP, f"{setting}{one_line(str(seen))}")
        if isinstance(seen, KafkaError):
            servers = settings.kafka_bootstrap_servers
            return Refusal(
                EXIT_FATAL,
                f"cannot reach Kafka at {servers} ({option('kafka_bootstrap_servers')}): {kind}",
            )
        if isinstance(seen, asyncpg.ClientConfigurationError):
            return Refusal(EXIT_SETUP, f"{_database(settings, command)} is not a usable URL: {kind}")
        if isinstance(seen, _REFUSED_LOGIN):
            return Refusal(EXIT_SETUP, f"{_database(settings, command)} refused the login: {kind}")
        if isinstance(seen, _UNREACHABLE_DB):
            return Refusal(EXIT_FATAL, f"cannot reach {_database(settings, command)}: {kind}")
        if isinstance(seen, OSError) and seen.filename is not None:
            return Refusal(EXIT_SETUP, f"{seen.filename}: {seen.strerror or kind}")
    return None
