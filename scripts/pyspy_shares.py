#!/usr/bin/env python3
"""Shares of a `py-spy record --format raw` profile of a minichat worker (docs/performance.md).

    .venv/bin/py-spy record --pid PID --duration 20 --rate 200 --format raw --output worker.txt
    python3 scripts/pyspy_shares.py worker.txt

Each sample is put in the first category whose marker is on its stack, in this order: waiting in
the event loop (the innermost frame is the selector), decode (`MergedBatches.decode`: pydantic
`validate_json`), produce (`send_all`), the merge (records into lanes, released in order), SQL
(any asyncpg frame: encoding, the socket writes, waiting for results), domain
(`minichat/domain/`), other minichat code, Kafka fetch (aiokafka's consumer), faust/mode
machinery, the rest. Then the hottest innermost frames.
"""

from __future__ import annotations

import sys
from collections import Counter


def _in(frame: str, *packages: str) -> bool:
    """Whether a `function (path/file.py:line)` frame is in one of `packages`."""
    return frame.rpartition("(")[2].startswith(packages)


RULES = (
    ("event loop waiting (select)", lambda s: "EpollSelector.select" in s[-1]),
    ("decode (pydantic validate_json)", lambda s: any("MergedBatches.decode" in f for f in s)),
    ("produce (decisions, dead letters)", lambda s: any("send_all" in f or "_deliver" in f for f in s)),
    (
        "merge (fetched records into lanes)",
        lambda s: any("OrderedMerge." in f or "source_record" in f for f in s),
    ),
    ("SQL (asyncpg)", lambda s: any("asyncpg/" in f for f in s)),
    ("domain (minichat/domain)", lambda s: any("minichat/domain/" in f for f in s)),
    ("other minichat code", lambda s: any("minichat/" in f and "minichat/cli/" not in f for f in s)),
    ("Kafka fetch (aiokafka consumer)", lambda s: any("aiokafka/consumer" in f for f in s)),
    ("faust/mode, event loop, thread hand-offs", lambda s: any(_in(f, "faust/", "mode/") for f in s)),
    ("other (asyncio, threads, stdlib)", lambda s: True),
)


def main(path: str) -> None:
    shares: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    with open(path) as raw:
        for line in raw:
            stack_text, _, count = line.rstrip("\n").rpartition(" ")
            if not stack_text:
                continue
            stack, n = stack_text.split(";"), int(count)
            total += n
            shares[next(name for name, matches in RULES if matches(stack))] += n
            leaves[stack[-1]] += n
    print(f"{total} samples")
    for name, _ in RULES:
        print(f"{100 * shares[name] / total:5.1f}%  {name}")
    print("\nhottest innermost frames")
    for frame, n in leaves.most_common(15):
        print(f"{100 * n / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main(sys.argv[1])
