"""The `minichat` command line: parses the options, builds the settings once, runs one command.

Every command's own code is imported when it runs, so `minichat --help` stays quick.
"""

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
    "kafka_bootstrap_servers": ("Kafka brokers to connect to, host:port[,host:port...]", str),
    "database_url": ("PostgreSQL connection URL", str),
    "topic_prefix": ("prefix of every topic name, to run several deployments on one cluster", str),
    "group_id": ("consumer group the workers share", str),
    "partitions": ("partitions of every topic, and the count the worker expects", int),
    "policy_file": ("the quota policy, a YAML file", Path),
    "web_port": ("port of a worker's health checks, metrics and read API", int),
    "web_host": ("address a worker's web server listens on", str),
    "read_tokens_file": ("file of read API token digests, written by `minichat tokens add`", Path),
}

_DEFAULT_IN_WORDS = {
    "policy_file": "the packaged example policy",
    "read_tokens_file": "none, and the read API refuses every token",
}


def _add_setting_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "settings", "Each setting is also read from its MINICHAT_* environment variable; an option wins."
    )
    for field, (text, kind) in _SETTING_OPTIONS.items():
        default = _DEFAULT_IN_WORDS.get(field, Settings.model_fields[field].default)
        group.add_argument(
            "--" + field.replace("_", "-"),
            dest=field,
            type=kind,
            default=None,
            metavar=field.split("_")[-1].upper(),
            help=f"{text} (default: $MINICHAT_{field.upper()}, else {default})",
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
        print(
            "minichat tokens add: set MINICHAT_READ_TOKENS_FILE or --read-tokens-file "
            "(the file the token's digest goes to)",
            file=sys.stderr,
        )
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


_Run = Callable[[Settings, argparse.Namespace], Any]
_Group = Any  # what add_subparsers returns (argparse keeps its class private)

_DESCRIPTION = (
    "minichat decides, reserves, stores and settles the chat turns of multi-tenant LLM gateways: a "
    "Kafka stream processor that keeps its books in PostgreSQL. To run it: `minichat db migrate`, "
    "`minichat topics create`, then `minichat worker`. Every command also takes the settings "
    "options (--database-url, ...); each setting can come from a MINICHAT_* environment variable instead."
)
_EPILOG = (
    "The contract, the gateway guide and the operator's guide are docs/contract.md, "
    "docs/gateway-guide.md and docs/operations.md in the project. Run `minichat COMMAND --help` "
    "for a command's options."
)


def _command(group: _Group, name: str, summary: str, description: str, run: _Run) -> argparse.ArgumentParser:
    """A command: one line for the list, a paragraph for its own --help, and the settings options."""
    parser: argparse.ArgumentParser = group.add_parser(name, help=summary, description=description)
    _add_setting_options(parser)
    parser.set_defaults(run=run)
    return parser


def _subcommands(group: _Group, name: str, summary: str) -> _Group:
    """A command that only groups others (`minichat db ...`)."""
    parser = group.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND", title="commands")


def _add_worker(group: _Group) -> None:
    _command(
        group,
        "worker",
        "run the processor until SIGTERM",
        "Run the processor: consume the gateways' topics, decide, reserve, store and settle every "
        "turn, and publish the decisions and billing events, until SIGTERM (it finishes the batch in "
        "hand, commits and exits 0). It refuses to start, naming the command to run, when the schema "
        "or the topics are missing or the policy file is invalid. Exit status: 0 after SIGTERM; 2 when "
        "the setup is wrong (the message names the fix); 70 when PostgreSQL or Kafka stayed away "
        "longer than the give-up time or an unexpected error stopped it (restart it: nothing is lost).",
        _worker,
    )


def _add_db(group: _Group) -> None:
    db = _subcommands(group, "db", "manage the database: schema and reader logins")
    _command(
        db,
        "migrate",
        "create or upgrade the database schema (safe to run again)",
        "Create the database schema, or upgrade it to this version's. Applied migrations are "
        "recorded with their checksums, so running it again changes nothing.",
        lambda s, a: _run(_db_migrate(s, a)),
    )
    grant = _command(
        db,
        "grant-reader",
        "let an existing database login read one tenant's rows, and only those",
        "Bind an existing database login to one tenant: it may then read that tenant's rows and no "
        "others, whatever it sets in its session (row-level security). Create the login first, "
        "with CREATE ROLE ... LOGIN.",
        lambda s, a: _run(_db_grant_reader(s, a)),
    )
    grant.add_argument(
        "--tenant", type=uuid.UUID, required=True, help="the tenant (a UUID) whose rows the login may read"
    )
    grant.add_argument("--role", required=True, help="the database login, created beforehand")
    revoke = _command(
        db,
        "revoke-reader",
        "take a login's reader grant and tenant away",
        "Take a database login's reader grant and its tenant away; it reads nothing afterwards.",
        lambda s, a: _run(_db_revoke_reader(s, a)),
    )
    revoke.add_argument("--role", required=True, help="the database login")


def _add_topics(group: _Group) -> None:
    topics = _subcommands(group, "topics", "manage the Kafka topics")
    create = _command(
        topics,
        "create",
        "create the topics with their settings (safe to run again)",
        "Create the six topics with MINICHAT_PARTITIONS partitions, broker-stamped timestamps "
        "(LogAppendTime) and infinite retention. An existing topic is checked: a wrong partition "
        "count is an error, and settings that differ are set again.",
        lambda s, a: _run(_topics_create(s, a)),
    )
    create.add_argument(
        "--replication-factor",
        type=int,
        default=1,
        metavar="N",
        help="copies of each new topic's partitions (default: 1; 3 on a production cluster)",
    )


def _add_tokens(group: _Group) -> None:
    tokens = _subcommands(group, "tokens", "manage read API tokens")
    add = _command(
        tokens,
        "add",
        "print a new read API token for one tenant",
        "Print a new read API token for one tenant, and record its SHA-256 digest in "
        "MINICHAT_READ_TOKENS_FILE (created if missing). The token itself is not stored: keep the "
        "printed one. Running workers take a new token without a restart.",
        _tokens_add,
    )
    add.add_argument("--tenant", type=uuid.UUID, required=True, help="the tenant (a UUID) the token reads")


def _add_replay(group: _Group) -> None:
    replay = _command(
        group,
        "replay",
        "apply the input topics to the database again, sending nothing",
        "Re-consume the input topics, from the beginning or from --from-time, up to their end when it "
        "starts, and apply them through the worker's own processors; a command with a recorded "
        "decision is applied as it was decided. Nothing is sent: no decision, dead letter or billing "
        "event. Over the live database it changes nothing; into an empty, migrated database it "
        "rebuilds the books. Run it while the workers are caught up or stopped. Prints a summary.",
        _replay,
    )
    replay.add_argument(
        "--from-time",
        type=_from_time,
        default=None,
        metavar="RFC3339",
        help="start at the first record at or after this time, with its offset, e.g. "
        "2025-01-31T12:00:00Z (default: the beginning of the topics)",
    )
    replay.add_argument(
        "--no-progress", action="store_true", help="do not draw the progress bar on stderr (default: drawn)"
    )
    replay.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object (default: as lines)"
    )


