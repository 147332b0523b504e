"""What each `minichat` command does, once `minichat.cli` parsed its options and built the settings.

Every command's own code is imported when it runs, so `minichat --help` stays quick.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from minichat.cli.failures import EXIT_SETUP
from minichat.settings import Settings

logger = logging.getLogger("minichat")


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run an async command to its exit status."""
    return asyncio.run(coro)


async def db_grant_reader(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.readers import ReaderError, grant_reader

    con = await connect(settings, admin=True)
    try:
        await grant_reader(con, args.role, args.tenant)
    except ReaderError as exc:
        print(f"minichat db grant-reader: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        await con.close()
    print(f"{args.role} reads tenant {args.tenant}")
    return 0


async def db_revoke_reader(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.readers import revoke_reader

    con = await connect(settings, admin=True)
    try:
        tenant = await revoke_reader(con, args.role)
    finally:
        await con.close()
    print(
        f"{args.role} no longer reads tenant {tenant}" if tenant else f"{args.role} was not bound to a tenant"
    )
    return 0


def _tokens_file(settings: Settings, command: str) -> Path | None:
    if settings.read_tokens_file is None:
        print(
            f"minichat tokens {command}: set MINICHAT_READ_TOKENS_FILE or --read-tokens-file (the file "
            "of read API tokens)",
            file=sys.stderr,
        )
    return settings.read_tokens_file


def tokens_add(settings: Settings, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from minichat.processors.tokens import TokenFileError, format_time, issue_token

    path = _tokens_file(settings, "add")
    if path is None:
        return EXIT_SETUP
    expires_in = timedelta(days=args.expires_in) if args.expires_in is not None else None
    try:
        token, record = issue_token(path, args.tenant, expires_in=expires_in)
    except (TokenFileError, OSError) as exc:
        return _token_file_failed("add", path, exc)
    print(token)
    expires = format_time(record.expires_at) or "never"
    print(f"token {record.id} for tenant {record.tenant_id}, expires {expires}", file=sys.stderr)
    return 0


def tokens_list(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from minichat.processors.tokens import TokenFileError, read_tokens, utc_now

    path = _tokens_file(settings, "list")
    if path is None:
        return EXIT_SETUP
    try:
        records = read_tokens(path)
    except (TokenFileError, OSError) as exc:
        return _token_file_failed("list", path, exc)
    now = utc_now()
    shown = [r.public(now) for r in records]
    if args.json:
        print(json.dumps(shown))
        return 0
    rows = [("ID", "TENANT", "CREATED", "EXPIRES")] + [
        (
            t["id"],
            t["tenant_id"],
            t["created_at"] or "unknown",
            (t["expires_at"] or "never") + (" (expired)" if t["expired"] else ""),
        )
        for t in shown
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[3])
    return 0


def tokens_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.processors.tokens import TokenFileError, UnknownTokenError, revoke_token

    path = _tokens_file(settings, "revoke")
    if path is None:
        return EXIT_SETUP
    try:
        record = revoke_token(path, args.id)
    except UnknownTokenError:
        print(
            f"minichat tokens revoke: no token has the id {args.id!r} in {path} (see `minichat tokens "
            "list`); nothing changed",
            file=sys.stderr,
        )
        return EXIT_SETUP
    except (TokenFileError, OSError) as exc:
        return _token_file_failed("revoke", path, exc)
    print(f"revoked token {record.id} of tenant {record.tenant_id}")
    return 0


def _token_file_failed(command: str, path: Path, exc: Exception) -> int:
    """A token file that is not one, or cannot be read or written: say so, change nothing."""
    from minichat.processors.tokens import TokenFileError

    if isinstance(exc, TokenFileError):
        problem = f"is not a token file: {exc}" + ("" if command == "list" else "; nothing changed")
    else:
        problem = f"cannot be used ({type(exc).__name__}: {getattr(exc, 'strerror', None) or 'error'})"
    print(f"minichat tokens {command}: {path} {problem}", file=sys.stderr)
    return EXIT_SETUP


async def db_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.storage.db import connect
    from minichat.storage.schema import MigrationError, migrate

    con = await connect(settings, admin=True)
    try:
        applied = await migrate(con)
    except MigrationError as exc:  # our own words about the history, never a row's content
        print(f"minichat db migrate: {exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        await con.close()
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("schema is up to date")
    return 0


async def topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.processors.topics import TopicError, create_topics, min_insync

    try:
        report = await create_topics(settings)
    except TopicError as exc:  # our own words: which topic, what differs, what fixes it
        print(f"minichat topics create: {exc}", file=sys.stderr)
        return EXIT_SETUP
    factor = report.replication_factor
    print(f"replication factor {factor}, min.insync.replicas {min_insync(factor)}")
    for name in report.created:
        print(f"created {name}")
    for name in report.existing:
        print(f"exists  {name}")
    for name in report.reconfigured:
        print(f"reconfigured {name}")
    return 0


async def _preflight(settings: Settings) -> list[str]:
    """Reasons the worker must not start; each names what fixes it."""
    from minichat.models.policy import load_policy
    from minichat.processors.topics import topic_problems
    from minichat.storage.db import connect
    from minichat.storage.policies import PolicyConflict, ensure_policy_version
    from minichat.storage.schema import pending_migrations

    problems: list[str] = []
    policy = load_policy(settings.policy_file)  # a PolicyError: the CLI's boundary names the setting
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
    """The exit status when `command` must not start (printed reasons), else None. A dependency
    it cannot reach propagates to the CLI's boundary (`failures.py`), which names the setting."""
    from minichat.storage.schema import MigrationError

    try:
        problems = asyncio.run(_preflight(settings))
    except MigrationError as exc:
        print(f"minichat {command}: {exc}", file=sys.stderr)
        return EXIT_SETUP
    for problem in problems:
        print(f"minichat {command}: {problem}", file=sys.stderr)
    return EXIT_SETUP if problems else None


def worker(settings: Settings, args: argparse.Namespace) -> int:
    import faust

    from minichat.processors.app import create_app

    refused = _checked_start("worker", settings)
    if refused is not None:
        return refused
    logging.getLogger("aiokafka").setLevel(logging.NOTSET)  # a running worker logs what aiokafka says
    app = create_app(settings)
    worker = faust.Worker(app, loglevel=settings.log_level.lower(), quiet=True)
    worker.execute_from_commandline()
    return 0  # pragma: no cover (execute_from_commandline exits)


def simulate(settings: Settings, args: argparse.Namespace) -> int:
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
    return run(simulate(settings, options))


def replay(settings: Settings, args: argparse.Namespace) -> int:
    """`minichat rebuild` (and its alias `minichat replay`: messages name the command as typed)."""
    import json

    from minichat.gc_tuning import tune_gc
    from minichat.models.policy import PolicyError
    from minichat.storage.policies import PolicyConflict
    from minichat.tools.rebuild import RebuildSetupError, run_rebuild

    name = args.command
    refused = _checked_start(name, settings)
    if refused is not None:
        return refused
    tune_gc()
    try:
        summary = asyncio.run(
            run_rebuild(settings, from_time=args.from_time, show_progress=not args.no_progress)
        )
    except (RebuildSetupError, PolicyError, PolicyConflict) as exc:
        print(f"minichat {name}: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print(
            f"minichat {name}: interrupted (each batch is its own transaction: run it again)", file=sys.stderr
        )
        return 130
    # Anything else reaches the CLI's boundary (exit 70): each applied batch committed on its own
    # and re-applying is a no-op, so running it again is safe.
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    else:
        print("\n".join(summary.lines()))
    return 0


def policy_check(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from minichat.cli.failures import explain
    from minichat.tools.policy_diff import check_policy

    def describe(exc: BaseException) -> str | None:
        refusal = explain(exc, settings, "policy check")
        return refusal.text if refusal is not None else None

    # An invalid file raises PolicyError: the CLI's boundary prints it (one line naming the field).
    result = asyncio.run(check_policy(settings, args.file, describe))
    if result.conflict:
        print(
            f"minichat policy check: {args.file}: version: version {result.policy.version} is in force "
            "with other content: give the changed policy a new version number",
            file=sys.stderr,
        )
        return EXIT_SETUP
    if args.json:
        print(json.dumps(result.as_dict(), sort_keys=True))
    else:
        print("\n".join(result.lines()))
    return 0


def policy_diff(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from minichat.gc_tuning import tune_gc
    from minichat.storage.policies import PolicyConflict
    from minichat.tools.policy_diff import DiffOptions, DiffSetupError, run_diff
    from minichat.tools.rebuild import RebuildSetupError

    options = DiffOptions(
        candidate=args.candidate,
        from_time=args.from_time,
        to_time=args.to_time,
        tenants=tuple(args.tenant),
        scratch_database_url=args.scratch_database_url,
        show_progress=sys.stderr.isatty(),
    )
    # The rebuild's own account (records read, versions stored) is the replay's: the report says it.
    logging.getLogger("minichat.replay").setLevel(max(logging.WARNING, logging.root.level))
    tune_gc()
    try:
        report = asyncio.run(run_diff(settings, options))
    except (DiffSetupError, RebuildSetupError) as exc:
        print(f"minichat policy diff: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except PolicyConflict as exc:
        print(f"minichat policy diff: {args.candidate}: version: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        print("minichat policy diff: interrupted (the scratch database is dropped)", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0


async def digest(settings: Settings, args: argparse.Namespace) -> int:
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


def bench(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.bench import run_bench
    from minichat.bench.options import options_from_args

    return run(run_bench(settings, options_from_args(args)))


def schema_export(settings: Settings, args: argparse.Namespace) -> int:
    from minichat.models.schema import export_schemas

    for path in export_schemas(args.out):
        print(f"wrote {path}")
    return 0
