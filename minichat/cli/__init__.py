"""The `minichat` command line: parses the options, builds the settings once, runs one command.

Every command's own code is imported when it runs, so `minichat --help` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from minichat.cli import commands
from minichat.cli.failures import EXIT_SETUP, explain, settings_refusal
from minichat.processors.errors import EXIT_FATAL, failure_report
from minichat.settings import Settings

logger = logging.getLogger("minichat")


_SETTING_OPTIONS: dict[str, tuple[str, type]] = {
    "kafka_bootstrap_servers": ("Kafka brokers to connect to, host:port[,host:port...]", str),
    "kafka_security_protocol": ("how Kafka clients connect: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", str),
    "kafka_sasl_mechanism": ("SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", str),
    "kafka_sasl_username": ("SASL user name", str),
    # The password itself has no option (it would show in `ps`): $MINICHAT_KAFKA_SASL_PASSWORD or this.
    "kafka_sasl_password_file": (
        "file holding the SASL password (or set $MINICHAT_KAFKA_SASL_PASSWORD)",
        Path,
    ),
    "kafka_ssl_cafile": ("PEM file of the CAs that sign the brokers' certificates", Path),
    "kafka_ssl_certfile": ("PEM file of the client certificate, for brokers that require one", Path),
    "kafka_ssl_keyfile": ("PEM file of the client certificate's private key", Path),
    "database_url": ("PostgreSQL connection URL of the worker's own login", str),
    "admin_database_url": ("PostgreSQL URL of the login that owns the schema (db commands)", str),
    "topic_prefix": ("prefix of every topic name, to run several deployments on one cluster", str),
    "group_id": ("consumer group the workers share", str),
    "partitions": ("partitions of every topic, and the count the worker expects", int),
    "replication_factor": (
        "copies of each partition of the topics `topics create` makes (min.insync.replicas: one less)",
        int,
    ),
    "policy_file": ("the quota policy, a YAML file", Path),
    "web_port": ("port of a worker's health checks, metrics and read API", int),
    "web_host": ("address a worker's web server listens on", str),
    "read_tokens_file": ("file of read API tokens' digests and tenants, written by `minichat tokens`", Path),
}

_DEFAULT_IN_WORDS = {
    "kafka_sasl_mechanism": "none",
    "kafka_sasl_username": "none",
    "kafka_sasl_password_file": "none",
    "kafka_ssl_cafile": "the system's CAs",
    "kafka_ssl_certfile": "none",
    "kafka_ssl_keyfile": "none",
    "admin_database_url": "the database URL",
    "replication_factor": "min(3, brokers)",
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


def _command(
    group: _Group, name: str, summary: str, description: str, run: _Run, aliases: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """A command: one line for the list, a paragraph for its own --help, and the settings options."""
    # allow_abbrev=False: `--kafka-sasl-password X` must not be taken for `--kafka-sasl-password-file`
    parser: argparse.ArgumentParser = group.add_parser(
        name, help=summary, description=description, allow_abbrev=False, aliases=list(aliases)
    )
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
        commands.worker,
    )


def _add_db(group: _Group) -> None:
    db = _subcommands(group, "db", "manage the database: schema and reader logins")
    _command(
        db,
        "migrate",
        "create or upgrade the database schema (safe to run again)",
        "Create the database schema, or upgrade it to this version's. Applied migrations are "
        "recorded with their checksums, so running it again changes nothing.",
        lambda s, a: commands.run(commands.db_migrate(s, a)),
    )
    grant = _command(
        db,
        "grant-reader",
        "let an existing database login read one tenant's rows, and only those",
        "Bind an existing database login to one tenant: it may then read that tenant's rows and no "
        "others, whatever it sets in its session (row-level security). Create the login first, "
        "with CREATE ROLE ... LOGIN.",
        lambda s, a: commands.run(commands.db_grant_reader(s, a)),
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
        lambda s, a: commands.run(commands.db_revoke_reader(s, a)),
    )
    revoke.add_argument("--role", required=True, help="the database login")


def _add_topics(group: _Group) -> None:
    topics = _subcommands(group, "topics", "manage the Kafka topics")
    _command(
        topics,
        "create",
        "create the topics with their settings (safe to run again)",
        "Create the contract's topics with MINICHAT_PARTITIONS partitions, MINICHAT_REPLICATION_FACTOR "
        "copies (default: 3, or the number of brokers when fewer), min.insync.replicas one less "
        "(at least 1), broker-stamped timestamps (LogAppendTime) and infinite retention "
        "(policy-versions compacted). An existing topic is checked: a wrong partition count or "
        "replication factor is an error, and settings that differ are set again.",
        lambda s, a: commands.run(commands.topics_create(s, a)),
    )


def _days(text: str) -> int:
    from minichat.processors.tokens import MAX_EXPIRES_IN_DAYS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of days, got {text!r}") from None
    if not 1 <= value <= MAX_EXPIRES_IN_DAYS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_EXPIRES_IN_DAYS}, got {value}")
    return value


def _add_tokens(group: _Group) -> None:
    tokens = _subcommands(group, "tokens", "manage read API tokens: add, list, revoke")
    add = _command(
        tokens,
        "add",
        "print a new read API token for one tenant",
        "Print a new read API token for one tenant, and record its id, SHA-256 digest, tenant, "
        "creation and expiry times in MINICHAT_READ_TOKENS_FILE (created if missing). The token "
        "itself is not stored: keep the printed one (stdout holds only the token; its id goes to "
        "stderr). Running workers take a new token without a restart.",
        commands.tokens_add,
    )
    add.add_argument("--tenant", type=uuid.UUID, required=True, help="the tenant (a UUID) the token reads")
    add.add_argument(
        "--expires-in",
        type=_days,
        default=None,
        metavar="DAYS",
        help="days until the token stops working (default: it never expires)",
    )
    listed = _command(
        tokens,
        "list",
        "list the read API tokens: id, tenant, created, expires",
        "List the tokens of MINICHAT_READ_TOKENS_FILE: each one's id (what `minichat tokens revoke` "
        "takes), tenant, creation time and expiry, expired ones marked. Neither a token nor its "
        "digest is shown.",
        commands.tokens_list,
    )
    listed.add_argument(
        "--json", action="store_true", help="print one JSON array of objects (default: a table)"
    )
    revoke = _command(
        tokens,
        "revoke",
        "remove a read API token by its id",
        "Remove the token with this id (see `minichat tokens list`) from MINICHAT_READ_TOKENS_FILE. "
        "Running workers refuse it (401) from their next request on, without a restart. An unknown "
        "id changes nothing and exits 2.",
        commands.tokens_revoke,
    )
    revoke.add_argument("id", metavar="ID", help="the token's id, as `minichat tokens list` shows it")


def _add_rebuild(group: _Group) -> None:
    replay = _command(
        group,
        "rebuild",
        "apply the input topics to the database again, sending nothing (alias: replay)",
        "Re-consume the input topics, from the beginning or from --from-time, up to their end when it "
        "starts, and apply them through the worker's own processors; a command with a recorded "
        "decision is applied as it was decided. Nothing is sent: no decision, dead letter or billing "
        "event. Over the live database it changes nothing; into an empty, migrated database it "
        "rebuilds the books. Run it while the workers are caught up or stopped. Prints a summary. "
        "`minichat replay` is the same command.",
        commands.replay,
        aliases=("replay",),
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


def _add_policy(group: _Group) -> None:
    policy = _subcommands(group, "policy", "try a policy before deploying it: check, diff")
    check = _command(
        policy,
        "check",
        "validate a policy file and print what it changes against the version in force",
        "Validate a policy file (exit 2 with one line naming the field when it is invalid, or when it "
        "reuses the version in force with other content), then print every field it changes "
        "against the version in force: the latest policy version the database holds. When the "
        "database cannot be reached or has no schema, it says so and checks only the file.",
        commands.policy_check,
    )
    check.add_argument("file", metavar="FILE", type=Path, help="the policy file to check")
    check.add_argument("--json", action="store_true", help="print one JSON object (default: lines)")
    diff = _command(
        policy,
        "diff",
        "dry-run a candidate policy on the recorded stream and report what it would change",
        "Rebuild the books from the topics into a scratch database (created and dropped with "
        "MINICHAT_ADMIN_DATABASE_URL, or --scratch-database-url), in the order the workers recorded: "
        "commands before --from-time and from --to-time on are applied as recorded, the commands in "
        "between are decided afresh under the candidate (with its version) and their turns settle "
        "under it. Reports per tenant: the commands whose decision or code would change (recorded -> "
        "candidate), the credits charged, the reserves refused, the most affected users (ids only) "
        "and the alerts. Nothing is produced to Kafka; the live database is only read.",
        commands.policy_diff,
    )
    add = diff.add_argument
    add("--candidate", type=Path, required=True, metavar="FILE", help="the candidate policy file")
    for name, text in (
        ("--from-time", "decide afresh the commands from this event time on (default: every command)"),
        ("--to-time", "... until this event time, excluded; later ones follow the log (default: now)"),
    ):
        add(name, type=_from_time, default=None, metavar="RFC3339", help=text)
    diff.add_argument(
        "--tenant",
        type=uuid.UUID,
        action="append",
        default=[],
        metavar="T",
        help="report only this tenant (repeatable; default: every tenant)",
    )
    diff.add_argument(
        "--scratch-database-url",
        default=None,
        metavar="URL",
        help="an empty database to rebuild into, kept afterwards, when the admin login cannot "
        "create databases (default: one created and dropped)",
    )
    diff.add_argument(
        "--json", action="store_true", help="print the report as one JSON object (default: lines)"
    )


def _add_digest(group: _Group) -> None:
    digest = _command(
        group,
        "digest",
        "print a digest of the stored state, to compare two databases",
        "Print one SHA-256 hex digest of the stored state of all tenants: chats, turns, messages, "
        "quota rows, decisions and billing events, every column except the processing-clock ones. "
        "Equal digests mean equal books: compare the live database with a rebuild by `minichat rebuild`.",
        lambda s, a: commands.run(commands.digest(s, a)),
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
        commands.simulate,
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
        commands.bench,
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
        commands.schema_export,
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
    chosen = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for add in (
        _add_worker,
        _add_db,
        _add_topics,
        _add_rebuild,
        _add_policy,
        _add_digest,
        _add_tokens,
        _add_simulate,
        _add_bench,
        _add_schema,
    ):
        add(chosen)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = _command_name(args)
    try:
        settings = build_settings(args)
    except ValidationError as exc:
        print(f"minichat {command}: {settings_refusal(exc).text}", file=sys.stderr)
        return EXIT_SETUP
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # aiokafka logs every produced record's key and value at DEBUG: message content, never logged.
    logging.getLogger("aiokafka.producer.producer").setLevel(max(logging.INFO, logging.root.level))
    # A command that cannot reach Kafka ends with one line naming the setting (`failures.py`):
    # aiokafka's own line per failed connection attempt would only repeat it. The worker sets it
    # back once it has started.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        result: int = args.run(settings, args)
    except Exception as exc:  # every command's one boundary: no exception text (it can quote a row)
        refusal = explain(exc, settings, command)
        if refusal is not None:
            print(f"minichat {command}: {refusal.text}", file=sys.stderr)
            return refusal.status
        logger.critical("minichat %s failed: %s", command, failure_report(exc))
        return EXIT_FATAL
    return result


def _command_name(args: argparse.Namespace) -> str:
    return " ".join(str(v) for k, v in vars(args).items() if k == "command" or (k.endswith("_command") and v))
