"""The `minichat` command line as the tests see it: every command's own parser, by its path."""

from __future__ import annotations

import argparse

from minichat import cli


def _parsers(parser: argparse.ArgumentParser | None) -> tuple[dict[str, argparse.ArgumentParser], ...]:
    """(the commands a user can run, the parsers that only choose a subcommand), by their path."""
    root = parser or cli._parser()
    commands: dict[str, argparse.ArgumentParser] = {}
    groups: dict[str, argparse.ArgumentParser] = {}

    def walk(node: argparse.ArgumentParser) -> None:
        subs = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
        (groups if subs else commands)[node.prog.removeprefix(root.prog).strip()] = node
        for sub in subs:
            for child in sub.choices.values():
                walk(child)

    walk(root)
    return commands, groups


def command_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """`{"db migrate": <its parser>, "worker": ..., ...}`: the commands a user can run."""
    return _parsers(parser)[0]


def group_parsers(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """The parsers that only choose a subcommand (`minichat`, `minichat db`, ...)."""
    return _parsers(parser)[1]


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's options by their long name (`--tenant`), `--help` left out."""
    return {
        name: action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction)
        for name in action.option_strings
        if name.startswith("--")
    }