def _add_digest(group: _Group) -> None:
    digest = _command(
        group,
        "digest",
        "print a digest of the stored state, to compare two databases",
        "Print one SHA-256 hex digest of the stored state of all tenants: chats, turns, messages, "
        "quota rows, decisions and billing events, every column except the processing-clock ones. "
        "Equal digests mean equal books: compare the live database with a rebuild by `minichat replay`.",
        lambda s, a: _run(_digest(s, a)),
    )
    digest.add_argument(
        "--tables", action="store_true", help="one digest per table, then the total (default: the total)"
    )


def _add_simulate(group: _Group) -> None:
    simulate = _command(
        group,
        "simulate",
        "play realistic gateway traffic through a running deployment, then check its books",
        "Play realistic gateway traffic through a running deployment (completions, failures, "
        "cancellations, retries, edits, deletes, duplicates, late usage, a user who runs out of "
        "quota), wait until the processor is quiet, then check the books. Exit status: 0 when every "
        "invariant holds, 1 otherwise.",
        _simulate,
    )
    add = simulate.add_argument
    add("--tenants", type=_positive_int, default=4, metavar="N", help="tenants (default: 4)")
    add(
        "--users-per-tenant", type=_positive_int, default=5, metavar="N", help="users per tenant (default: 5)"
    )
    add("--chats-per-user", type=_positive_int, default=3, metavar="N", help="chats per user (default: 3)")
    add("--turns-per-chat", type=_positive_int, default=4, metavar="N", help="turns per chat (default: 4)")
    add("--seed", type=int, default=None, help="seed of every choice (default: random, and printed)")
    add(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="S",
        help="seconds to wait, after the traffic, for the processor to settle everything (default: 120)",
    )
    add(
        "--step-timeout",
        type=_positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for one decision, or for one turn to end (default: 30)",
    )
    add(
        "--concurrency",
        type=_positive_int,
        default=32,
        metavar="N",
        help="chats played at once (default: 32)",
    )


def _add_bench(group: _Group) -> None:
    from minichat.bench.options import add_arguments

    bench = _command(
        group,
        "bench",
        "measure throughput, decision latency and rebuilds on scratch databases and topics",
        "Measure, on scratch databases and topics that are removed afterwards: what PostgreSQL takes "
        "(the ceiling), how fast workers drain a backlog, how long a command waits for its decision "
        "at given rates, and how fast a replay runs. Prints tables; takes minutes.",
        _bench,
    )
    add_arguments(bench)


def _add_schema(group: _Group) -> None:
    schema = _subcommands(group, "schema", "JSON Schemas of the events")
    export = _command(
        schema,
        "export",
        "write the JSON Schemas of the events and the policy file",
        "Write one JSON Schema per event type, and one of the policy file, into a directory; other "
        "*.json files there are deleted.",
        _schema_export,
    )
    export.add_argument(
        "--out",
        type=Path,
        default=Path("docs/schemas"),
        metavar="DIR",
        help="directory to write into (default: docs/schemas)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minichat", description=_DESCRIPTION, epilog=_EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add in (
        _add_worker,
        _add_db,
        _add_topics,
        _add_replay,
        _add_digest,
        _add_tokens,
        _add_simulate,
        _add_bench,
        _add_schema,
    ):
        add(commands)
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
