"""The dry run's books: a scratch database created with the admin login and dropped afterwards,
or one the operator gives (`--scratch-database-url`, kept), never the live one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from minichat.settings import Settings
from minichat.storage.bench import create_database, drain_counts, drop_database
from minichat.storage.schema import migrate


class DiffSetupError(RuntimeError):
    """Something the operator must fix first; the message names it."""


def _where(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    return (parts.hostname or "localhost", parts.port or 5432, parts.path.lstrip("/"))


def database_url_for(base_url: str, dbname: str) -> str:
    return urlunsplit(urlsplit(base_url)._replace(path=f"/{dbname}"))


async def _migrated_and_empty(url: str) -> None:
    con = await asyncpg.connect(url)
    try:
        await migrate(con)
        if (await drain_counts(con)).decided:
            raise DiffSetupError(
                "the scratch database (--scratch-database-url) already holds books: give an empty one"
            )
    finally:
        await con.close()


@asynccontextmanager
async def scratch_books(settings: Settings, given: str | None) -> AsyncIterator[str]:
    """Yields the URL of an empty, migrated database for the dry run."""
    if given is not None:
        if _where(given) in {_where(settings.database_url), _where(settings.admin_url)}:
            raise DiffSetupError(
                "--scratch-database-url names the live database: the dry run never writes it, give "
                "another (empty) database"
            )
        await _migrated_and_empty(given)
        yield given
        return
    name = f"minichat_diff_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(settings.admin_url)
    try:
        try:
            await create_database(admin, name)
        except asyncpg.InsufficientPrivilegeError:
            raise DiffSetupError(
                "the login of MINICHAT_ADMIN_DATABASE_URL cannot create databases: create an empty "
                "one and give it with --scratch-database-url"
            ) from None
        try:
            url = database_url_for(settings.admin_url, name)
            await _migrated_and_empty(url)
            yield url
        finally:
            await drop_database(admin, name)
    finally:
        await admin.close()
