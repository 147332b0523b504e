"""`minichat replay` (a rebuild, in the code) as the operator runs it (a subprocess): over the
drained database (a no-op) and into an empty migrated one, with the digests that say whether they
agree."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

from minichat.bench.probe import digest_of
from minichat.bench.scratch import runtime_url_for, scratch_database
from minichat.bench.workers import child_env, settings_env
from minichat.settings import Settings


@dataclass(frozen=True)
class RebuildRun:
    target: str
    """`drained` (the live database: must change nothing) or `empty` (a rebuild)."""
    records: int
    applied: int
    seconds: float
    """The replay's own elapsed time (its summary), without the interpreter's start."""
    wall_s: float
    cpu_s: float
    digest: str
    digest_equal: bool
    """`drained`: the digest did not change; `empty`: the rebuild's digest equals the live one."""

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def replay_cli(settings: Settings, within: float) -> tuple[dict[str, Any], float, float]:
    """Run `minichat replay --json` against `settings`; (its summary, wall seconds, CPU seconds)."""
    started, cpu_before = time.monotonic(), _children_cpu()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "minichat.cli",
        "replay",
        "--json",
        "--no-progress",
        env=child_env(settings_env(settings)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"minichat replay did not finish within {within:.0f}s") from None
    wall, cpu = time.monotonic() - started, _children_cpu() - cpu_before
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-3000:]
        raise RuntimeError(f"minichat replay exited with {proc.returncode}:\n{tail}")
    lines = out.decode().strip().splitlines()
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary, wall, cpu


async def rebuild_over_live(settings: Settings, live_digest: str, within: float) -> RebuildRun:
    """`minichat replay` over the live database: every record already applied, nothing changes."""
    summary, wall, cpu = await replay_cli(settings, within)
    after = await digest_of(settings)
    return _run("drained", summary, wall, cpu, after, after == live_digest)


async def rebuild_into_empty(settings: Settings, live_digest: str, within: float) -> RebuildRun:
    """`minichat replay` into an empty migrated database; compare its digest with the live one."""
    async with scratch_database(settings.admin_url, "rebuild") as url:
        target = settings.model_copy(
            update={"database_url": runtime_url_for(settings, url), "admin_database_url": url}
        )
        summary, wall, cpu = await replay_cli(target, within)
        rebuilt = await digest_of(target)
    return _run("empty", summary, wall, cpu, rebuilt, rebuilt == live_digest)


def _run(
    target: str, summary: dict[str, Any], wall: float, cpu: float, digest: str, equal: bool
) -> RebuildRun:
    return RebuildRun(
        target=target,
        records=int(summary["read"]),
        applied=int(summary["applied"]),
        seconds=float(summary["elapsed_s"]),
        wall_s=wall,
        cpu_s=cpu,
        digest=digest,
        digest_equal=equal,
    )
