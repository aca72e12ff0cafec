"""Each trap of BULLMQ-PYTHON-NOTES.md, shown fixed by campaign_scheduler.connections.

Every test here goes through the project's own builders (`start_worker`, `Queues`); remove
the matching fix there and the test fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from bullmq import Job, Queue, Worker

from campaign_scheduler.config import Settings, load_settings
from campaign_scheduler.connections import Enqueued, Queues, queue_options, start_worker
from campaign_scheduler.embedded import EmbeddedRedis
from campaign_scheduler.errors import InvalidInput
from campaign_scheduler.worker import _duration_ms
from tests.conftest import new_id

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(redis_server: EmbeddedRedis, tmp_path: Path) -> Settings:
    """Queue-only tests: no database, so they run once rather than once per backend."""
    return load_settings(redis_url=redis_server.url, queue_prefix=new_id("t"), data_dir=tmp_path)


@pytest.fixture
async def trap_queue(settings: Settings) -> AsyncIterator[Queue]:
    q = Queue(new_id("trap"), queue_options(settings))
    yield q
    await q.obliterate(force=True)
    await q.close()


class Recorder:
    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.sleep = 0.0

    async def __call__(self, job: Job, token: str) -> str:
        self.started[str(job.id)] = time.time()
        if self.sleep:
            await asyncio.sleep(self.sleep)
        return "ok"


async def _worker(queue: Queue, settings: Settings, rec: Recorder, **kw: Any) -> Worker:
    return await start_worker(queue.name, rec, settings, concurrency=kw.pop("concurrency", 5), **kw)


async def _wait(rec: Recorder, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(rec.started) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(rec.started) >= n, f"only {len(rec.started)} of {n} jobs started in {timeout} s"


async def test_idle_worker_starts_a_job_delayed_15s_on_time(
    trap_queue: Queue, settings: Settings
) -> None:
    """Traps 1 and 2: redis-py 8's 5 s socket timeout (job ~456 s late) and whole-second
    blocking (up to 1 s late)."""
    rec = Recorder()
    worker = await _worker(trap_queue, settings, rec)
    try:
        await asyncio.sleep(6)  # idle longer than redis-py 8's default socket timeout
        due = time.time() + 15
        await trap_queue.add("j", {}, {"jobId": "late-check", "delay": 15000})
        await _wait(rec, 1, timeout=40)
        lateness = rec.started["late-check"] - due
        assert -0.05 <= lateness < 0.35, f"started {lateness:.3f} s after its due time"
    finally:
        await worker.close()


async def test_delayed_jobs_start_within_a_fraction_of_a_second(
    trap_queue: Queue, settings: Settings
) -> None:
    """Trap 2: without the version probe every wait is rounded up to whole seconds."""
    rec = Recorder()
    worker = await _worker(trap_queue, settings, rec)
    try:
        await asyncio.sleep(0.5)
        due = {}
        for i, delay in enumerate([0.3, 0.7, 1.1, 1.45, 1.9, 2.35, 2.8]):
            due[f"d-{i}"] = time.time() + delay
            await trap_queue.add("j", {}, {"jobId": f"d-{i}", "delay": int(delay * 1000)})
        await _wait(rec, len(due), timeout=20)
        late = {k: rec.started[k] - due[k] for k in due}
        assert max(late.values()) < 0.3, late
    finally:
        await worker.close()


async def test_rate_limit_is_reached_not_a_quarter_of_it(
    trap_queue: Queue, settings: Settings
) -> None:
    """Trap 3: after the limiter trips the worker idled drainDelay (5 s) - 24/s at 100/s."""
    rec = Recorder()
    await trap_queue.addBulk(
        [{"name": "j", "data": {}, "opts": {"jobId": f"r-{i}"}} for i in range(80)]
    )
    started = time.monotonic()
    worker = await _worker(trap_queue, settings, rec, limiter={"max": 20, "duration": 1000})
    try:
        await _wait(rec, 80, timeout=60)
        elapsed = time.monotonic() - started
        # 80 jobs at 20/s: a little over 3 s (first window free); with the trap, ~16 s.
        assert 2.5 <= elapsed < 8, f"80 jobs took {elapsed:.1f} s at a 20/s limit"
    finally:
        await worker.close()


async def test_number_like_and_colon_ids_never_reach_redis(
    queues: Queues, trap_queue: Queue
) -> None:
    """Trap 4: a custom id "2" is overwritten by BullMQ's own job 2."""
    for bad in ("2", "42", "a:b"):
        with pytest.raises(InvalidInput):
            await queues.add_unique(trap_queue, "j", {}, bad, 0)
    assert await trap_queue.getJobCounts() == {
        k: 0 for k in (await trap_queue.getJobCounts()).keys()
    }


async def test_duplicate_add_is_detected_and_finished_jobs_do_not_swallow_adds(
    queues: Queues, trap_queue: Queue, settings: Settings
) -> None:
    """Trap 5: a duplicate add is ignored by Redis but returns a Job with the new data."""
    future = int(time.time() * 1000) + 60_000
    assert await queues.add_unique(trap_queue, "j", {"v": 1}, "dup", future) == Enqueued.ADDED
    # The raw API would claim success with data Redis never stored:
    ghost = await trap_queue.add("j", {"v": 2}, {"jobId": "dup", "delay": 60_000})
    assert ghost.data == {"v": 2}
    stored = await trap_queue.getJob("dup")
    assert stored is not None and stored.data == {"v": 1}
    # Ours says what happened.
    assert (
        await queues.add_unique(trap_queue, "j", {"v": 1}, "dup", future, lambda d: d == {"v": 1})
        == Enqueued.UNCHANGED
    )
    assert (
        await queues.add_unique(trap_queue, "j", {"v": 3}, "dup", 0, lambda d: d == {"v": 3})
        == Enqueued.REPLACED
    )
    stored = await trap_queue.getJob("dup")
    assert stored is not None and stored.data == {"v": 3}
    # A finished job kept under the same id would swallow a re-add: it is replaced and runs.
    rec = Recorder()
    worker = await _worker(trap_queue, settings, rec)
    try:
        await _wait(rec, 1, timeout=10)
        for _ in range(100):
            if await trap_queue.getJobState("dup") == "completed":
                break
            await asyncio.sleep(0.05)
        rec.started.clear()
        assert await queues.add_unique(trap_queue, "j", {"v": 4}, "dup", 0) == Enqueued.REPLACED
        await _wait(rec, 1, timeout=10)
    finally:
        await worker.close()


async def test_completed_event_duration_despite_zero_finished_on(
    trap_queue: Queue, settings: Settings
) -> None:
    """Trap 6: finishedOn is 0 on the worker's completed event; we measure to now instead."""
    rec = Recorder()
    rec.sleep = 0.2
    seen: list[tuple[int, int | None]] = []
    worker = await _worker(trap_queue, settings, rec)
    worker.on("completed", lambda job, _r: seen.append((job.finishedOn, _duration_ms(job))))
    try:
        await trap_queue.add("j", {}, {"jobId": "dur"})
        for _ in range(200):
            if seen:
                break
            await asyncio.sleep(0.02)
        (finished_on, duration) = seen[0]
        assert finished_on == 0  # still the library's behaviour
        assert duration is not None and 190 <= duration < 2000
    finally:
        await worker.close()
