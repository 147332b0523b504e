"""Every command's failure path logs where and what failed, never the error's text (issue 10,
item 8): an exception can quote a row, and rows hold message content."""

from __future__ import annotations

import argparse
import logging
import uuid
from typing import Any

import pytest

from minichat import cli

MARKER = "MARKER-content-3b1d"

COMMANDS = [
    ["worker"],
    ["rebuild"],
    ["policy", "check", "policy.yaml"],
    ["policy", "diff", "--candidate", "policy.yaml"],
    ["digest"],
    ["simulate"],
    ["bench"],
    ["db", "migrate"],
    ["db", "grant-reader", "--tenant", str(uuid.uuid4()), "--role", "someone"],
    ["db", "revoke-reader", "--role", "someone"],
    ["tokens", "add", "--tenant", str(uuid.uuid4())],
    ["tokens", "list"],
    ["tokens", "revoke", "0123456789ab"],
    ["topics", "create"],
    ["schema", "export"],
]


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for sub in subs for child in sub.choices.values() for leaf in _leaves(child)]


def _path(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("db", "tokens", "topics", "schema", "policy") else argv[0]


def test_the_list_covers_every_command() -> None:
    parser = cli._parser()
    assert {leaf.prog.removeprefix(parser.prog).strip() for leaf in _leaves(parser)} == {
        _path(argv) for argv in COMMANDS
    }


@pytest.mark.parametrize("argv", COMMANDS, ids=_path)
def test_a_failing_command_exits_70_without_the_errors_text(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: Any
) -> None:
    def boom(settings: Any, args: Any) -> int:
        raise RuntimeError(f"Failing row contains ({MARKER})")

    parser = cli._parser()
    for leaf in _leaves(parser):
        leaf.set_defaults(run=boom)
    monkeypatch.setattr(cli, "_parser", lambda: parser)
    with caplog.at_level(logging.DEBUG):
        assert cli.main(argv) == 70
    out = capsys.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and "failed" in logged
    assert MARKER not in logged + out.out + out.err
