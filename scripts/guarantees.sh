#!/usr/bin/env bash
# The figures of docs/guarantees.md, reproduced with one command:
#
#   scripts/guarantees.sh [KILLS]        (default 5; e.g. scripts/guarantees.sh 50)
#
# Runs, against a real broker and a real database:
#   tests/integration/test_crash.py           kill -9 under load (one worker; two workers, one killed),
#                                             KILLS kills each, then digest equality with a replay
#   tests/integration/test_replay.py          replay over the live database and into an empty one
#   tests/integration/test_hostile_input.py   the hostile-record corpus (tests/data/hostile_records.py)
#   tests/integration/test_*fault*.py         dependency faults, when present
# then prints the measured figures (from the crash tests' MINICHAT_GUARANTEES_OUT report), the
# hostile corpus by outcome, and the result of each test file. Exit status: pytest's.
#
# Services: MINICHAT_KAFKA_BOOTSTRAP_SERVERS and MINICHAT_DATABASE_URL when both are set, else the
# local stack (scripts/stack.sh up, as `make test` does). Extra pytest options: PYTEST_ARGS="-x".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

kills=${1:-5}
[[ $kills =~ ^[1-9][0-9]*$ ]] || {
    echo "usage: scripts/guarantees.sh [KILLS]   (a positive number of kills, default 5)" >&2
    exit 2
}

make --no-print-directory venv >&2
if [[ -z ${MINICHAT_KAFKA_BOOTSTRAP_SERVERS:-} || -z ${MINICHAT_DATABASE_URL:-} ]]; then
    exports=$(scripts/stack.sh up)
    eval "$exports"
fi
export MINICHAT_KAFKA_BOOTSTRAP_SERVERS MINICHAT_DATABASE_URL

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
files=(tests/integration/test_crash.py tests/integration/test_replay.py)
[[ -f tests/integration/test_hostile_input.py ]] && files+=(tests/integration/test_hostile_input.py)
for f in tests/integration/test_*fault*.py; do
    [[ -f $f ]] && files+=("$f")
done

echo "guarantees: $kills kills per crash test; ${files[*]}" >&2
echo "guarantees: Kafka $MINICHAT_KAFKA_BOOTSTRAP_SERVERS, PostgreSQL $MINICHAT_DATABASE_URL" >&2
started=$SECONDS
rc=0
# shellcheck disable=SC2086  # PYTEST_ARGS is word-split on purpose
MINICHAT_CRASH_KILLS=$kills MINICHAT_GUARANTEES_OUT="$work/crash.jsonl" \
    .venv/bin/pytest -p no:cacheprovider --junitxml="$work/junit.xml" ${PYTEST_ARGS:-} "${files[@]}" >&2 || rc=$?

.venv/bin/python - "$work/crash.jsonl" "$work/junit.xml" "$((SECONDS - started))" <<'PY'
import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from minichat.tools.tables import format_table

report, junit, elapsed = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

print("kill -9 under load, then replay (tests/integration/test_crash.py)")
runs = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
rows = [
    [
        r["variant"],
        r["kills"],
        r["kills_during_start"],
        r["events_processed"],
        r["commands"],
        r["decisions_resent_after_crash"],
        r["accepted_turns"],
        r["settled_turns"],
        f'{r["billing_distinct"]}/{r["billing_records"]}',
        r["lost"],
        r["duplicated"],
        f'{r["replays_identical_digest"]}/{r["replays"]}',
        r.get("turns_ended_differently", "-"),
        r.get("digest_differences", {}).get("chat_turns", 0),
        round(r["elapsed_s"]),
    ]
    for r in runs
]
print(
    format_table(
        [
            "run", "kills", "at start-up", "events", "commands", "decisions re-sent", "accepted",
            "settled once", "billing distinct/raw", "lost", "duplicated", "identical digests",
            "turns ended differently", "turns differing", "s",
        ],
        rows,
    )
)
for r in runs:
    if r["digest_differences"]:
        print(f'{r["variant"]}: live vs rebuilt, rows differing per table and column: {r["digest_differences"]}')
    for failure in r["failures"]:
        print(f'{r["variant"]}: FAILED: {failure.splitlines()[0]}')

try:
    from tests.data.hostile_records import CORPUS, FIELD_WIDTHS, DeadLettered, Ignored, Rejected
except ImportError:
    print("\nhostile records: corpus not found (tests/data/hostile_records.py)")
else:
    def handled(outcome: object) -> str:
        if isinstance(outcome, DeadLettered):
            return f"dead-lettered {outcome.code}"
        if isinstance(outcome, Rejected):
            return f"rejected {outcome.code}"
        if isinstance(outcome, Ignored):
            return "applied, changes nothing"
        return type(outcome).__name__

    corpus = [*CORPUS, *FIELD_WIDTHS]
    counts = Counter((h.topic, handled(h.outcome)) for h in corpus)
    print(f"\nhostile records tried: {len(corpus)} (tests/data/hostile_records.py)")
    print(format_table(["topic", "handled as", "records"], [[*k, n] for k, n in sorted(counts.items())]))

print("\ntest files")
results: dict[str, Counter[str]] = {}
if junit.exists():
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = case.get("classname", "?").split(".")
        name = "/".join(module[: module.index(next(m for m in module if m.startswith("test_"))) + 1]) + ".py"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        results.setdefault(name, Counter())[outcome] += 1
print(
    format_table(
        ["file", "passed", "failed", "skipped"],
        [[f, c["passed"], c["failed"], c["skipped"]] for f, c in sorted(results.items())],
    )
)
print(f"\nelapsed: {elapsed} s")
PY
exit "$rc"
