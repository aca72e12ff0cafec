"""Redis loses everything mid-run; the database still drives every node to one outcome."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from campaign_scheduler.config import Settings
from campaign_scheduler.connections import Queues
from campaign_scheduler.db import NodeTransition
from campaign_scheduler.embedded import EmbeddedRedis
from campaign_scheduler.processors import HandlerRegistry
from campaign_scheduler.states import TERMINAL
from campaign_scheduler.store import Actor, NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import make_visit, new_id, wait_for

pytestmark = pytest.mark.slow


async def test_flushall_mid_run_every_node_reaches_one_terminal_state(
    settings: Settings, store: StateStore, registry: HandlerRegistry, tmp_path: Path
) -> None:
    redis = EmbeddedRedis.start(tmp_path / "redis", persist=False)
    s = settings.model_copy(update={"redis_url": redis.url, "reconcile_every_ms": 1000})
    queues = Queues.open(s)
    worker = SchedulerWorker(s, store, queues, registry, name=new_id("w"))
    worker.heartbeat_every = 0.5
    await worker.start()
    try:
        visits = await make_visit(store, config={"sleep": 0.2}, users=40)
        rng = random.Random(7)
        for v in visits:
            at = utcnow() + timedelta(seconds=rng.uniform(0, 4))
            await worker.scheduling.schedule_campaign_node(
                *v.key[:2], v.user_id, v.product_user_id, at
            )
        await asyncio.sleep(1.5)
        await queues.client.flushall()  # timers, job data and the reconciler's entry: gone

        async def all_done() -> bool:
            rows = [await store.get_state(NodeKey(*v.key)) for v in visits]
            return all(r is not None and r.state in TERMINAL for r in rows)

        await wait_for(all_done, timeout=60, every=0.2)
        async with store.session() as sess:
            rows = (
                await sess.execute(
                    select(NodeTransition).where(
                        NodeTransition.campaign_id == visits[0].campaign_id
                    )
                )
            ).scalars()
            terminal = Counter(
                t.product_user_id for t in rows if t.to_state in {x.value for x in TERMINAL}
            )
        assert all(terminal[v.product_user_id] == 1 for v in visits), terminal
        states = {(await store.get_state(NodeKey(*v.key))).state for v in visits}  # type: ignore[union-attr]
        assert states == {"COMPLETED"}
        # The heartbeat put the reconciler's scheduler entry back.
        assert await queues.timeout.isJobScheduler("campaign-reconciler")
    finally:
        await worker.close()
        await queues.close()
        redis.stop()


async def test_running_node_whose_job_vanished_is_recovered(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store)
    row = await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(hours=1)
    )
    # Simulate a worker that marked the node RUNNING and then vanished with its job.

    started = await worker.store.start_run(
        NodeKey(*v.key),
        row.job_id or "",
        "dead-token",
        Actor("ghost"),
        not_before=utcnow() + timedelta(hours=2),
    )
    assert started.started
    await worker.queues.execution.remove(row.job_id)
    report = await worker.reconciler.run_once()
    assert report.recovered == 1
    recovered = await store.get_state(NodeKey(*v.key))
    assert recovered is not None and recovered.state == "PENDING"
    trail = [t.reason for t in await store.history(row.id)]
    assert trail[-1] == "recovered_job_lost"
