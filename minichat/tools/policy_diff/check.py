"""`minichat policy check FILE`: the file validated (a `PolicyError` names the field), then
compared with the version in force, field by field."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from minichat.models.policy import Policy, load_policy, policy_digest
from minichat.settings import Settings
from minichat.storage.db import connect
from minichat.storage.policies import stored_policy_versions

ABSENT = "(absent)"


@dataclass(frozen=True)
class Change:
    path: str
    before: Any = None
    after: Any = None
    kind: str = "changed"
    """`changed`, `added` or `removed`."""

    def line(self) -> str:
        before = ABSENT if self.kind == "added" else _shown(self.before)
        after = ABSENT if self.kind == "removed" else _shown(self.after)
        return f"  {self.path}: {before} -> {after}"

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "change": self.kind, "from": self.before, "to": self.after}


@dataclass
class CheckResult:
    file: Path
    policy: Policy
    in_force: Policy | None = None
    unknown: str | None = None
    """Why the version in force is not known (no database reachable, no schema, none stored)."""
    changes: list[Change] = field(default_factory=list)

    @property
    def conflict(self) -> bool:
        """The file reuses the version in force with other content: the workers would refuse it."""
        return (
            self.in_force is not None
            and self.in_force.version == self.policy.version
            and policy_digest(self.in_force) != policy_digest(self.policy)
        )

    def lines(self) -> list[str]:
        out = [f"{self.file}: a valid policy, version {self.policy.version}"]
        if self.in_force is None:
            out.append(f"version in force: unknown ({self.unknown}); only the file was checked")
            return out
        out.append(f"version in force: {self.in_force.version} (the database's latest policy version)")
        if self.policy.version < self.in_force.version:
            out.append(f"note: version {self.policy.version} is older than the version in force")
        if not self.changes:
            out.append("no changes against the version in force")
        else:
            out.append(f"{len(self.changes)} change(s) against version {self.in_force.version}:")
            out.extend(change.line() for change in self.changes)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "valid": True,
            "version": self.policy.version,
            "in_force_version": self.in_force.version if self.in_force is not None else None,
            "in_force_unknown": self.unknown,
            "changes": [c.as_dict() for c in self.changes],
        }


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaf values; the catalog's models are keyed by their id (`models[gpt-5].tier`)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, dict) and "id" in v for v in value):
        out = {}
        for item in value:
            out.update(flatten({k: v for k, v in item.items() if k != "id"}, f"{prefix}[{item['id']}]"))
        return out
    return {prefix: value}


def changes(before: Policy, after: Policy) -> list[Change]:
    """Every leaf that differs, in path order; `version` left out (it always differs)."""
    old = flatten(before.model_dump(mode="json"))
    new = flatten(after.model_dump(mode="json"))
    found = []
    for path in sorted(old.keys() | new.keys()):
        if path == "version":
            continue
        if path not in new:
            found.append(Change(path, old[path], None, "removed"))
        elif path not in old:
            found.append(Change(path, None, new[path], "added"))
        elif old[path] != new[path]:
            found.append(Change(path, old[path], new[path]))
    # an emptied or new mapping is said by its entries, not also as `{}`
    paths = [c.path for c in found]
    return [
        c for c in found if not ({} in (c.before, c.after) and any(p.startswith(c.path + ".") for p in paths))
    ]


async def _in_force(settings: Settings) -> Policy | None:
    con = await connect(settings)
    try:
        versions = await stored_policy_versions(con)
    finally:
        await con.close()
    return max(versions, key=lambda p: p.version) if versions else None


async def check_policy(
    settings: Settings, path: Path, describe: Callable[[BaseException], str | None]
) -> CheckResult:
    """Validate `path` (raises `PolicyError`) and compare it with the version in force. A database
    that cannot be reached or has no schema is said (`describe`: the CLI's words for a failure,
    None when it is unexpected, then raised), not raised: the file is still checked."""
    result = CheckResult(path, load_policy(path))
    try:
        result.in_force = await _in_force(settings)
    except asyncpg.UndefinedTableError:
        result.unknown = "the database has no schema yet: run `minichat db migrate`"
    except Exception as exc:
        reason = describe(exc)
        if reason is None:
            raise
        result.unknown = reason
    else:
        if result.in_force is None:
            result.unknown = "the database holds no policy version yet"
        else:
            result.changes = changes(result.in_force, result.policy)
    return result
