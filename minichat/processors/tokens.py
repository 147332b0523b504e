"""The read API's bearer tokens, kept in `MINICHAT_READ_TOKENS_FILE` (docs/contract.md, "Read API
tokens"): per token a public id, the SHA-256 digest of the secret, the tenant, when it was made
and when it expires. The secret itself is never stored: `minichat tokens add` shows it once.

Writers (`tokens add`, `tokens revoke`) read, change and replace the file under an exclusive lock
on a sidecar file, so two at once never lose one's change; the worker's `TokenStore` only reads,
and sees each atomic replacement on the next request.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""The file's `version`. Version 1 was a bare object of digests to tenants; it is still read."""
ID_LENGTH = 12
"""Hex digits of a token id: public, short enough to type, long enough never to collide."""
MAX_EXPIRES_IN_DAYS = 36_500
RECHECK_S = 1.0
"""The worker hashes the file's content at least this often even when its stat looks unchanged
(a rewrite in place of the same size within one mtime tick keeps the inode and the stamp)."""

_DIGEST = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-z][0-9a-z_-]{0,63}")
_FIELDS = ("id", "digest", "tenant_id", "created_at", "expires_at")


class TokenFileError(Exception):
    """The file is not a token file. The message says what is wrong, never quotes its content."""


class UnknownTokenError(LookupError):
    """No token has that id."""


@dataclass(frozen=True)
class TokenRecord:
    """One token as stored: everything but the secret."""

    id: str
    digest: str
    tenant_id: UUID
    created_at: datetime | None
    """None for a token made before the file recorded it."""
    expires_at: datetime | None
    """None: never expires."""

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def public(self, now: datetime) -> dict[str, Any]:
        """What `tokens list` shows: neither the secret nor its digest."""
        return {
            "id": self.id,
            "tenant_id": str(self.tenant_id),
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
            "expired": self.expired(now),
        }

    def stored(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "digest": self.digest,
            "tenant_id": str(self.tenant_id),
            "created_at": format_time(self.created_at),
            "expires_at": format_time(self.expires_at),
        }


def utc_now() -> datetime:
    return datetime.now(UTC)


