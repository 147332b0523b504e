"""The policy versions a rebuild knows: every `policy.version` on `policy-versions`, every snapshot
the database holds and the current file. A recorded decision is applied under its own version, so
they are all loaded (and stored, for settlement) before the first batch."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import asyncpg
from pydantic import ValidationError

from minichat.models.events import PolicyVersion
from minichat.models.policy import Policy, policy_digest
from minichat.models.topics import TopicNames
from minichat.settings import Settings
from minichat.storage.policies import PolicyConflict, ensure_policy_version, stored_policy_versions
from minichat.tools.kafka import read_topic
from minichat.tools.rebuild.sources import RebuildSetupError

logger = logging.getLogger("minichat.replay")


def merge_versions(sources: Iterable[Policy]) -> dict[int, Policy]:
    """One policy per version; two different contents under one version are refused (which of
    them a decision was made under could not be told)."""
    known: dict[int, Policy] = {}
    for policy in sources:
        seen = known.setdefault(policy.version, policy)
        if seen is not policy and policy_digest(seen) != policy_digest(policy):
            raise PolicyConflict(
                f"policy version {policy.version} is recorded with two different contents "
                "(policy-versions, the database or the policy file)"
            )
    return known


def decode_versions(records: Iterable[tuple[bytes | None, bytes | None]]) -> list[Policy]:
    """The policies of `policy-versions` records; a record that is not a valid `policy.version`
    whose key is its version is skipped with a warning."""
    found = []
    for key, value in records:
        if value is None:
            continue
        try:
            record = PolicyVersion.model_validate_json(value)
        except ValidationError:
            logger.warning("a record of policy-versions is not a valid policy.version; ignored")
            continue
        if key != str(record.version).encode():
            logger.warning("a policy.version record's key is not its version; ignored")
            continue
        found.append(record.policy)
    return found


async def load_versions(con: asyncpg.Connection, settings: Settings, current: Policy) -> dict[int, Policy]:
    """Every known version, stored into the database (a rebuild into an empty one can settle)."""
    topic = TopicNames(settings.topic_prefix).policy_versions
    try:
        logged = decode_versions(await read_topic(settings, topic))
    except TimeoutError as exc:
        raise RebuildSetupError(f"cannot read {topic}: {exc}") from exc
    versions = merge_versions([*logged, *await stored_policy_versions(con), current])
    for version in sorted(versions):
        if await ensure_policy_version(con, versions[version]):
            logger.info("stored policy version %d", version)
    logger.info("policy versions known: %s", ", ".join(map(str, sorted(versions))))
    return versions


def check_recorded_versions(recorded: Iterable[int], versions: dict[int, Policy]) -> None:
    """Refuse to start when a recorded decision names a version nothing holds."""
    missing = sorted(set(recorded) - versions.keys())
    if missing:
        raise RebuildSetupError(
            f"recorded decisions were made under policy version(s) {', '.join(map(str, missing))}, "
            "which neither policy-versions nor the database holds: a rebuild cannot apply them as "
            "recorded"
        )
