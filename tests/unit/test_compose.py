"""docker-compose.yml and the Dockerfile as data (no Docker daemon needed): the set-up is a
one-shot that fails visibly, the worker starts only after it, its health check follows its own
MINICHAT_WEB_PORT, the file says it needs Compose v2, and the image installs the locked versions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PAIRS = [("setup", "worker"), ("setup-cluster", "worker-cluster")]


def test_the_file_says_it_needs_compose_v2() -> None:
    assert "name" in COMPOSE  # what `docker-compose` 1.x refuses
    assert "Compose v2" in (ROOT / "docker-compose.yml").read_text()
    for doc in ("README.md", "docs/operations.md"):
        assert "Compose v2" in (ROOT / doc).read_text(), doc


@pytest.mark.parametrize(("setup", "worker"), PAIRS)
def test_a_setup_error_exits_non_zero_and_the_worker_waits_for_success(setup: str, worker: str) -> None:
    one_shot = SERVICES[setup]
    # `a && b`: the first failing command's status is the container's; nothing maps it to 0
    assert one_shot["command"] == ["sh", "-c", "minichat db migrate && minichat topics create"]
    assert one_shot["restart"] == "no"
    assert SERVICES[worker]["depends_on"] == {setup: {"condition": "service_completed_successfully"}}
    assert SERVICES[worker]["command"] == ["minichat", "worker"]
    assert SERVICES[worker]["environment"] == one_shot["environment"]


@pytest.mark.parametrize("worker", ["worker", "worker-cluster"])
def test_the_health_check_uses_the_workers_web_port(worker: str) -> None:
    service = SERVICES[worker]
    check = " ".join(service["healthcheck"]["test"])
    assert "6066" not in check and "os.environ['MINICHAT_WEB_PORT']" in check
    assert service["environment"]["MINICHAT_WEB_PORT"] == "${MINICHAT_WEB_PORT:-6066}"


def test_the_image_installs_the_locked_versions() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.search(r"^COPY (.*) \./$", dockerfile, re.M)
    assert copied is not None and "constraints.txt" in copied.group(1).split()
    assert re.search(r"^RUN pip install -c constraints\.txt \.", dockerfile, re.M)
    assert '-c constraints.txt -e ".[dev]"' in (ROOT / "Makefile").read_text()


def test_the_lock_pins_every_dependency_exactly() -> None:
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r"[a-z0-9-]+==[\w.+-]+", line) for line in pins), pins
    names = {line.split("==")[0] for line in pins}
    assert {"aiokafka", "asyncpg", "faust-streaming", "pydantic", "pytest", "ruff", "mypy"} <= names
