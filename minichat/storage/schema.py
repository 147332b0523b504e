"""Versioned SQL migrations: numbered files, applied once each, recorded with their checksum."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Final

import asyncpg

SYSTEM_LEVEL: Final = (
    "the migrations ledger (`schema_migrations`, no tenant) and the advisory lock that serialises "
    "`minichat db migrate`"
)

# Serialises concurrent `minichat db migrate` runs (two workers starting at once).
_ADVISORY_LOCK_KEY = 0x6D696E6963686174  # "minichat"
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RuntimeError):
    """The database holds a migration history this code does not recognise."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("minichat.storage.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migrations must be numbered 0001.. without gaps, found {versions}")
    return found


async def applied_versions(con: asyncpg.Connection) -> dict[int, str]:
    exists = await con.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await con.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    return {r["version"]: r["checksum"] for r in rows}


def _check_history(applied: dict[int, str], known: list[Migration]) -> None:
    by_version = {m.version: m for m in known}
    for version, checksum in applied.items():
        migration = by_version.get(version)
        if migration is None:
            raise MigrationError(f"database has migration {version}, which this minichat does not know")
        if migration.checksum != checksum:
            raise MigrationError(f"migration {version}_{migration.name} changed after it was applied")


async def migrate(con: asyncpg.Connection) -> list[Migration]:
    """Apply every pending migration, each in its own transaction; returns what was applied."""
    known = available_migrations()
    applied_now: list[Migration] = []
    await con.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
    try:
        await con.execute(_CREATE_LEDGER)
        applied = await applied_versions(con)
        _check_history(applied, known)
        for migration in known:
            if migration.version in applied:
                continue
            async with con.transaction():
                await con.execute(migration.sql)
                await con.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration)
    finally:
        await con.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    return applied_now


async def pending_migrations(con: asyncpg.Connection) -> list[Migration]:
    """What `minichat db migrate` would apply; the worker refuses to start while this is non-empty."""
    known = available_migrations()
    applied = await applied_versions(con)
    _check_history(applied, known)
    return [m for m in known if m.version not in applied]
