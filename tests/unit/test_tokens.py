"""The read API's token file (minichat/processors/tokens.py): its format and the old one, add, list
and revoke under a file lock (two processes adding at once lose nothing), expiry, and the
worker's store: it sees every replacement, keeps the last good set of a malformed file and says
so in one log line."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from minichat import cli
from minichat.processors.tokens import (
    FORMAT_VERSION,
    TokenFileError,
    TokenStore,
    UnknownTokenError,
    add_token,
    file_stamp,
    issue_token,
    lock_path,
    parse_tokens,
    read_tokens,
    revoke_token,
    token_digest,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MARKER = "MARKER-secret-7f3a"


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_add_stores_id_digest_tenant_and_times_never_the_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    token, record = issue_token(path, tenant, expires_in=timedelta(days=30), now=NOW)
    stored = json.loads(path.read_text())
    assert token not in path.read_text()
    assert stored == {
        "version": FORMAT_VERSION,
        "tokens": [
            {
                "id": record.id,
                "digest": token_digest(token),
                "tenant_id": str(tenant),
                "created_at": "2026-03-01T12:00:00Z",
                "expires_at": "2026-03-31T12:00:00Z",
            }
        ],
    }
    assert len(record.id) == 12 and record.id not in token_digest(token)
    assert path.stat().st_mode & 0o777 == 0o600 and lock_path(path).stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    add_token(path, tenant)
    assert [r.expires_at for r in read_tokens(path)] == [NOW + timedelta(days=30), None]


def test_an_expired_token_is_refused_by_the_store(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    lasting, _ = issue_token(path, tenant, expires_in=timedelta(days=1), now=NOW)
    clock = [NOW + timedelta(hours=23)]
    store = TokenStore(path, clock=lambda: clock[0])
    assert store.tenant_for(bearer(lasting)) == tenant
    clock[0] = NOW + timedelta(days=1)
    assert store.tenant_for(bearer(lasting)) is None


def test_an_old_file_is_read_and_rewritten_in_the_new_format_on_the_next_change(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    old_tenant, tenant = uuid.uuid4(), uuid.uuid4()
    path.write_text(json.dumps({token_digest("old-token"): str(old_tenant)}))
    [old] = read_tokens(path)
    assert (old.id, old.created_at, old.expires_at) == (token_digest("old-token")[:12], None, None)
    assert TokenStore(path).tenant_for(bearer("old-token")) == old_tenant
    token = add_token(path, tenant)
    stored = json.loads(path.read_text())
    assert stored["version"] == FORMAT_VERSION
    first = stored["tokens"][0]
    assert (first["id"], first["created_at"], first["expires_at"]) == (old.id, None, None)
    store = TokenStore(path)
    assert store.tenant_for(bearer("old-token")) == old_tenant and store.tenant_for(bearer(token)) == tenant
    revoke_token(path, old.id)
    assert TokenStore(path).tenant_for(bearer("old-token")) is None


def test_revoke_removes_one_token_and_an_unknown_id_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    first, kept = issue_token(path, tenant)
    second, gone = issue_token(path, tenant)
    store = TokenStore(path)
    assert store.tenant_for(bearer(second)) == tenant
    assert revoke_token(path, gone.id) == gone
    assert store.tenant_for(bearer(second)) is None and store.tenant_for(bearer(first)) == tenant
    before = (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns)
    with pytest.raises(UnknownTokenError):
        revoke_token(path, gone.id)
    assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == before
    assert [r.id for r in read_tokens(path)] == [kept.id]


GOOD = {
    "id": "abc123",
    "digest": "0" * 64,
    "tenant_id": str(uuid.uuid4()),
    "created_at": None,
    "expires_at": None,
}


@pytest.mark.parametrize(
    "content",
    [
        b"{" + MARKER.encode(),
        b"\xff\xfe",
        json.dumps([MARKER]).encode(),
        json.dumps({"version": 3, "tokens": []}).encode(),
        json.dumps({"version": 2, "tokens": {}}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "secret": MARKER}]}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "digest": MARKER}]}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "id": MARKER}]}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "tenant_id": MARKER}]}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "expires_at": "2026-01-01T00:00:00"}]}).encode(),
        json.dumps({"version": 2, "tokens": [{**GOOD, "created_at": 5}]}).encode(),
        json.dumps({"version": 2, "tokens": [GOOD, {**GOOD, "digest": "1" * 64}]}).encode(),
        json.dumps({MARKER: str(uuid.uuid4())}).encode(),
        json.dumps({"0" * 64: MARKER}).encode(),
    ],
    ids=lambda c: c[:40].decode(errors="replace"),
)
def test_a_malformed_file_is_refused_without_quoting_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "tokens.json"
    path.write_bytes(content)
    with pytest.raises(TokenFileError) as refused:
        parse_tokens(content)
    assert MARKER not in str(refused.value)
    with pytest.raises(TokenFileError):
        add_token(path, uuid.uuid4())
    with pytest.raises(TokenFileError):
        revoke_token(path, "abc123")
    assert path.read_bytes() == content


def test_the_store_sees_a_same_size_replacement_with_the_same_mtime(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tenant_a, tenant_b = uuid.uuid4(), uuid.uuid4()
    token_a = add_token(path, tenant_a)
    store = TokenStore(path)
    assert store.tenant_for(bearer(token_a)) == tenant_a
    before = path.stat()
    # Another token of the same length for another tenant, same id and times: the same size.
    token_b = token_a[::-1]
    other = path.with_name("other.json")
    other.write_text(
        path.read_text()
        .replace(token_digest(token_a), token_digest(token_b))
        .replace(str(tenant_a), str(tenant_b))
    )
    assert other.stat().st_size == before.st_size
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, path)
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert store.tenant_for(bearer(token_a)) is None
    assert store.tenant_for(bearer(token_b)) == tenant_b


def test_the_store_rehashes_the_file_at_least_every_second(tmp_path: Path) -> None:
    """Even a rewrite in place that keeps every stat field is seen within RECHECK_S."""
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    token = add_token(path, tenant)
    ticks = [0.0]
    store = TokenStore(path, monotonic=lambda: ticks[0])
    assert store.tenant_for(bearer(token)) == tenant
    path.write_text(path.read_text().replace(token_digest(token), token_digest(token[::-1])))
    store._stamp = file_stamp(path.stat())  # as if the write had kept every stat field
    ticks[0] = 0.5
    assert store.tenant_for(bearer(token)) == tenant  # not read again yet
    ticks[0] = 1.0
    assert store.tenant_for(bearer(token)) is None


def test_a_malformed_file_keeps_the_last_good_set_and_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    tenant = uuid.uuid4()
    token = add_token(path, tenant)
    ticks = [0.0]
    store = TokenStore(path, monotonic=lambda: ticks[0])
    assert store.tenant_for(bearer(token)) == tenant
    with caplog.at_level(logging.INFO, logger="minichat.processors.tokens"):
        path.write_text('{"version": 2, "tokens": [' + json.dumps(MARKER))
        for i in range(20):
            ticks[0] = float(i)  # past the recheck interval every time
            assert store.tenant_for(bearer(token)) == tenant
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "not JSON" in errors[0].getMessage() and MARKER not in caplog.text
        with pytest.raises(TokenFileError):  # a writer refuses it too: the operator fixes the file
            add_token(path, tenant)
        path.write_text("{}")
        ticks[0] = 100.0
        assert store.tenant_for(bearer(token)) is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_a_missing_file_holds_no_tokens(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.json"
    store = TokenStore(path)
    with caplog.at_level(logging.INFO, logger="minichat.processors.tokens"):
        for _ in range(5):
            assert store.tenant_for(bearer("anything")) is None
    assert len(caplog.records) == 1 and "does not exist" in caplog.text
    tenant = uuid.uuid4()
    token = add_token(path, tenant)
    assert store.tenant_for(bearer(token)) == tenant
    path.unlink()
    assert store.tenant_for(bearer(token)) is None
    assert TokenStore(None).tenant_for(bearer(token)) is None


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic abc", "bearer x", "Bearer \udcff\udcfe"]
)
def test_a_header_without_a_known_token_is_no_tenant(tmp_path: Path, header: str | None) -> None:
    path = tmp_path / "tokens.json"
    add_token(path, uuid.uuid4())
    assert TokenStore(path).tenant_for(header) is None


ADDER = """
import sys, uuid
from pathlib import Path
from minichat.processors.tokens import add_token
path, n = Path(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()  # start together
for _ in range(n):
    add_token(path, uuid.uuid4())
"""


def test_two_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADDER, str(path), "25"],
            stdin=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=60) == 0
    records = read_tokens(path)
    assert len(records) == 50 and len({r.id for r in records}) == 50


# --------------------------------------------------------------------------------------- the CLI


def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_commands_add_list_and_revoke(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "tokens.json"
    file = ["--read-tokens-file", str(path)]
    tenant = uuid.uuid4()
    code, token, err = run(["tokens", "add", "--tenant", str(tenant), "--expires-in", "7", *file], capsys)
    assert code == 0 and len(token.strip()) > 30 and "expires" in err
    [record] = read_tokens(path)
    assert record.expires_at is not None and record.created_at is not None
    assert record.expires_at - record.created_at == timedelta(days=7)
    for listing in (["tokens", "list", *file], ["tokens", "list", "--json", *file]):
        code, out, _ = run(listing, capsys)
        assert code == 0 and record.id in out and str(tenant) in out
        assert token.strip() not in out and record.digest not in out and record.digest[12:24] not in out
    code, out, _ = run(["tokens", "list", "--json", *file], capsys)
    assert [t["id"] for t in json.loads(out)] == [record.id] and json.loads(out)[0]["expired"] is False
    before = path.read_bytes()
    code, _, err = run(["tokens", "revoke", "nope", *file], capsys)
    assert code == 2 and "no token has the id 'nope'" in err and "Traceback" not in err
    assert path.read_bytes() == before
    code, out, _ = run(["tokens", "revoke", record.id, *file], capsys)
    assert code == 0 and record.id in out and read_tokens(path) == []


@pytest.mark.parametrize("command", [["add", "--tenant", str(uuid.uuid4())], ["list"], ["revoke", "x"]])
def test_the_commands_say_what_is_wrong_with_the_file(
    tmp_path: Path, capsys: Any, command: list[str]
) -> None:
    code, _, err = run(["tokens", *command], capsys)
    assert code == 2 and "MINICHAT_READ_TOKENS_FILE" in err
    path = tmp_path / "tokens.json"
    path.write_text("[" + json.dumps(MARKER))
    code, out, err = run(["tokens", *command, "--read-tokens-file", str(path)], capsys)
    assert code == 2 and "is not a token file" in err and MARKER not in out + err and "Traceback" not in err


@pytest.mark.parametrize("days", ["0", "-1", "1.5", "x", "36501"])
def test_expires_in_is_a_positive_whole_number_of_days(tmp_path: Path, capsys: Any, days: str) -> None:
    path = tmp_path / "tokens.json"
    with pytest.raises(SystemExit) as exited:
        cli.main(
            [
                "tokens",
                "add",
                "--tenant",
                str(uuid.uuid4()),
                "--expires-in",
                days,
                "--read-tokens-file",
                str(path),
            ]
        )
    assert exited.value.code == 2 and "--expires-in" in capsys.readouterr().err
    assert not path.exists()


def test_tokens_help_lists_its_commands(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["tokens", "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and all(f"    {name} " in out for name in ("add", "list", "revoke"))


def test_revoking_in_a_missing_file_creates_nothing(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "dir" / "tokens.json"
    code, _, err = run(["tokens", "revoke", "0123456789ab", "--read-tokens-file", str(path)], capsys)
    assert code == 2 and "no token has the id" in err and not path.parent.exists()
