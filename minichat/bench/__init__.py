"""`minichat bench`: speed, latency and correctness measured side by side in one run, on one stack.

Phases (each on its own scratch database and topic prefix, all removed afterwards):

1. `ceiling`: what the PostgreSQL takes of admission-shaped writes (`ceiling.py`);
2. `drain`: a backlog of turns drained by 1, then 2, worker processes (`drain.py`);
3. `latency`: decision latency at fixed offered rates, one worker (`latency.py`);
4. `replay`: `minichat replay` over the first drain's database and into an empty one (`rebuilds.py`).

The results are printed as tables (`table.py`) and, with `--out`, written as JSON (`report.py`).
Progress goes to stderr. Nothing asserts a speed: this is an instrument.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from minichat.bench.options import PHASES, BenchOptions
from minichat.bench.progress import say
from minichat.settings import Settings

if TYPE_CHECKING:
    from minichat.bench.report import BenchResult

# The phases' modules (aiokafka, asyncpg, the simulator) are imported when a bench runs: the
# command line imports this package to build its parser.

__all__ = ["PHASES", "BenchOptions", "run_bench"]


def _options_json(options: BenchOptions) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()}


async def _measure(settings: Settings, options: BenchOptions, result: BenchResult, workdir: Path) -> None:
    from minichat.bench.ceiling import run_ceiling
    from minichat.bench.drain import run_drain
    from minichat.bench.latency import run_latency
    from minichat.bench.scratch import write_bench_policy
    from minichat.bench.traffic import bench_model
    from minichat.models.policy import load_policy

    policy_file = write_bench_policy(workdir)
    model = bench_model(load_policy(policy_file))
    if options.wants("ceiling"):
        say(f"ceiling: {options.ceiling_rounds} rounds of {options.turns} admission-shaped writes")
        ceiling = await run_ceiling(settings, model, options.turns, options.ceiling_rounds, options.seed)
        result.ceiling = ceiling
        say(f"ceiling: {ceiling.events_per_s:.0f} events/s (median)")
    # The replay phase replays the first drain's topics: it needs a drain even when not asked for one.
    replay = options.wants("replay")
    counts = options.workers if options.wants("drain") else options.workers[:1] if replay else ()
    for i, count in enumerate(counts):
        drained = await run_drain(
            settings, policy_file, model, count, options, workdir, noop_rebuild=i == 0 and replay
        )
        result.drains.append(drained)
    if options.wants("latency"):
        result.latency = await run_latency(settings, policy_file, model, options, workdir)
    result.replay = replay
    if options.wants("client"):
        from minichat.bench.client_overhead import run_client_overhead

        result.client = await run_client_overhead(settings, policy_file, model, options, workdir)


async def _reach_kafka(settings: Settings) -> None:
    """Bootstrap from the brokers once: a `KafkaConnectionError` when none answers."""
    from aiokafka.admin import AIOKafkaAdminClient

    from minichat.kafka_security import kafka_client_options

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # the error names the brokers: no line per attempt before it
    admin = AIOKafkaAdminClient(**kafka_client_options(settings))
    try:
        await admin.start()
    finally:
        await admin.close()
        quiet.setLevel(level)


async def run_bench(settings: Settings, options: BenchOptions, *, out: TextIO | None = None) -> int:
    """Run the selected phases, print the tables, write the JSON to `options.out`; 0 when done."""
    from minichat.bench.calibrate import calibrate
    from minichat.bench.machine import machine, speed_settings, versions
    from minichat.bench.report import BenchResult, to_json
    from minichat.bench.table import render

    out = out if out is not None else sys.stdout
    # The bench's own Kafka clients: no INFO chatter between the progress lines, and not the
    # fetcher's retried "not leader" errors of topics created a moment ago (real failures raise).
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.root.level))
    logging.getLogger("aiokafka.consumer.fetcher").setLevel(logging.CRITICAL)
    started, cpu = time.monotonic(), time.process_time()
    found, pg = await versions(settings.database_url)
    await _reach_kafka(settings)  # before minutes of PostgreSQL phases, not after them
    result = BenchResult(
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        options=_options_json(options),
        machine={**machine(), "calibration": await calibrate(settings.database_url)},
        versions=found,
        settings=speed_settings(settings, pg),
    )
    with tempfile.TemporaryDirectory(prefix="minichat-bench-") as tmp:
        await _measure(settings, options, result, Path(tmp))
    result.elapsed_s = time.monotonic() - started
    result.bench_cpu_s = time.process_time() - cpu
    doc = to_json(result)
    out.write(render(doc))
    out.flush()
    if options.out is not None:
        options.out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        say(f"wrote {options.out}")
    return 0
