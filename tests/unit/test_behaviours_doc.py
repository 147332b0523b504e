"""docs/behaviours.md defines every worked-example id the repository cites (`b42` in a pytest id, a
test name or prose), and every test it names exists. The old way of citing them, by the number
and section of a document outside the repository, is gone.

The patterns below are written so that this file does not match them itself (`§[8]`, `b[0-9]`).
"""

from __future__ import annotations

import re
from functools import cache

from tests.unit.markdown import ROOT, Document

BEHAVIOURS = "docs/behaviours.md"
SCANNED = ("tests", "docs", "minichat")

PROSE_ID = re.compile(r"(?<![\w.])b(\d\d)(?!\w)")
"""`b42` standing alone: in prose, a pytest id (`id="b42-actual"`, `"b19-b63-..."`), a comment.
Not `b64decode` nor `base64.b64encode`."""
TEST_NAME_IDS = re.compile(r"\btest_((?:b\d\d_)+)")
"""The ids at the start of a test's name: `test_b66_b67_b68_first_terminal_wins`."""
NAMED_TEST = re.compile(r"(tests/[\w/]+\.py)::(test_\w+)")
OLD_CITATION = re.compile(r"reference behaviou?rs?|§ ?[8]\.|behaviou?rs? \d+ \(§")


def cited_ids(text: str) -> set[str]:
    found = {f"b{n}" for n in PROSE_ID.findall(text)}
    for names in TEST_NAME_IDS.findall(text):
        found |= set(re.findall(r"b\d\d", names))
    return found


@cache
def sources() -> dict[str, str]:
    files = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in {".py", ".md"} and path.is_file():
                files[path.relative_to(ROOT).as_posix()] = path.read_text(encoding="utf-8")
    return files


@cache
def defined() -> dict[str, str]:
    """The rows of docs/behaviours.md, by their id: the whole row's text."""
    rows = {}
    for section in Document.read(ROOT / BEHAVIOURS).sections:
        for table in section.tables():
            if table.header[:1] != ["id"]:
                continue
            for row in table.rows:
                assert row[0] not in rows, f"{BEHAVIOURS} defines {row[0]} twice"
                rows[row[0]] = " | ".join(row)
    return rows


def test_the_doc_defines_the_ids_in_order() -> None:
    ids = [i for i in defined() if re.fullmatch(r"b\d\d", i)]
    assert ids == sorted(ids)
    assert {"b01", "b42", "b91", "D6", "K4", "M2"} <= set(defined())


def test_every_cited_id_is_defined() -> None:
    missing = [
        f"{name}: {i}"
        for name, text in sources().items()
        if name != BEHAVIOURS
        for i in sorted(cited_ids(text))
        if i not in defined()
    ]
    assert not missing, f"ids cited but not defined in {BEHAVIOURS}:\n" + "\n".join(missing)


def test_every_test_the_doc_names_exists() -> None:
    named = NAMED_TEST.findall(sources()[BEHAVIOURS])
    assert len(named) > 50
    unknown = [
        f"{path}::{test}"
        for path, test in named
        if not re.search(rf"^(?:async )?def {test}\(", sources().get(path, ""), re.MULTILINE)
    ]
    assert not unknown, f"{BEHAVIOURS} names tests that do not exist:\n" + "\n".join(unknown)


def test_a_row_names_the_tests_that_cite_its_id() -> None:
    """A test whose name or parameters cite an id is listed on that id's row."""
    unlisted = []
    for name, text in sources().items():
        if not name.startswith("tests/"):
            continue
        for m in re.finditer(r"^(?:async )?def (test_\w+)\(", text, re.MULTILINE):
            if TEST_NAME_IDS.match(m.group(1)):
                for i in cited_ids(m.group(1)):
                    if f"{name}::{m.group(1)}" not in defined().get(i, ""):
                        unlisted.append(f"{i}: {name}::{m.group(1)}")
    assert not unlisted, f"tests not listed on their row of {BEHAVIOURS}:\n" + "\n".join(unlisted)


def test_no_file_cites_behaviours_the_old_way() -> None:
    found = [
        f"{name}: {m.group(0)!r}"
        for name, text in sources().items()
        if name != "tests/unit/test_behaviours_doc.py"
        for m in OLD_CITATION.finditer(text)
    ]
    assert not found, "cite behaviours by their id (docs/behaviours.md):\n" + "\n".join(found)


def test_the_scan_finds_ids_where_they_are_written() -> None:
    assert cited_ids('pytest.param(1, id="b' + '19-b63-two-rows")') == {"b19", "b63"}
    assert cited_ids("def test_b" + "66_b67_first_wins") == {"b66", "b67"}
    assert cited_ids("b" + "10/b11: the surcharge") == {"b10", "b11"}
    assert cited_ids("base64.b64decode(x); b64encode") == set()
    assert OLD_CITATION.search("reference " + "behaviour 40")
    assert OLD_CITATION.search("(§" + "8.4)")
