"""The worker container's entry point (scripts/container-worker.sh) with a stand-in `minichat`:
a setup error (exit 2) ends the container for good (exit 0, so `restart: on-failure` does not
loop); any other failure is passed on, and restarted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "container-worker.sh"


def run(tmp_path: Path, worker_status: int, setup_status: int = 0) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "minichat"
    fake.write_text(
        "#!/bin/sh\n"
        f'case "$1" in worker) echo worker >&2; exit {worker_status};; *) exit {setup_status};; esac\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    return subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_a_setup_error_stops_the_container_for_good(tmp_path: Path) -> None:
    result = run(tmp_path, worker_status=2)
    assert result.returncode == 0 and "setup error (exit 2)" in result.stderr


def test_a_setup_error_before_the_worker_stops_it_too(tmp_path: Path) -> None:
    result = run(tmp_path, worker_status=0, setup_status=2)
    assert result.returncode == 0 and "worker" not in result.stderr.replace("setup error", "")


@pytest.mark.parametrize("status", [0, 1, 70])
def test_other_exits_are_passed_on(tmp_path: Path, status: int) -> None:
    assert run(tmp_path, worker_status=status).returncode == status
