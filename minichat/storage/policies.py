"""`policy_versions`: each policy version's snapshot, stored once and never changed."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from minichat.models.policy import Policy, policy_digest, policy_from_snapshot, policy_snapshot_json

# Policy is operator configuration shared by all tenants: the nil tenant scopes it.
GLOBAL_TENANT = "00000000-0000-0000-0000-000000000000"


class PolicyConflict(RuntimeError):
    """The file claims a version the database already holds with other content."""


async def ensure_policy_version(con: asyncpg.Connection, policy: Policy) -> bool:
    """Store this version's snapshot if new; returns True when it was stored now."""
    digest = policy_digest(policy)
    inserted = await con.fetchval(
        """
        INSERT INTO policy_versions (tenant_id, version, digest, snapshot)
        VALUES ($1::uuid, $2, $3, $4::text::jsonb)
        ON CONFLICT (tenant_id, version) DO NOTHING
        RETURNING true
        """,
        GLOBAL_TENANT,
        policy.version,
        digest,
        policy_snapshot_json(policy),
    )
    if inserted:
        return True
    stored = await con.fetchval(
        "SELECT digest FROM policy_versions WHERE tenant_id = $1::uuid AND version = $2",
        GLOBAL_TENANT,
        policy.version,
    )
    if stored != digest:
        raise PolicyConflict(
            f"policy version {policy.version} is already stored with different content: "
            "give the changed policy a new version number"
        )
    return False


class PolicySnapshots:
    """Stored policy versions, read once each: a turn settles under the version it was admitted with."""

    def __init__(self, current: Policy, known: Iterable[Policy] = ()) -> None:
        self._by_version: dict[int, Policy] = {p.version: p for p in known}
        self._by_version[current.version] = current

    async def get(self, con: asyncpg.Connection, version: int) -> Policy:
        policy = self._by_version.get(version)
        if policy is None:
            snapshot = await con.fetchval(
                "SELECT snapshot::text FROM policy_versions WHERE tenant_id = $1::uuid AND version = $2",
                GLOBAL_TENANT,
                version,
            )
            if snapshot is None:
                raise LookupError(f"policy version {version} is not stored")
            policy = self._by_version[version] = policy_from_snapshot(snapshot)
        return policy


async def stored_policy_versions(con: asyncpg.Connection) -> list[Policy]:
    """Every policy version the database holds, in version order."""
    rows = await con.fetch(
        "SELECT snapshot::text AS snapshot FROM policy_versions WHERE tenant_id = $1::uuid ORDER BY version",
        GLOBAL_TENANT,
    )
    return [policy_from_snapshot(row["snapshot"]) for row in rows]
