"""The project's Markdown documents read as data: headings, tables, code spans, fenced blocks.

Just enough Markdown for the tests that hold the documents to the code (`test_contract_doc.py`,
`test_guides.py`, `test_self_contained.py`): pipe tables, backticked names, GitHub heading anchors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"`([^`]+)`")
_MARKER = re.compile(r"^<!--\s*(.*?)\s*-->$")


@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]

    def column(self, name: str) -> int:
        return self.header.index(name)


@dataclass
class Section:
    level: int
    title: str
    lines: list[str] = field(default_factory=list)
    """The section's own lines, up to the next heading of any level."""

    def tables(self) -> list[Table]:
        return _tables(self.lines)

    def table(self) -> Table:
        """The one table of this section."""
        found = self.tables()
        assert len(found) == 1, f"section {self.title!r} has {len(found)} tables, expected one"
        return found[0]


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its lines, and the `<!-- ... -->` marker right above it."""

    language: str
    lines: list[str]
    line: int
    marker: str | None

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class Document:
    path: Path
    text: str = ""
    sections: list[Section] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> Document:
        doc = cls(path, path.read_text(encoding="utf-8"))
        doc._parse()
        return doc

    def _parse(self) -> None:
        current = Section(0, "")
        self.sections.append(current)
        fence: str | None = None
        block: list[str] = []
        language, start, marker, previous = "", 0, None, ""
        for number, line in enumerate(self.text.splitlines(), start=1):
            opening = _FENCE.match(line)
            if fence is not None:
                if line.strip().startswith(fence) and line.strip() == fence[0] * len(line.strip()):
                    self.blocks.append(Block(language, block, start, marker))
                    fence, block, previous = None, [], line
                else:
                    block.append(line)
                current.lines.append(line)
                continue
            if opening:
                fence, language, start = opening.group(2), opening.group(3), number
                found = _MARKER.match(previous.strip())
                marker = found.group(1) if found else None
                current.lines.append(line)
                previous = line
                continue
            heading = _HEADING.match(line)
            if heading:
                current = Section(len(heading.group(1)), heading.group(2))
                self.sections.append(current)
            else:
                current.lines.append(line)
            if line.strip():
                previous = line

    def prose(self) -> str:
        """The text without its fenced blocks (so backticks pair up as code spans)."""
        lines, fence = [], False
        for line in self.text.splitlines():
            if _FENCE.match(line):
                fence = not fence
            elif not fence:
                lines.append(line)
        return "\n".join(lines)

    def section(self, title: str) -> Section:
        """The one section whose heading reads `title` (backticks ignored)."""
        found = [s for s in self.sections if plain(s.title) == plain(title)]
        assert len(found) == 1, f"{self.path.name}: {len(found)} sections titled {title!r}"
        return found[0]

    def anchors(self) -> set[str]:
        """The anchors GitHub gives this document's headings."""
        seen: dict[str, int] = {}
        result: set[str] = set()
        for section in self.sections[1:]:
            base = slug(section.title)
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
        return result


def plain(text: str) -> str:
    return text.replace("`", "").strip()


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).lower().strip()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def code_spans(text: str) -> list[str]:
    return _CODE_SPAN.findall(text)


def names(table: Table, column: int = 0) -> list[str]:
    """The first code span of each row's cell in `column` (the row's name)."""
    result = []
    for row in table.rows:
        spans = code_spans(row[column])
        assert spans, f"row {row} names nothing in backticks in column {column}"
        result.append(spans[0])
    return result


def _cells(line: str) -> list[str]:
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def _tables(lines: list[str]) -> list[Table]:
    tables: list[Table] = []
    rows: list[list[str]] = []
    in_fence = False
    for line in [*lines, ""]:
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and line.strip().startswith("|"):
            rows.append(_cells(line))
            continue
        if rows:
            assert len(rows) >= 2 and set("".join(rows[1])) <= set("-: "), f"not a table: {rows[:2]}"
            tables.append(Table(rows[0], rows[2:]))
            rows = []
    return tables
