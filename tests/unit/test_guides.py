"""The guides cannot rot: their commands, code and tables are checked against the code.

What is checked here, without a broker or a database:

- every `minichat ...` command line in a shell block of the README, `docs/*.md` and `scripts/*.sh`
  parses with the real argument parser, and every `minichat ...` in backticks in the prose names a
  real command and real options;
- every `make` target and `scripts/` file a shell block names exists;
- every Python block compiles, its imports resolve, and its `client.<method>(...)` calls name
  methods and keyword arguments `GatewayClient` has;
- the gateway guide's tables of decisions, error codes, dead-letter codes, events and client calls,
  and the operations guide's tables of metrics, alerts and exit codes, name what the code has.

The blocks marked `<!-- runnable: ... -->` are also run, against a real deployment, by
`tests/integration/test_guides.py`; `make demo` runs `scripts/demo.sh`.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import re
import shlex
import uuid
from collections.abc import Iterator
from typing import get_args

import pytest
import yaml

from minichat import cli
from minichat.client import GatewayClient
from minichat.models.events import DEAD_LETTER_CODES, DECISION_ERROR_CODES, INPUT_MODELS, TurnDecision
from minichat.processors import errors
from minichat.processors.engine import FAULT_EXIT
from minichat.processors.metrics import _HELP as METRICS
from tests.unit.commands import options
from tests.unit.markdown import DOCS, ROOT, Document, code_spans, names, slug

GUIDES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SHELL = {"bash", "sh", "shell", "console"}
PLACEHOLDERS = {
    "TENANT": str(uuid.uuid4()),
    "CHAT": str(uuid.uuid4()),
    "REQUEST": str(uuid.uuid4()),
    "USER": str(uuid.uuid4()),
    "TOKEN": "token",
    "REBUILD_DATABASE_URL": "postgresql://minichat@127.0.0.1/rebuild",
    "MINICHAT_CRASH_KILLS": "50",
    "BENCH": "1",
    "@": "",
}
"""Values for the shell variables the guides use, so that their command lines parse."""
OPERATORS = {";", "&&", "||", "|", "&", ")", "(", ">", ">>", "<", "2>", "{", "}"}
GATEWAY = Document.read(DOCS / "gateway-guide.md")
OPERATIONS = Document.read(DOCS / "operations.md")


# ------------------------------------------------------------------------------------ shell blocks


def _shell_texts() -> Iterator[tuple[str, str]]:
    """(where, text) of every shell block of the guides and every script."""
    for path in GUIDES:
        for block in Document.read(path).blocks:
            if block.language in SHELL:
                yield f"{path.relative_to(ROOT)}:{block.line}", block.text
    for path in SCRIPTS:
        yield str(path.relative_to(ROOT)), path.read_text()


def _logical_lines(text: str) -> Iterator[str]:
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().removeprefix("$ ")
        if line and not line.startswith("#"):
            yield line


def _expand(word: str) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in PLACEHOLDERS, f"add a value for ${name} to PLACEHOLDERS"
        return PLACEHOLDERS[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+|@)", value, word)


def _commands(line: str) -> Iterator[list[str]]:
    """The argument lists of every `minichat` invocation on a shell line, `$(...)` included."""
    inner = re.findall(r"\$\(([^()]*)\)", line)
    for text in inner:
        yield from _commands(text)
    line = re.sub(r"\$\(([^()]*)\)", "X", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>{}")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    tokens = list(lexer)
    for i, token in enumerate(tokens):
        if token.rsplit("/", 1)[-1] != "minichat":
            continue
        args = []
        rest = tokens[i + 1 :]
        for j, word in enumerate(rest):
            redirect = word.isdigit() and j + 1 < len(rest) and rest[j + 1][0] in "<>"  # `2> file`
            if word in OPERATORS or redirect or re.fullmatch(r"[<>&]+\d?", word):
                break
            args.append(_expand(word))
        yield [a for a in args if a]


def test_every_minichat_command_line_in_the_guides_parses() -> None:
    seen = 0
    for where, text in _shell_texts():
        for line in _logical_lines(text):
            for argv in _commands(line):
                seen += 1
                try:
                    cli._parser().parse_args(argv)
                except SystemExit as exc:
                    pytest.fail(f"{where}: `minichat {' '.join(argv)}` does not parse (exit {exc.code})")
    assert seen >= 15, f"only {seen} command lines found: is the block scan broken?"


def _resolve(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of the command `words` name, and the words after its name."""
    parser = cli._parser()
    while words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or words[0] not in subs[0].choices:
            break
        parser, words = subs[0].choices[words[0]], words[1:]
    return parser, words


