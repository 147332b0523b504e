"""The guides' runnable blocks, run as written against a live deployment.

A shell block marked `<!-- runnable: ... -->` in the README or `docs/*.md` is run with bash
(`-euo pipefail`), in document order, with the deployment's settings in the environment and
`minichat` and `python` from this test run's virtualenv: the gateway guide's example
conversation first (real traffic), then the operations guide's first start, its replay over the
live database (the digest must not change) and its rebuild into an empty database (the digests
must match). Variables the blocks use: `REBUILD_DATABASE_URL` and `REBUILD_ADMIN_DATABASE_URL`
(an empty scratch database, as the runtime and the admin login),
`TENANT`, `MINICHAT_READ_TOKENS_FILE`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import Deployment, Live
from tests.support import ROOT, as_runtime, worker_env
from tests.unit.markdown import DOCS, Block, Document

pytestmark = pytest.mark.integration

ORDER = [DOCS / "gateway-guide.md", ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def runnable_blocks() -> list[tuple[str, Block]]:
    """Every marked shell block, the gateway guide's first (they make the traffic)."""
    seen: set[Path] = set()
    found = []
    for path in ORDER:
        if path in seen:
            continue
        seen.add(path)
        for block in Document.read(path).blocks:
            if block.marker and block.marker.startswith("runnable"):
                assert block.language in ("bash", "sh"), f"{path.name}:{block.line}: only shell runs"
                found.append((f"{path.relative_to(ROOT)}:{block.line}", block))
    return found


def test_the_guides_mark_the_blocks_this_test_runs() -> None:
    where = [w.split(":")[0] for w, _ in runnable_blocks()]
    assert where.count("docs/gateway-guide.md") >= 1 and where.count("docs/operations.md") >= 3


async def test_the_runnable_blocks_run_as_written(
    live: Live, empty_database_url: str, tmp_path: Path
) -> None:
    env = worker_env(Deployment(live.settings).env())
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "REBUILD_DATABASE_URL": as_runtime(empty_database_url),
        "REBUILD_ADMIN_DATABASE_URL": empty_database_url,
        "TENANT": str(uuid.uuid4()),
        "MINICHAT_READ_TOKENS_FILE": str(tmp_path / "read-tokens.json"),
    }
    for where, block in runnable_blocks():
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-euo", "pipefail", "-c", block.text],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"{where} exited {result.returncode}:\n{block.text}\n--- stdout\n{result.stdout[-3000:]}"
            f"\n--- stderr\n{result.stderr[-3000:]}"
        )
