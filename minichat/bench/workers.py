"""Worker processes: spawn `minichat worker`, sample its CPU and memory from /proc, scrape its
`/metrics` page, stop it with SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from minichat.bench.procstat import read_stat
from minichat.settings import Settings

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float
    """utime + stime so far (seconds)."""
    peak_rss_kib: int
    """VmHWM: the process's peak resident set so far."""


def sample(pid: int) -> ProcSample:
    """CPU and peak memory of a running process, from /proc (Linux)."""
    cpu = read_stat(pid).own_s
    peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1])
    return ProcSample(cpu, peak)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of all cores busy between two `cpu_times()` readings (0..1): the worker, the
    broker, PostgreSQL, the bench, and anything else running on the machine."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total > 0 else 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def settings_env(settings: Settings) -> dict[str, str]:
    """Every setting as its `MINICHAT_*` variable: a worker runs with exactly what the bench reports."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"MINICHAT_{name.upper()}"] = text
    return env


def child_env(variables: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its `MINICHAT_*` variables, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICHAT_")}
    env.update(variables)
    return env


@dataclass
class Worker:
    proc: asyncio.subprocess.Process
    web_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.returncode is not None:
            raise RuntimeError(f"worker {self.pid} exited with {self.proc.returncode}:\n{self.log_tail()}")

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.web_port}/metrics"
        text = await asyncio.to_thread(_get, url)
        return parse_metrics(text)

    async def stop(self, within: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status; SIGKILL when it takes longer than `within`."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            await self.kill()
            raise RuntimeError(f"worker {self.pid} ignored SIGTERM for {within:.0f}s") from None

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
        return body.decode()


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, sorted labels): value}."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        labels = tuple(sorted(_LABEL.findall(match[2] or "")))
        out[(match[1], labels)] = float(match[3])
    return out


def metric_total(
    scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str
) -> dict[str, int]:
    """A counter summed over workers, by its label values joined with `/` (`""` without labels)."""
    totals: dict[str, int] = {}
    for scrape in scrapes:
        for (metric, labels), value in scrape.items():
            if metric == name:
                key = "/".join(v for _, v in labels)
                totals[key] = totals.get(key, 0) + int(value)
    return totals


@asynccontextmanager
async def running_workers(settings: Settings, count: int, workdir: Path) -> AsyncIterator[list[Worker]]:
    """`count` `minichat worker` processes of one deployment, each with its own web port; killed on
    the way out if still running (a clean stop is `Worker.stop`)."""
    workers: list[Worker] = []
    try:
        for i in range(count):
            port = free_port()
            env = child_env(
                {**settings_env(settings), "MINICHAT_WEB_ENABLED": "true", "MINICHAT_WEB_PORT": str(port)}
            )
            log_path = workdir / f"worker-{settings.topic_prefix}{i}.log"
            with log_path.open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "minichat.cli",
                    "worker",
                    env=env,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    stdin=asyncio.subprocess.DEVNULL,
                    cwd=workdir,
                )
            workers.append(Worker(proc, port, log_path))
        yield workers
    finally:
        for worker in workers:
            await worker.kill()


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]

WORKER_STAGES = {
    "record wait": ("minichat_record_wait_seconds", ()),
    "transaction": ("minichat_batch_seconds", (("stage", "transaction"),)),
    "produce": ("minichat_batch_seconds", (("stage", "produce"),)),
    "decision": ("minichat_decision_seconds", ()),
    **{
        f"cmd {stage}": ("minichat_stage_seconds", (("stage", stage),))
        for stage in ("fetch", "order", "assembly", "transaction", "produce")
    },
}
"""The worker's own timings (its histograms), by the stage the bench names them after."""


def stage_quantiles(before: Scrape, after: Scrape) -> dict[str, dict[str, float]]:
    """Per stage, the p50 and p99 (ms, a bucket's upper bound) of what the worker observed
    between two scrapes."""
    out: dict[str, dict[str, float]] = {}
    for stage, (name, labels) in WORKER_STAGES.items():
        found = _quantiles(_buckets([after], name, labels), _buckets([before], name, labels))
        if found:
            out[stage] = found
    return out


def histogram_quantiles(scrapes: list[Scrape], name: str) -> dict[str, float]:
    """p50 and p99 (ms, bucket bounds) of a histogram summed over the workers; empty without data."""
    return _quantiles(_buckets(scrapes, name, ()), {})


def _buckets(scrapes: list[Scrape], name: str, labels: tuple[tuple[str, str], ...]) -> dict[float, float]:
    """Cumulative counts by upper bound, summed over `scrapes`."""
    out: dict[float, float] = {}
    for scrape in scrapes:
        for (metric, found), value in scrape.items():
            if metric == f"{name}_bucket" and tuple(kv for kv in found if kv[0] != "le") == labels:
                le = float(dict(found)["le"])
                out[le] = out.get(le, 0.0) + value
    return out


def _quantiles(after: dict[float, float], before: dict[float, float]) -> dict[str, float]:
    buckets = sorted((le, n - before.get(le, 0.0)) for le, n in after.items())
    count = buckets[-1][1] if buckets else 0.0
    if count <= 0:
        return {}
    return {f"p{q}": next(le for le, seen in buckets if seen >= q / 100 * count) * 1000 for q in (50, 99)}
