"""The repository explains itself: no tracked file points at a document outside it, and every
pointer inside it leads somewhere (a cited heading, a Markdown link and its anchor, a test name).

The patterns below are written so that this file does not match them itself (`/wor[k]/`).
"""

from __future__ import annotations

import re
import subprocess
from functools import cache

import pytest

from tests.unit.markdown import ROOT, Document, plain

OUTSIDE = re.compile(
    r"\.\./shared|/wor[k]/|shared/CONTRAC[T]|CONTRAC[T]\.md|DESIGN-NOTE[S]|CONTRAC[T] (?:section|§)"
    r"|[Cc]ontrac[t] (?:sections? \d|§)|reference/[\w-]+\.m[d]|quota-and-turns\.m[d]|peers\.m[d]"
)
"""References to files that are not in the repository: the shared contract and notes, absolute
paths of one machine, and the shared contract's numbered sections (docs/contract.md has them)."""

CITATION = re.compile(
    r"`?(docs/[\w-]+\.md)`?(?:[,:(]|\s)[\s#\-]*\(?"
    r"(\"[^\"\n]+\"(?:(?:,|\s+and|,\s+and)[\s#\-]*\"[^\"\n]+\")*)"
)
"""A document of the repository and one or more quoted headings of it, separated by commas or "and"."""

FROZEN = {("minichat/storage/migrations/0001_initial.sql", "-- minichat schema v1: CON" + "TRACT section 8.")}
"""Lines that may not change: an applied migration's checksum covers its comments, so editing one
would stop `minichat db migrate` on every database that has it. Its "section 8" is
docs/contract.md, "Storage"."""

LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
TEST_NAME = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")


@cache
def tracked() -> dict[str, str]:
    """Every tracked text file's content, by its path in the repository."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover (not a checkout)
        pytest.skip(f"not a git checkout: {exc}")
    files = {}
    for name in listing.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        try:
            files[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
    return files


@cache
def document(name: str) -> Document:
    return Document.read(ROOT / name)


def _line(text: str, at: int) -> int:
    return text.count("\n", 0, at) + 1


def test_no_file_refers_to_a_document_outside_the_repository() -> None:
    found = [
        f"{name}:{_line(text, m.start())}: {m.group(0)}"
        for name, text in tracked().items()
        for m in OUTSIDE.finditer(text)
        if (name, text.splitlines()[_line(text, m.start()) - 1]) not in FROZEN
    ]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_the_scan_sees_the_files_it_should() -> None:
    """A sanity check of the scan itself: it reads code, tests, docs and configuration."""
    names = set(tracked())
    assert {"README.md", "docs/contract.md", "minichat/cli/__init__.py", "docker-compose.yml"} <= names
    assert any(name.startswith("tests/integration/") for name in names)
    assert OUTSIDE.search("see ../" + "shared/CON" + "TRACT.md")
    assert OUTSIDE.search("(CON" + "TRACT section 9)")


def _citable(doc: Document) -> set[str]:
    """What a citation may name: a heading (also without its parenthesised tail, "The ordered
    engine" for "The ordered engine (the input path)"), or a bold paragraph label (**Lock order.**)."""
    titles = {plain(s.title) for s in doc.sections[1:]}
    short = {re.sub(r"\s*\(.*\)$", "", title) for title in titles}
    labels = {plain(label) for label in re.findall(r"^\*\*([^*\n]+?)\.?\*\*", doc.text, re.MULTILINE)}
    return titles | short | labels


def test_every_cited_heading_exists() -> None:
    missing = []
    for name, text in tracked().items():
        for m in CITATION.finditer(text):
            target = m.group(1)
            if target not in tracked():
                missing.append(f"{name}:{_line(text, m.start())}: {target} is not in the repository")
                continue
            headings = _citable(document(target))
            for cited in re.findall(r"\"([^\"\n]+)\"", m.group(2)):
                if plain(cited) not in headings:
                    missing.append(f"{name}:{_line(text, m.start())}: {target} has no heading {cited!r}")
    assert not missing, "\n".join(missing)


def test_every_markdown_link_leads_to_a_file_and_anchor() -> None:
    broken = []
    for name, text in tracked().items():
        if not name.endswith(".md"):
            continue
        for m in LINK.finditer(text):
            href = m.group(1)
            if re.match(r"[a-z]+:", href):
                continue  # an external URL
            path, _, anchor = href.partition("#")
            target = (ROOT / name).parent / path if path else ROOT / name
            relative = target.resolve().relative_to(ROOT).as_posix() if target.exists() else None
            if relative is None or (relative not in tracked() and not target.is_dir()):
                broken.append(f"{name}: {href}: no such file in the repository")
            elif anchor and anchor not in document(relative).anchors():
                broken.append(f"{name}: {href}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_every_named_test_exists() -> None:
    unknown = []
    for name, text in tracked().items():
        for m in TEST_NAME.finditer(text):
            path, test = m.groups()
            source = tracked().get(path, "")
            if not re.search(rf"^(?:async )?def {test}\(", source, re.MULTILINE):
                unknown.append(f"{name}:{_line(text, m.start())}: {path}::{test} does not exist")
    assert not unknown, "\n".join(unknown)


def test_an_allowed_reference_is_not_flagged() -> None:
    assert not OUTSIDE.search("docs/contract.md, 'Order of processing'")
