"""Reader logins bound to one tenant (`reader_tenants`, migration 0005; docs/security.md §6)."""

from __future__ import annotations

from typing import Final
from uuid import UUID

import asyncpg

READER_ROLE = "minichat_reader"
RUNTIME_ROLE = "minichat_runtime"

SYSTEM_LEVEL: Final = (
    "reader logins: `minichat db grant-reader` binds a login to a tenant (operator data, the tenant "
    "a value written), checked against the catalog (`pg_roles`, `pg_class`)"
)


class ReaderError(RuntimeError):
    """The login cannot be bound (it does not exist, it owns the tables, or it is a runtime login)."""


_ROLE_EXISTS = "SELECT rolname FROM pg_roles WHERE rolname = $1"
_IS_OWNER = "SELECT pg_get_userbyid(relowner) = $1 FROM pg_class WHERE oid = 'chats'::regclass"
# A runtime login reads every tenant (the worker's login): binding it would promise what it is not.
_IS_RUNTIME = "SELECT pg_has_role($1::name, $2::name, 'MEMBER')"
_BIND = """
INSERT INTO reader_tenants (role_name, tenant_id) VALUES ($1, $2)
ON CONFLICT (role_name) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, granted_at = now()
"""
_UNBIND = "DELETE FROM reader_tenants WHERE role_name = $1 RETURNING tenant_id"


async def read_as_tenant(con: asyncpg.Connection, tenant_id: UUID) -> None:
    """Inside the caller's transaction: become `minichat_reader` for `tenant_id` until it ends
    (the owner's path of docs/security.md §6; both settings are LOCAL)."""
    await con.execute(f"SET LOCAL ROLE {READER_ROLE}")
    await con.execute("SELECT set_config('minichat.tenant_id', $1, true)", str(tenant_id))


async def grant_reader(con: asyncpg.Connection, role: str, tenant_id: UUID) -> None:
    """Bind the existing login `role` to `tenant_id` and make it a member of the reader role
    (re-binding moves it to the new tenant)."""
    async with con.transaction():
        if await con.fetchval(_ROLE_EXISTS, role) is None:
            raise ReaderError(f"no role {role!r}: create the login first (CREATE ROLE ... LOGIN)")
        if await con.fetchval(_IS_OWNER, role):
            raise ReaderError(f"{role!r} owns the tables and reads every tenant: bind another login")
        if await con.fetchval(_IS_RUNTIME, role, RUNTIME_ROLE):
            raise ReaderError(
                f"{role!r} is a member of {RUNTIME_ROLE} and reads every tenant: bind another login"
            )
        await con.execute(_BIND, role, tenant_id)
        await con.execute(
            await con.fetchval("SELECT format('GRANT %I TO %I', $1::text, $2::text)", READER_ROLE, role)
        )


async def revoke_reader(con: asyncpg.Connection, role: str) -> UUID | None:
    """Unbind `role` and revoke the reader role from it; returns the tenant it was bound to."""
    async with con.transaction():
        tenant: UUID | None = await con.fetchval(_UNBIND, role)
        if await con.fetchval(_ROLE_EXISTS, role) is not None:
            await con.execute(
                await con.fetchval(
                    "SELECT format('REVOKE %I FROM %I', $1::text, $2::text)", READER_ROLE, role
                )
            )
        return tenant
