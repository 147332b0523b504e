"""Where a bench ran: the machine, the versions, and every setting that shapes speed."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Final

import asyncpg

import minichat
from minichat.bench.options import CEILING_BATCH, CEILING_CONNECTIONS
from minichat.settings import Settings
from minichat.storage.db import server_settings

REPO: Final = Path(minichat.__file__).resolve().parents[1]
PG_SETTINGS: Final = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "max_connections",
)
LIBRARIES: Final = ("faust-streaming", "aiokafka", "asyncpg", "pydantic", "pydantic-core")
SPEED_SETTINGS: Final = (
    "partitions",
    "batch_max",
    "lane_buffer_max",
    "input_buffer_max_bytes",
    "batch_max_bytes",
    "order_grace_ms",
    "produce_in_flight",
    "fetch_max_wait_ms",
    "db_pool_min",
    "db_pool_max",
    "relay_interval_s",
    "relay_batch_max",
    "log_level",
)


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    mem = _meminfo_kib("MemTotal")
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(mem / 1024 / 1024, 1) if mem else None,
        "kernel": platform.release(),
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def minichat_commit() -> str:
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    return commit + ("+uncommitted" if _git("status", "--porcelain", "--untracked-files=no") else "")


def kafka_version() -> str:
    """The broker's version as the local stack resolved it (its jar's name), else unknown."""
    libs = [Path(os.environ.get("MINICHAT_STACK_KAFKA_LIBS", REPO / ".stack" / "kafka" / "libs"))]
    for directory in libs:
        for jar in sorted(directory.glob("kafka_2.13-*.jar")):
            return jar.stem.removeprefix("kafka_2.13-") + " (local stack jar)"
    return "unknown (not the local stack)"


def _library(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


async def versions(database_url: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(versions, PostgreSQL settings)."""
    con = await asyncpg.connect(database_url)
    try:
        pg = await server_settings(con, PG_SETTINGS)
    finally:
        await con.close()
    found = {
        "minichat": minichat_commit(),
        "python": platform.python_version(),
        "kafka": kafka_version(),
        "postgresql": pg["server_version"],
        "libraries": {name: _library(name) for name in LIBRARIES},
    }
    return found, pg


def speed_settings(settings: Settings, pg: dict[str, str]) -> dict[str, Any]:
    shaped: dict[str, Any] = {name: getattr(settings, name) for name in SPEED_SETTINGS}
    shaped["ceiling_batch"] = CEILING_BATCH
    shaped["ceiling_connections"] = CEILING_CONNECTIONS
    shaped.update({f"pg_{k}": v for k, v in pg.items() if k != "server_version"})
    return shaped
