"""The `minichat` command: the only place that reads the environment and starts things."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

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
    from minichat.processors.topics import missing_topics
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
    missing = await missing_topics(settings)
    if missing:
        problems.append(f"topics missing: {', '.join(missing)}: run `minichat topics create`")
    return problems


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    import faust

    from minichat.processors.app import create_app

    problems = asyncio.run(_preflight(settings))
    if problems:
        for problem in problems:
            print(f"minichat worker: {problem}", file=sys.stderr)
        return EXIT_SETUP
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0  # pragma: no cover (execute_from_commandline exits)


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

    topics = commands.add_parser("topics", help="Kafka topics").add_subparsers(
        dest="topics_command", required=True
    )
    create = command(
        topics, "create", "create the contract's topics (idempotent)", lambda s, a: _run(_topics_create(s, a))
    )
    create.add_argument("--replication-factor", type=int, default=1)

    command(commands, "worker", "run the processor until SIGTERM", _worker)

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
    result: int = args.run(settings, args)
    return result


if __name__ == "__main__":
    sys.exit(main())
