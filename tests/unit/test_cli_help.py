"""`minichat <command> --help` is written for the people who run it: every command says what it
does, every option what it is and its default, and no text is a note to the project's
contributors (a reference to a document outside the package, "the only place that ...")."""

from __future__ import annotations

import argparse
import re

import pytest

from minichat import cli
from tests.unit.commands import command_parsers, group_parsers, options

COMMANDS = command_parsers()
GROUPS = group_parsers()
CONTRIBUTOR_NOTES = re.compile(r"CONTRACT|[Tt]he only place|\b[Ss]ection \d|§|\.\./|/wor[k]/|\b[Ii]ssue \d")


def _listed_help(path: str) -> str:
    """The one-line help of `path` in its parent's list of commands."""
    parent, _, name = path.rpartition(" ")
    subs = next(a for a in GROUPS[parent]._actions if isinstance(a, argparse._SubParsersAction))
    return next(choice.help or "" for choice in subs._choices_actions if choice.dest == name)


@pytest.mark.parametrize("path", sorted(COMMANDS) + sorted(p for p in GROUPS if p))
def test_every_command_says_what_it_does(path: str) -> None:
    parser = COMMANDS.get(path) or GROUPS[path]
    assert len(_listed_help(path)) > 10, f"minichat {path}: no line in its parent's list"
    assert parser.description and len(parser.description) > 20, f"minichat {path} --help: no description"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_says_what_it_is_and_its_default(path: str) -> None:
    for name, action in options(COMMANDS[path]).items():
        text = action.help or ""
        assert len(text) > 5 and text != argparse.SUPPRESS, f"minichat {path} {name}: no help"
        flag = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if not action.required:
            assert "default" in text, f"minichat {path} {name}: its help does not say its default"
        if flag:
            assert "default" in text, f"minichat {path} {name}: say what happens without the flag"


@pytest.mark.parametrize("path", sorted(COMMANDS) + sorted(GROUPS), ids=lambda path: path or "minichat")
def test_no_help_text_is_a_note_to_contributors(path: str) -> None:
    text = (COMMANDS.get(path) or GROUPS[path]).format_help()
    assert not CONTRIBUTOR_NOTES.search(text), f"minichat {path} --help: {CONTRIBUTOR_NOTES.search(text)}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_prints_and_exits_0(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*path.split(), "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: minichat {path}")


def test_the_worker_settings_options_are_every_contract_setting() -> None:
    """Each setting of the contract is also an option (docs/contract.md, "Settings")."""
    dests = {action.dest for action in options(COMMANDS["worker"]).values()}
    assert {
        "kafka_bootstrap_servers",
        "database_url",
        "topic_prefix",
        "group_id",
        "partitions",
        "policy_file",
        "web_port",
        "web_host",
        "read_tokens_file",
    } <= dests
