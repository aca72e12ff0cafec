"""The scheduling service and the processors, end to end on real Redis and both databases."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time, timedelta

import pytest
from sqlalchemy import func, select

from campaign_scheduler.db import NodeStateRow, NodeTransition
from campaign_scheduler.errors import BackendUnavailable, InvalidInput, NotFound
from campaign_scheduler.jobs import execution_job_id
from campaign_scheduler.states import CampaignState
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import Calls, Visit, has_state, make_visit, wait_for


async def _state(store: StateStore, v: Visit) -> NodeStateRow:
    row = await store.get_state(NodeKey(*v.key))
    assert row is not None
    return row


async def _reasons(store: StateStore, v: Visit) -> list[tuple[str | None, str, str]]:
    row = await _state(store, v)
    return [(t.from_state, t.to_state, t.reason) for t in await store.history(row.id)]


async def test_node_runs_at_its_due_time(worker: SchedulerWorker, store: StateStore) -> None:
    (v,) = await make_visit(store)
    due = utcnow() + timedelta(seconds=2)
    await worker.scheduling.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, due)
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=15)
    row = await _state(store, v)
    started = next(t for t in await store.history(row.id) if t.to_state == "RUNNING").at
    assert timedelta(0) <= started - due < timedelta(milliseconds=500)
    assert row.attempts == 1 and row.completed_at is not None
    assert await _reasons(store, v) == [
        (None, "PENDING", "scheduled"),
        ("PENDING", "RUNNING", "started"),
        ("RUNNING", "COMPLETED", "completed"),
    ]


async def test_run_time_in_the_past_runs_now(worker: SchedulerWorker, store: StateStore) -> None:
    (v,) = await make_visit(store)
    past = utcnow() - timedelta(hours=3)
    await worker.scheduling.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, past)
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=10)


async def test_bad_input_is_refused_and_nothing_is_written(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store)
    s = worker.scheduling
    with pytest.raises(InvalidInput, match="no time zone"):
        await s.schedule_campaign_node(
            *v.key[:2], v.user_id, v.product_user_id, datetime(2030, 1, 1)
        )
    with pytest.raises(NotFound, match="unknown campaign 'nope'"):
        await s.schedule_campaign_node("nope", v.node_id, v.user_id, v.product_user_id, utcnow())
    with pytest.raises(NotFound, match="no node"):
        await s.schedule_campaign_node(
            v.campaign_id, "nope", v.user_id, v.product_user_id, utcnow()
        )
    with pytest.raises(NotFound, match="unknown product user"):
        await s.schedule_campaign_node(v.campaign_id, v.node_id, v.user_id, "nope", utcnow())
    with pytest.raises(InvalidInput, match="does not own"):
        await s.schedule_campaign_node(*v.key[:2], "someone-else", v.product_user_id, utcnow())
    with pytest.raises(InvalidInput, match="not a usable id"):
        await s.schedule_campaign_node("a:b", v.node_id, v.user_id, v.product_user_id, utcnow())
    assert await store.get_state(NodeKey(*v.key)) is None


async def test_reschedule_replaces_the_delayed_job(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store)
    s = worker.scheduling
    await s.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(hours=1)
    )
    soon = utcnow() + timedelta(seconds=1)
    await s.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, soon)
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=10)
    reasons = [r for _, _, r in await _reasons(store, v)]
    assert reasons == ["scheduled", "scheduled", "started", "completed"]


async def test_cancel_removes_the_job(worker: SchedulerWorker, store: StateStore) -> None:
    (v,) = await make_visit(store)
    s = worker.scheduling
    await s.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(seconds=1)
    )
    await s.schedule_timeout(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(seconds=2)
    )
    assert await s.cancel_node(*v.key) is True
    assert await s.cancel_node(*v.key) is False  # already finished
    q = worker.queues
    assert await q.job_state(q.execution, execution_job_id(*v.key)) == "unknown"
    await asyncio.sleep(2.5)
    row = await _state(store, v)
    assert row.state == "CANCELLED" and not row.did_timeout


async def test_retry_with_backoff_then_success(
    worker: SchedulerWorker, store: StateStore, calls: Calls
) -> None:
    (v,) = await make_visit(store, config={"fail_times": 2})
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=20)
    row = await _state(store, v)
    assert row.attempts == 3 and calls.count(v.key) == 1
    assert row.last_error_type == "RuntimeError"
    trail = await store.history(row.id)
    assert [t.reason for t in trail] == [
        "scheduled", "started", "retry_scheduled", "started", "retry_scheduled", "started", "completed"
    ]  # fmt: skip
    # Exponential backoff from 1 s: the second attempt about 1 s after the first failure,
    # the third about 2 s after the second.
    retries = [t.at for t in trail if t.reason == "retry_scheduled"]
    starts = [t.at for t in trail if t.reason == "started"]
    assert timedelta(seconds=0.9) <= starts[1] - retries[0] < timedelta(seconds=2)
    assert timedelta(seconds=1.9) <= starts[2] - retries[1] < timedelta(seconds=3.5)


async def test_last_attempt_failure_is_failed(worker: SchedulerWorker, store: StateStore) -> None:
    (v,) = await make_visit(store, config={"fail_times": 99})
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    await wait_for(lambda: has_state(store, v.key, "FAILED"), timeout=20)
    row = await _state(store, v)
    assert row.attempts == 3 and "attempt 3" in (row.last_error or "")
    q = worker.queues
    await wait_for(
        lambda: _eq(q.job_state(q.execution, execution_job_id(*v.key)), "failed"), timeout=5
    )


async def _eq(aw: object, value: str) -> bool:
    return await aw == value  # type: ignore[misc]


async def test_non_retryable_error_fails_at_once(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store, config={"nonretryable": True})
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    await wait_for(lambda: has_state(store, v.key, "FAILED"), timeout=10)
    row = await _state(store, v)
    assert row.attempts == 1 and row.last_error_type == "NonRetryableError"


async def test_unknown_node_kind_fails_with_the_fix(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store, kind="Teleport")
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    await wait_for(lambda: has_state(store, v.key, "FAILED"), timeout=10)
    row = await _state(store, v)
    assert "no handler for node kind 'Teleport'" in (row.last_error or "")


async def test_duplicate_jobs_run_the_node_once(
    worker: SchedulerWorker, store: StateStore, calls: Calls
) -> None:
    (v,) = await make_visit(store, config={"sleep": 0.3})
    s = worker.scheduling
    row = await s.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, utcnow())
    # Duplicates under other ids (a Node.js producer, a replayed add) with the same payload.
    job = await worker.queues.execution.getJob(row.job_id)
    for i in range(4):
        await worker.queues.execution.add("execute", job.data, {"jobId": f"dup{i}-{row.job_id}"})
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=10)
    await asyncio.sleep(1.0)
    assert calls.count(v.key) == 1 and calls.started[v.key] == 1
    completed = [t for t in await store.history(row.id) if t.to_state == "COMPLETED"]
    assert len(completed) == 1


async def test_timeout_racing_an_execution_one_terminal_state(
    worker: SchedulerWorker, store: StateStore, calls: Calls
) -> None:
    (v,) = await make_visit(store, config={"sleep": 1.5})
    s = worker.scheduling
    await s.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, utcnow())
    await s.schedule_timeout(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(seconds=0.5)
    )
    await wait_for(lambda: has_state(store, v.key, "TIMEOUT"), timeout=10)
    await asyncio.sleep(2.0)  # let the handler finish and try to complete
    row = await _state(store, v)
    assert row.state == "TIMEOUT" and row.did_timeout and calls.count(v.key) == 1
    terminal = [t for t in await store.history(row.id) if t.to_state in ("COMPLETED", "TIMEOUT")]
    assert [t.to_state for t in terminal] == ["TIMEOUT"]


async def test_timeout_after_completion_is_left_alone(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (v,) = await make_visit(store)
    s = worker.scheduling
    soon = utcnow() + timedelta(seconds=0.5)
    await s.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, soon)
    await s.schedule_timeout(*v.key[:2], v.user_id, v.product_user_id, soon + timedelta(seconds=1))
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=10)
    q = worker.queues
    await wait_for(
        lambda: _eq(q.job_state(q.timeout, f"timeout-{execution_job_id(*v.key)}"), "completed")
    )
    row = await _state(store, v)
    assert row.state == "COMPLETED" and not row.did_timeout


async def test_timeout_of_a_waiting_node(
    worker: SchedulerWorker, store: StateStore, calls: Calls
) -> None:
    (v,) = await make_visit(store)
    s = worker.scheduling
    await s.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(hours=2)
    )
    await s.schedule_timeout(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(seconds=1)
    )
    await wait_for(lambda: has_state(store, v.key, "TIMEOUT"), timeout=10)
    q = worker.queues
    assert await q.job_state(q.execution, execution_job_id(*v.key)) == "unknown"  # removed
    row = await _state(store, v)
    assert row.did_timeout and row.completed_at is not None and calls.count(v.key) == 0


async def test_stopped_campaign_does_not_execute(
    worker: SchedulerWorker, store: StateStore, calls: Calls
) -> None:
    (v,) = await make_visit(store)
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow() + timedelta(seconds=1)
    )
    await store.set_campaign_state(v.campaign_id, CampaignState.STOPPED)
    await wait_for(lambda: has_state(store, v.key, "CANCELLED"), timeout=10)
    assert calls.count(v.key) == 0


async def test_business_hours_use_user_then_campaign_zone(
    worker: SchedulerWorker, store: StateStore
) -> None:
    (tokyo,) = await make_visit(store, user_tz="Asia/Tokyo", campaign_tz="America/New_York")
    (ny,) = await make_visit(store, campaign_tz="America/New_York")
    (utc,) = await make_visit(store)
    monday_7utc = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)
    s = worker.scheduling
    assert (
        await s.business_hours_time(tokyo.campaign_id, tokyo.product_user_id, monday_7utc)
        == monday_7utc
    )
    assert await s.business_hours_time(ny.campaign_id, ny.product_user_id, monday_7utc) == datetime(
        2026, 11, 30, 14, 0, tzinfo=UTC
    )
    assert await s.business_hours_time(
        utc.campaign_id, utc.product_user_id, monday_7utc
    ) == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    assert await s.specific_time(
        tokyo.campaign_id, tokyo.product_user_id, time(11, 30), monday_7utc
    ) == (datetime(2026, 12, 1, 2, 30, tzinfo=UTC))


async def test_redis_down_keeps_the_state_and_says_so(
    store: StateStore, settings: object, worker: SchedulerWorker
) -> None:
    from campaign_scheduler.connections import Queues
    from campaign_scheduler.scheduling import SchedulingService

    dead = Queues.open(worker.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    try:
        (v,) = await make_visit(store)
        svc = SchedulingService(store, dead, worker.settings)
        with pytest.raises(
            BackendUnavailable, match="Redis at redis://127.0.0.1:1/0 is unavailable.*reconciler"
        ):
            await svc.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, utcnow())
        row = await _state(store, v)
        assert row.state == "PENDING"  # written first: the reconciler will enqueue it
        report = await worker.reconciler.run_once()
        assert report.requeued >= 1
        await wait_for(lambda: has_state(store, v.key, "COMPLETED"), timeout=10)
    finally:
        await dead.close()


async def test_one_transition_row_per_state_change(
    worker: SchedulerWorker, store: StateStore
) -> None:
    visits = await make_visit(store, users=20)
    for v in visits:
        await worker.scheduling.schedule_campaign_node(
            *v.key[:2], v.user_id, v.product_user_id, utcnow()
        )
    for v in visits:
        await wait_for(lambda v=v: has_state(store, v.key, "COMPLETED"), timeout=20)
    async with store.session() as s:
        n = await s.scalar(
            select(func.count())
            .select_from(NodeTransition)
            .where(NodeTransition.campaign_id == visits[0].campaign_id)
        )
    assert n == 3 * len(visits)
