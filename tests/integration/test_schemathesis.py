"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis):
whatever a client sends, the API answers without a 5xx."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

import pytest

from campaign_scheduler.config import Settings
from campaign_scheduler.migrate import upgrade
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import TOKEN, serve

pytestmark = pytest.mark.slow


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Fuzzed once, on a fresh SQLite database: the API code is the same for PostgreSQL."""
    url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    upgrade(url)
    return url


async def test_no_5xx_for_any_schema_conforming_request(
    settings: Settings, worker: SchedulerWorker
) -> None:
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert exe, "schemathesis is a dev dependency: scripts/test installs it"
    async with serve(settings) as client:
        proc = await asyncio.create_subprocess_exec(
            exe, "run", f"{client.base_url}/openapi.json",
            "--checks", "not_a_server_error",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--max-examples", "25", "--seed", "1", "--request-timeout", "20",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=600)
    text = out.decode()
    assert proc.returncode == 0, text[-4000:]
    passed = re.search(r"generated, (\d+) passed", text)
    assert passed and int(passed.group(1)) > 100, text[-2000:]  # it really sent requests