def test_every_minichat_command_in_the_prose_exists() -> None:
    for path in GUIDES:
        for span in code_spans(Document.read(path).prose()):
            span = " ".join(span.split())
            if not span.startswith("minichat "):
                continue
            parser, rest = _resolve(shlex.split(span)[1:])
            is_group = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
            if is_group and rest and not rest[0].startswith("-"):
                assert re.fullmatch(r"<\w+>|[A-Z]+|\.\.\.", rest[0]), (
                    f"{path.name}: `{span}`: no such command"
                )
            known = options(parser) | {"--help": None}
            for word in rest:
                if word.startswith("--"):
                    assert word.split("=")[0] in known, f"{path.name}: `{span}`: no option {word}"


def test_every_make_target_and_script_named_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.MULTILINE))
    for where, text in _shell_texts():
        for line in _logical_lines(text):
            for target in re.findall(r"(?:^|[;&|(]\s*)make (?:-[\w-]+ )*([\w-]+)", line):
                assert target in targets, f"{where}: `make {target}` is not a target of the Makefile"
            for script in re.findall(r"(?<![\w/.])(scripts/[\w.-]+)", line):
                assert (ROOT / script).exists(), f"{where}: {script} does not exist"


# ----------------------------------------------------------------------------------- Python blocks


def _python_blocks() -> Iterator[tuple[str, str]]:
    for path in GUIDES:
        for block in Document.read(path).blocks:
            if block.language == "python":
                yield f"{path.relative_to(ROOT)}:{block.line}", block.text


def test_python_blocks_compile_import_and_call_the_client_as_it_is() -> None:
    blocks = list(_python_blocks())
    assert blocks, "no Python block found"
    for where, text in blocks:
        tree = ast.parse(text, filename=where)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{where}: {node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "client"
            ):
                method = getattr(GatewayClient, node.func.attr, None)
                assert callable(method), f"{where}: GatewayClient has no {node.func.attr}"
                parameters = inspect.signature(method).parameters
                for keyword in node.keywords:
                    assert keyword.arg in parameters, f"{where}: {node.func.attr} takes no {keyword.arg}"


# ------------------------------------------------------------------------------ the gateway guide


def _decision_values() -> set[str]:
    return set(get_args(TurnDecision.model_fields["decision"].annotation))


def test_the_gateway_guide_says_what_to_do_on_every_decision_and_code() -> None:
    tables = GATEWAY.section("Decisions and what to do").tables()
    assert len(tables) == 2
    assert set(names(tables[0])) == _decision_values()
    assert set(names(tables[1])) == set(DECISION_ERROR_CODES)
    assert set(names(GATEWAY.section("Dead letters").table())) == set(DEAD_LETTER_CODES)


def test_the_gateway_guide_says_when_to_send_every_gateway_event() -> None:
    sent = set(names(GATEWAY.section("Which event to send when").table(), column=1))
    watchdog_only = {"turn.orphaned", "usage.grace_expired"}
    assert sent == set(INPUT_MODELS) - watchdog_only


def test_the_gateway_guide_lists_every_client_call() -> None:
    documented = {
        name for row in GATEWAY.section("The Python client").table().rows for name in code_spans(row[0])
    }
    public = {
        name
        for name, member in inspect.getmembers(GatewayClient, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert documented == public


# ---------------------------------------------------------------------------- the operations guide


def test_the_operations_guide_lists_every_metric() -> None:
    assert set(names(OPERATIONS.section("Metrics").table())) == set(METRICS)


def test_every_alert_has_its_runbook_section_and_links_to_it() -> None:
    rules = yaml.safe_load((DOCS / "alerts.yml").read_text())["groups"][0]["rules"]
    alerts = {rule["alert"]: rule for rule in rules}
    level = OPERATIONS.section("Alerts").level
    index = OPERATIONS.sections.index(OPERATIONS.section("Alerts"))
    runbooks = []
    for section in OPERATIONS.sections[index + 1 :]:
        if section.level <= level:
            break
        if section.level == level + 1:
            runbooks.append(section.title)
    assert set(runbooks) == set(alerts)
    for name, rule in alerts.items():
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{slug(name)}", name
        assert slug(name) in OPERATIONS.anchors()
        assert "Alerts" in (DOCS / "alerts.yml").read_text().splitlines()[1]


def test_the_exit_codes_are_the_codes() -> None:
    documented = {int(code) for code in names(OPERATIONS.section("Exit codes").table())}
    interrupted, invariants_failed = 130, 1  # `minichat replay` on Ctrl-C; `minichat simulate`
    assert documented == {0, invariants_failed, cli.EXIT_SETUP, errors.EXIT_FATAL, FAULT_EXIT, interrupted}


def test_the_readmes_first_screen_says_what_it_is_for_the_two_commands_and_the_guides() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    for link in ("docs/contract.md", "docs/gateway-guide.md", "docs/operations.md"):
        assert f"]({link})" in first_screen, f"the README's first screen does not link {link}"
    assert "make demo" in first_screen and "make test" in first_screen
