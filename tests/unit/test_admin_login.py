"""The admin login (`MINICHAT_ADMIN_DATABASE_URL`) and the worker's own (`MINICHAT_DATABASE_URL`):
which one each path takes (docs/security.md §6)."""

from __future__ import annotations

import pytest

from minichat.bench.scratch import runtime_url_for
from minichat.settings import Settings

WORKER = "postgresql://minichat_worker:w@db.example:5432/minichat"
ADMIN = "postgresql://minichat_admin:a@db.example:5432/minichat"


def test_the_admin_url_defaults_to_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINICHAT_ADMIN_DATABASE_URL", raising=False)
    assert Settings(database_url=WORKER).admin_url == WORKER
    assert Settings(database_url=WORKER, admin_database_url=ADMIN).admin_url == ADMIN


def test_the_admin_url_comes_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINICHAT_ADMIN_DATABASE_URL", ADMIN)
    monkeypatch.setenv("MINICHAT_DATABASE_URL", WORKER)
    settings = Settings()
    assert (settings.database_url, settings.admin_url) == (WORKER, ADMIN)


def test_a_bench_scratch_database_is_used_with_the_workers_own_login() -> None:
    base = Settings(database_url=WORKER, admin_database_url=ADMIN)
    scratch = "postgresql://minichat_admin:a@db.example:5432/minichat_bench_x"
    assert runtime_url_for(base, scratch) == "postgresql://minichat_worker:w@db.example:5432/minichat_bench_x"
