"""How late do jobs start? Prints figures; asserts nothing (timing goals live here, not in tests).

1. queue only: delayed jobs on a bare queue, bullmq's defaults vs this project's worker
   (`connections.start_worker`: no socket timeout, version probe, drainDelay 1).
2. end to end: node visits scheduled through SchedulingService on SQLite, lateness of the
   PENDING -> RUNNING transition in the audit trail against the node's run_at.

Usage: .venv/bin/python bench/lateness.py [--jobs 200] [--spread 5]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

from bullmq import Job, Queue, Worker

from campaign_scheduler.config import Settings, load_settings
from campaign_scheduler.connections import Queues, queue_options, redis_options, start_worker
from campaign_scheduler.embedded import EmbeddedRedis
from campaign_scheduler.migrate import upgrade
from campaign_scheduler.states import NodeState
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from campaign_scheduler.worker import SchedulerWorker


def summary(name: str, late_ms: list[float]) -> None:
    q = statistics.quantiles(late_ms, n=100)
    print(
        f"{name:<38} n={len(late_ms):4d}  p50={q[49]:7.1f} ms  p95={q[94]:7.1f} ms  "
        f"p99={q[98]:7.1f} ms  max={max(late_ms):7.1f} ms"
    )


async def queue_only(settings: Settings, jobs: int, spread: float, ours: bool) -> list[float]:
    name = f"bench-{'ours' if ours else 'default'}-{time.time_ns()}"
    queue = Queue(name, queue_options(settings))
    started: dict[str, float] = {}

    async def proc(job: Job, token: str) -> None:
        started[str(job.id)] = time.time()

    if ours:
        worker = await start_worker(name, proc, settings, concurrency=20)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = {k: v for k, v in redis_options(settings).items() if k != "socket_timeout"}
            worker = Worker(name, proc, {"connection": plain, "prefix": settings.queue_prefix,
                                         "concurrency": 20})  # fmt: skip
    await asyncio.sleep(0.5)
    rng = random.Random(1)
    due: dict[str, float] = {}
    for i in range(jobs):
        delay = rng.uniform(0.2, spread)
        due[f"j-{i}"] = time.time() + delay
        await queue.add("j", {}, {"jobId": f"j-{i}", "delay": int(delay * 1000)})
    deadline = time.monotonic() + spread + 30
    while len(started) < jobs and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await worker.close()
    await queue.obliterate(force=True)
    await queue.close()
    return [(started[k] - due[k]) * 1000 for k in started]


async def end_to_end(settings: Settings, jobs: int, spread: float) -> list[float]:
    store = StateStore.from_url(settings.resolved_database_url())
    queues = Queues.open(settings)
    worker = SchedulerWorker(settings, store, queues)
    await worker.start()
    await store.create_campaign("bench", "bench", "acct", nodes=[("bench-n", "Log", {})])
    rng = random.Random(2)
    keys = []
    for i in range(jobs):
        await store.upsert_product_user(f"bench-u{i}", "acct")
    # Due times start after the scheduling loop has surely finished, so its own time (it
    # shares this process and event loop with the worker) does not count as lateness.
    base = utcnow() + timedelta(seconds=3 + jobs / 100)
    t0 = time.monotonic()
    for i in range(jobs):
        pu = f"bench-u{i}"
        at = base + timedelta(seconds=rng.uniform(0, spread))
        await worker.scheduling.schedule_campaign_node("bench", "bench-n", "acct", pu, at)
        keys.append(NodeKey("bench", "bench-n", pu))
    took = time.monotonic() - t0
    print(f"scheduled {jobs} node visits in {took:.2f} s ({jobs / took:.0f}/s, DB row + job each)")
    # Keep the event loop for the worker: no polling until the last node is due.
    await asyncio.sleep(max(0.0, (base - utcnow()).total_seconds() + spread + 1))
    late: list[float] = []
    for _ in range(60):
        done = await store.list_states({NodeState.COMPLETED}, campaign_id="bench", limit=jobs)
        if len(done) == jobs:
            break
        await asyncio.sleep(1)
    for k in keys:
        row = await store.get_state(k)
        assert row is not None and row.run_at is not None
        start = next(t.at for t in await store.history(row.id) if t.to_state == "RUNNING")
        late.append((start - row.run_at).total_seconds() * 1000)
    await worker.close()
    await queues.close()
    await store.close()
    return late


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--spread", type=float, default=5.0, help="delays from 0.2 s to this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis.start(Path(tmp) / "redis", persist=False)
        try:
            settings = load_settings(
                redis_url=redis.url,
                database_url=f"sqlite:///{tmp}/bench.db",
                queue_prefix="bench",
            )
            upgrade(settings.resolved_database_url())
            results: dict[str, Any] = {}
            results["queue only, bullmq defaults"] = await queue_only(
                settings, args.jobs, args.spread, False
            )
            results["queue only, campaign-scheduler worker"] = await queue_only(
                settings, args.jobs, args.spread, True
            )
            results["end to end (SQLite), node start"] = await end_to_end(
                settings, args.jobs, args.spread
            )
            print(
                f"lateness of job start after its due time ({args.jobs} jobs over {args.spread} s):"
            )
            for name, late in results.items():
                summary(name, late)
        finally:
            redis.stop()


if __name__ == "__main__":
    asyncio.run(main())
