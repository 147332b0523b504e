"""The `minichat` command: the only place that reads the environment and starts things."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from minichat.processors.errors import EXIT_FATAL, failure_report
from minichat.settings import Settings

logger = logging.getLogger("minichat")

# Exit status for a setup problem the operator must fix (missing schema, topics, bad policy).
EXIT_SETUP = 2

_SETTING_OPTIONS: dict[str, tuple[str, type]] = {
    "kafka_bootstrap_servers": ("Kafka brokers, host:port[,host:port]", str),
    "database_url": ("PostgreSQL DSN", str),
    "topic_prefix": ("prefix of every topic name", str),
    "group_id": ("consumer group of the workers", str),
    "partitions": ("partitions of every topic created", int),
    "policy_file": ("quota policy YAML file", Path),
    "web_port": ("health and metrics port of a worker", int),
}


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (default: MINICHAT_* environment, then built-in)")
    for field, (text, kind) in _SETTING_OPTIONS.items():
        group.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=kind,
            default=None,
            help=f"{text} [MINICHAT_{field.upper()}]",
        )


def build_settings(args: argparse.Namespace) -> Settings:
    overrides = {k: getattr(args, k) for k in _SETTING_OPTIONS if getattr(args, k, None) is not None}
    return Settings(**overrides)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


async def _db_grant_reader(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.readers import ReaderError, grant_reader

    con = await connect(settings)
    try:
        await grant_reader(con, args.role, args.tenant)
    except ReaderError as exc:
        print(f"minichat db grant-reader: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        await con.close()
    print(f"{args.role} reads tenant {args.tenant}")
    return 0


async def _db_revoke_reader(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.readers import revoke_reader

    con = await connect(settings)
    try:
        tenant = await revoke_reader(con, args.role)
    finally:
        await con.close()
    print(
        f"{args.role} no longer reads tenant {tenant}" if tenant else f"{args.role} was not bound to a tenant"
    )
    return 0


def _tokens_add(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.processors.read_api import add_token

    if settings.read_tokens_file is None:
        print("minichat tokens add: set MINICHAT_READ_TOKENS_FILE (where the digests go)", file=sys.stderr)
        return EXIT_SETUP
    print(add_token(settings.read_tokens_file, args.tenant))
    return 0


async def _db_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.schema import migrate

    con = await connect(settings)
    try:
        applied = await migrate(con)
    finally:
        await con.close()
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("schema is up to date")
    return 0


async def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.processors.topics import create_topics

    report = await create_topics(settings, replication_factor=args.replication_factor)
    for name in report.created:
        print(f"created {name}")
    for name in report.existing:
        print(f"exists  {name}")
    for name in report.reconfigured:
        print(f"reconfigured {name}")
    return 0


async def _preflight(settings: Settings) -> list[str]:
    """Reasons the worker must not start; each names what fixes it."""
    from minichat.models.policy import PolicyError, load_policy
    from minichat.processors.topics import topic_problems
    from minichat.storage.db import connect
    from minichat.storage.policies import PolicyConflict, ensure_policy_version
    from minichat.storage.schema import pending_migrations

    problems: list[str] = []
    try:
        policy = load_policy(settings.policy_file)
    except PolicyError as exc:
        return [str(exc)]
    con = await connect(settings)
    try:
        pending = await pending_migrations(con)
        if pending:
            problems.append(
                f"the database schema is missing or old ({len(pending)} migration(s) pending): "
                "run `minichat db migrate`"
            )
        else:
            try:
                await ensure_policy_version(con, policy)
            except PolicyConflict as exc:
                problems.append(f"{settings.policy_file}: {exc}")
    finally:
        await con.close()
    problems += await topic_problems(settings)
    return problems


def _checked_start(command: str, settings: Settings) -> int | None:
    """The exit status when `command` must not start (printed reasons), else None."""
    import asyncpg
    from aiokafka.errors import KafkaError

    from minichat.processors.errors import dependency_of
    from minichat.storage.schema import MigrationError

    try:
        problems = asyncio.run(_preflight(settings))
    except MigrationError as exc:
        print(f"minichat {command}: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, KafkaError) as exc:
        where = (
            f"Kafka at {settings.kafka_bootstrap_servers}"
            if dependency_of(exc) == "Kafka"
            else "PostgreSQL (MINICHAT_DATABASE_URL)"
        )
        print(f"minichat {command}: cannot reach {where}: {type(exc).__name__}", file=sys.stderr)
        return EXIT_FATAL
    for problem in problems:
        print(f"minichat {command}: {problem}", file=sys.stderr)
    return EXIT_SETUP if problems else None


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import faust

    from minichat.processors.app import create_app

    refused = _checked_start("worker", settings)
    if refused is not None:
        return refused
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0  # pragma: no cover (execute_from_commandline exits)


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.tools.simulator import SimulateOptions, simulate

    options = SimulateOptions(
        tenants=args.tenants,
        users_per_tenant=args.users_per_tenant,
        chats_per_user=args.chats_per_user,
        turns_per_chat=args.turns_per_chat,
        seed=args.seed,
        timeout=args.timeout,
        step_timeout=args.step_timeout,
        concurrency=args.concurrency,
    )
    return _run(simulate(settings, options))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _from_time(text: str) -> Any:
    from minichat.tools.rebuild import parse_time

    try:
        return parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from minichat.models.policy import PolicyError
    from minichat.storage.policies import PolicyConflict
    from minichat.tools.rebuild import RebuildSetupError as ReplaySetupError
    from minichat.tools.rebuild import run_rebuild as run_replay

    refused = _checked_start("replay", settings)
    if refused is not None:
        return refused
    try:
        summary = asyncio.run(
            run_replay(settings, from_time=args.from_time, show_progress=not args.no_progress)
        )
    except (ReplaySetupError, PolicyError, PolicyConflict) as exc:
        print(f"minichat replay: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print(
            "minichat replay: interrupted (each batch is its own transaction: run it again)", file=sys.stderr
        )
        return 130
    except Exception as exc:
        # Each applied batch committed on its own and re-applying is a no-op: running it again is safe.
        logger.critical("replay failed; it is safe to run it again: %s", failure_report(exc))
        return EXIT_FATAL
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    else:
        print("\n".join(summary.lines()))
    return 0


async def _digest(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.digest import DigestError, digest

    con = await connect(settings)
    try:
        result = await digest(con)
    except DigestError as exc:
        print(f"minichat digest: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        await con.close()
    if args.tables:
        width = max(len(t) for t in result.tables)
        for table, value in result.tables.items():
            print(f"{table:<{width}}  {value}")
        print(f"{'total':<{width}}  {result.total}")
    else:
        print(result.total)
    return 0


def _bench(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.bench import run_bench
    from minichat.bench.options import options_from_args

    return _run(run_bench(settings, options_from_args(args)))


def _schema_export(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.models.schema import export_schemas

    for path in export_schemas(args.out):
        print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minichat", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        sub: Any, name: str, help_text: str, run: Callable[[Settings, argparse.Namespace], Any]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
        _add_setting_options(p)
        p.set_defaults(run=run)
        return p

    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    command(db, "migrate", "create or upgrade the schema (idempotent)", lambda s, a: _run(_db_migrate(s, a)))
    grant = command(
        db,
        "grant-reader",
        "let an existing database login read one tenant's rows, and only those, whatever it sets",
        lambda s, a: _run(_db_grant_reader(s, a)),
    )
    grant.add_argument("--tenant", type=uuid.UUID, required=True, help="the tenant the login may read")
    grant.add_argument(
        "--role", required=True, help="the login (created beforehand with CREATE ROLE ... LOGIN)"
    )
    revoke = command(
        db,
        "revoke-reader",
        "take a login's reader grant and tenant away",
        lambda s, a: _run(_db_revoke_reader(s, a)),
    )
    revoke.add_argument("--role", required=True, help="the login")

    tokens = commands.add_parser("tokens", help="read API tokens").add_subparsers(
        dest="tokens_command", required=True
    )
    add_token = command(
        tokens,
        "add",
        "print a new read-API token for one tenant and record its digest in MINICHAT_READ_TOKENS_FILE",
        _tokens_add,
    )
    add_token.add_argument("--tenant", type=uuid.UUID, required=True, help="the tenant the token reads")

    topics = commands.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="topics_command", required=True
    )
    create = command(
        topics, "create", "create the contract's topics (idempotent)", lambda s, a: _run(_topics_create(s, a))
    )
    create.add_argument("--replication-factor", type=int, default=1)

    command(commands, "worker", "run the processor until SIGTERM", _worker)

    simulate = command(
        commands,
        "simulate",
        "play realistic gateway traffic through a running deployment, then check its books "
        "(exit 0 when every invariant holds, 1 otherwise)",
        _simulate,
    )
    simulate.add_argument("--tenants", type=_positive_int, default=4, help="tenants (default 4)")
    simulate.add_argument(
        "--users-per-tenant", type=_positive_int, default=5, help="users per tenant (default 5)"
    )
    simulate.add_argument(
        "--chats-per-user", type=_positive_int, default=3, help="chats per user (default 3)"
    )
    simulate.add_argument(
        "--turns-per-chat", type=_positive_int, default=4, help="turns per chat (default 4)"
    )
    simulate.add_argument(
        "--seed", type=int, default=None, help="seed of every choice (default: random, printed)"
    )
    simulate.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="seconds to wait, after the traffic, for the processor to settle everything (default 120)",
    )
    simulate.add_argument(
        "--step-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds to wait for one decision or one turn to leave running (default 30)",
    )
    simulate.add_argument(
        "--concurrency", type=_positive_int, default=32, help="chats played at once (default 32)"
    )

    replay = command(
        commands,
        "replay",
        "re-consume the input topics up to their current end into the database; no decision, "
        "dead letter or billing event is re-sent; prints a summary",
        _replay,
    )
    replay.add_argument(
        "--from-time",
        type=_from_time,
        default=None,
        metavar="RFC3339",
        help="start at the first record at or after this time (e.g. 2025-01-31T12:00:00Z); "
        "default: the beginning of the topics",
    )
    replay.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    replay.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    digest = command(
        commands,
        "digest",
        "print a sha256 of the stored state, all tenants (CONTRACT section 9)",
        lambda s, a: _run(_digest(s, a)),
    )
    digest.add_argument("--tables", action="store_true", help="one digest per table, then the total")

    from minichat.bench.options import add_arguments as add_bench_arguments

    add_bench_arguments(
        command(
            commands,
            "bench",
            "measure the ceiling, a backlog drain, decision latency and replay on scratch "
            "databases and topics; prints a table (docs/performance.md)",
            _bench,
        )
    )

    schema = commands.add_parser("schema", help="JSON Schemas of the events").add_subparsers(
        dest="schema_command", required=True
    )
    export = command(schema, "export", "write docs/schemas/*.json from the models", _schema_export)
    export.add_argument("--out", type=Path, default=Path("docs/schemas"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = build_settings(args)
    except ValidationError as exc:
        print(f"minichat: invalid settings: {exc}", file=sys.stderr)
        return EXIT_SETUP
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # aiokafka logs every produced record's key and value at DEBUG: message content, never logged.
    logging.getLogger("aiokafka.producer.producer").setLevel(max(logging.INFO, logging.root.level))
    try:
        result: int = args.run(settings, args)
    except Exception as exc:  # every command's last resort: no exception text (it can quote a row)
        logger.critical("minichat %s failed: %s", _command_name(args), failure_report(exc))
        return EXIT_FATAL
    return result


def _command_name(args: argparse.Namespace) -> str:
    return " ".join(str(v) for k, v in vars(args).items() if k == "command" or (k.endswith("_command") and v))


if __name__ == "__main__":
    sys.exit(main())