def format_time(at: datetime | None) -> str | None:
    return None if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def token_digest(token: str) -> str:
    """Hex SHA-256 of the token's bytes. `surrogateescape`: a header that is not UTF-8 (aiohttp
    keeps its bytes as surrogates) digests to something no token has, never to an error."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


# ---------------------------------------------------------------------------------------- format


def parse_tokens(raw: bytes) -> list[TokenRecord]:
    """The tokens of a file's content, in file order (empty content: none)."""
    if not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise TokenFileError("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise TokenFileError(f"not JSON (line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise TokenFileError("not a JSON object")
    records = _current(data) if "tokens" in data or "version" in data else _legacy(data)
    for what, values in (("id", [r.id for r in records]), ("digest", [r.digest for r in records])):
        if len(set(values)) != len(values):
            raise TokenFileError(f"two tokens share one {what}")
    return records


def _current(data: dict[str, Any]) -> list[TokenRecord]:
    if data.get("version") != FORMAT_VERSION:
        raise TokenFileError(f"version is not {FORMAT_VERSION}")
    if set(data) != {"version", "tokens"} or not isinstance(data["tokens"], list):
        raise TokenFileError('expected exactly "version" and a "tokens" list')
    return [_record(i, entry) for i, entry in enumerate(data["tokens"])]


def _record(i: int, entry: Any) -> TokenRecord:
    where = f"token {i + 1}"
    if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
        raise TokenFileError(f"{where}: expected exactly the fields {', '.join(_FIELDS)}")
    if not isinstance(entry["id"], str) or not _ID.fullmatch(entry["id"]):
        raise TokenFileError(f"{where}: id is not 1-64 lowercase letters, digits, - or _")
    if not isinstance(entry["digest"], str) or not _DIGEST.fullmatch(entry["digest"]):
        raise TokenFileError(f"{where}: digest is not 64 lowercase hex digits")
    return TokenRecord(
        id=entry["id"],
        digest=entry["digest"],
        tenant_id=_tenant(where, entry["tenant_id"]),
        created_at=_time(where, "created_at", entry["created_at"]),
        expires_at=_time(where, "expires_at", entry["expires_at"]),
    )


def _legacy(data: dict[str, Any]) -> list[TokenRecord]:
    """Version 1: `{digest: tenant}`. Made when no date was kept, such a token never expires; its
    id is its digest's first digits (the digest of a secret that is not stored, so it gives
    nothing away)."""
    records = []
    for i, (digest, tenant) in enumerate(data.items()):
        where = f"entry {i + 1}"
        if not _DIGEST.fullmatch(digest):
            raise TokenFileError(f"{where}: key is not a SHA-256 digest (64 lowercase hex digits)")
        records.append(TokenRecord(digest[:ID_LENGTH], digest, _tenant(where, tenant), None, None))
    return records


def _tenant(where: str, value: Any) -> UUID:
    try:
        if isinstance(value, str):
            return UUID(value)
    except ValueError:
        pass
    raise TokenFileError(f"{where}: tenant_id is not a UUID")


def _time(where: str, field: str, value: Any) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        raise TokenFileError(f"{where}: {field} is not null or an RFC 3339 time with its offset")
    return at


def dump_tokens(records: Sequence[TokenRecord]) -> bytes:
    body = {"version": FORMAT_VERSION, "tokens": [r.stored() for r in records]}
    return (json.dumps(body, indent=2) + "\n").encode()


# ------------------------------------------------------------------------------ reading, writing


def read_tokens(path: Path) -> list[TokenRecord]:
    """The file's tokens; a missing file holds none."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    return parse_tokens(raw)


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `<file>.lock` for one read-change-replace. A sidecar file because the
    token file itself is replaced (a lock on it would lock the old inode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace(path: Path, records: Sequence[TokenRecord]) -> None:
    """Write a new file beside the old one (mode 0600), sync it, rename it over the old one and
    sync the directory: a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(dump_tokens(records))
            out.flush()
            os.fchmod(out.fileno(), 0o600)
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def issue_token(
    path: Path, tenant_id: UUID, *, expires_in: timedelta | None = None, now: datetime | None = None
) -> tuple[str, TokenRecord]:
    """A new token for `tenant_id` (expiring `expires_in` after `now`), and its record. Only the
    digest is stored; the token is returned to be shown once."""
    at = (now or utc_now()).replace(microsecond=0)
    token = secrets.token_urlsafe(32)
    with _locked(path):
        records = read_tokens(path)
        taken = {r.id for r in records}
        token_id = secrets.token_hex(ID_LENGTH // 2)
        while token_id in taken:  # pragma: no cover (one chance in 2^48 per token)
            token_id = secrets.token_hex(ID_LENGTH // 2)
        expires_at = at + expires_in if expires_in is not None else None
        record = TokenRecord(token_id, token_digest(token), tenant_id, at, expires_at)
        _replace(path, [*records, record])
    return token, record


def add_token(path: Path, tenant_id: UUID, *, expires_in: timedelta | None = None) -> str:
    """A new token for `tenant_id`, shown once (`issue_token` also gives its record)."""
    return issue_token(path, tenant_id, expires_in=expires_in)[0]


def revoke_token(path: Path, token_id: str) -> TokenRecord:
    """Remove the token `token_id`; the file is unchanged when no token has that id."""
    if not path.exists():  # nothing to revoke: create no lock file (nor directory) either
        raise UnknownTokenError(token_id)
    with _locked(path):
        records = read_tokens(path)
        kept = [r for r in records if r.id != token_id]
        if len(kept) == len(records):
            raise UnknownTokenError(token_id)
        _replace(path, kept)
    return next(r for r in records if r.id == token_id)


# ---------------------------------------------------------------------------------- the worker's


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the file is replaced (the inode) or written (size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TokenStore:
    """Token digests to their records, for the read API; re-read when the file changes, so added,
    revoked and expired tokens take effect without a restart.

    The file is looked at on each request: re-read when its inode, size, mtime or ctime changed,
    and at least every `RECHECK_S` anyway (then re-parsed only if its content hash changed). A
    file that is not a token file keeps the last good set and is reported in one log line; a
    missing file holds no tokens."""

    def __init__(
        self,
        path: Path | None,
        *,
        clock: Callable[[], datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._clock = clock
        self._monotonic = monotonic
        self._stamp: tuple[int, ...] | None = None
        self._read_at = 0.0
        self._content: bytes | None = None
        self._records: dict[str, TokenRecord] = {}
        self._complaint: str | None = None

    def tenant_for(self, authorization: str | None) -> UUID | None:
        """The tenant of a `Bearer` token that is known and not expired, else None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if not token:
            return None
        record = self.records().get(token_digest(token))
        if record is None or record.expired(self._clock()):
            return None
        return record.tenant_id

    def records(self) -> Mapping[str, TokenRecord]:
        """The current set by digest (the last good one while the file is malformed)."""
        if self.path is None:
            return {}
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self._missing()
        except OSError as exc:
            return self._keep(f"cannot be read ({type(exc).__name__})")
        stamp = file_stamp(st)
        now = self._monotonic()
        if stamp == self._stamp and now - self._read_at < RECHECK_S:
            return self._records
        self._stamp, self._read_at = stamp, now
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._missing()
        except OSError as exc:
            return self._keep(f"cannot be read ({type(exc).__name__})")
        content = hashlib.sha256(raw).digest()
        if content == self._content:
            return self._records
        self._content = content
        try:
            records = parse_tokens(raw)
        except TokenFileError as exc:
            return self._keep(f"is not a token file: {exc}")
        self._records = {r.digest: r for r in records}
        if self._complaint is not None:
            logger.info("read API tokens file %s: read %d token(s)", self.path, len(records))
        self._complaint = None
        return self._records

    def _missing(self) -> dict[str, TokenRecord]:
        self._records, self._stamp, self._content = {}, None, None
        self._complain(logging.WARNING, "does not exist: every /v1/ request is refused until it does")
        return self._records

    def _keep(self, problem: str) -> dict[str, TokenRecord]:
        self._complain(logging.ERROR, f"{problem}; keeping the {len(self._records)} token(s) read before")
        return self._records

    def _complain(self, level: int, problem: str) -> None:
        """Log `problem` once: not again on every request while it lasts."""
        if problem != self._complaint:
            logger.log(level, "read API tokens file %s %s", self.path, problem)
            self._complaint = problem
