"""Plain-text tables and credit amounts, as the tools print them (counts and money, never content)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MICRO_PER_CREDIT = 1_000_000


def format_credits(micro: int) -> str:
    """`1234567` -> `"1.234567"`: integer division only, six decimals."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Plain-text table: columns padded to their widest cell, integers right-aligned."""
    body = [list(row) for row in rows]
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in body]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(body) and all(isinstance(row[i], int) for row in body) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    out = [line(cells[0]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells[1:])
    if not body:
        out.append("(none)")
    return "\n".join(out)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)
