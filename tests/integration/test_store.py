"""Guarded transitions and the audit trail, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from campaign_scheduler.db import NodeStateRow
from campaign_scheduler.errors import BackendUnavailable, StateConflict
from campaign_scheduler.states import NodeState
from campaign_scheduler.store import Actor, NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from tests.conftest import make_visit

ACTOR = Actor(worker="test")
FAR = utcnow() + timedelta(days=1)


async def start(
    store: StateStore, key: NodeKey, job: str, token: str, actor: Actor = ACTOR
) -> NodeStateRow | None:
    result = await store.start_run(key, job, token, actor, not_before=FAR)
    return result.row if result.started else None


async def _pending(store: StateStore) -> tuple[NodeKey, int]:
    (v,) = await make_visit(store)
    key = NodeKey(v.campaign_id, v.node_id, v.product_user_id)
    row = await store.schedule_pending(key, v.user_id, utcnow(), f"{'-'.join(v.key)}", ACTOR)
    return key, row.id


async def test_instants_come_back_aware_utc(store: StateStore) -> None:
    (v,) = await make_visit(store)
    key = NodeKey(v.campaign_id, v.node_id, v.product_user_id)
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC) + timedelta(microseconds=123)
    await store.schedule_pending(key, v.user_id, at, "job-x", ACTOR)
    row = await store.get_state(key)
    assert row is not None and row.run_at == at and row.run_at.tzinfo is not None


async def test_many_concurrent_starts_one_winner(store: StateStore) -> None:
    key, sid = await _pending(store)
    results = await asyncio.gather(*(start(store, key, f"job-{i}", f"token-{i}") for i in range(8)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    history = await store.history(sid)
    assert [(t.from_state, t.to_state) for t in history] == [
        (None, "PENDING"),
        ("PENDING", "RUNNING"),
    ]


async def test_concurrent_terminal_transitions_one_outcome(store: StateStore) -> None:
    # A completion, a timeout and a cancel race for the same running visit.
    key, sid = await _pending(store)
    row = await start(store, key, "job-a", "tok-a")
    assert row is not None
    running = {NodeState.RUNNING}
    outcomes = await asyncio.gather(
        store.transition(sid, running, NodeState.COMPLETED, "completed", ACTOR, token="tok-a"),
        store.transition(sid, running | {NodeState.PENDING}, NodeState.TIMEOUT, "timed_out", ACTOR),
        store.transition(sid, running | {NodeState.PENDING}, NodeState.CANCELLED, "cancel", ACTOR),
    )
    assert sum(o is not None for o in outcomes) == 1
    terminal = [
        t for t in await store.history(sid) if t.to_state in ("COMPLETED", "TIMEOUT", "CANCELLED")
    ]
    assert len(terminal) == 1


async def test_stale_token_cannot_finish(store: StateStore) -> None:
    key, sid = await _pending(store)
    assert await start(store, key, "job-a", "tok-1")
    # The same job handed to another worker after a stall: taken over with a new token.
    taken = await start(store, key, "job-a", "tok-2")
    assert taken is not None and taken.attempts == 2
    # A different job id (a duplicate) cannot take it over.
    assert await start(store, key, "job-b", "tok-3") is None
    stale = await store.transition(
        sid, {NodeState.RUNNING}, NodeState.COMPLETED, "completed", ACTOR, token="tok-1"
    )
    assert stale is None
    done = await store.transition(
        sid, {NodeState.RUNNING}, NodeState.COMPLETED, "completed", ACTOR, token="tok-2"
    )
    assert done is not None and done.state == "COMPLETED"
    reasons = [t.reason for t in await store.history(sid)]
    assert reasons == ["scheduled", "started", "taken_over", "completed"]


async def test_finished_visits_are_history(store: StateStore) -> None:
    key, sid = await _pending(store)
    await start(store, key, "j", "t")
    await store.transition(sid, {NodeState.RUNNING}, NodeState.COMPLETED, "completed", ACTOR)
    with pytest.raises(StateConflict, match="COMPLETED.*history"):
        await store.schedule_pending(key, "acct", utcnow(), "j", ACTOR)


async def test_audit_row_records_error_and_worker(store: StateStore) -> None:
    key, sid = await _pending(store)
    await start(store, key, "j", "t", Actor(worker="w-7", job_id="j"))
    await store.transition(
        sid,
        {NodeState.RUNNING},
        NodeState.FAILED,
        "failed",
        Actor(worker="w-7", job_id="j"),
        error=ValueError("template broken"),
    )
    last = (await store.history(sid))[-1]
    assert (last.from_state, last.to_state, last.attempt, last.worker) == (
        "RUNNING",
        "FAILED",
        1,
        "w-7",
    )
    assert (last.error_type, last.error_message) == ("ValueError", "template broken")
    row = await store.get_state_by_id(sid)
    assert row is not None and row.last_error == "template broken"


async def test_database_down_is_a_clear_error(tmp_path: object) -> None:
    store = StateStore.from_url("postgresql://nobody@127.0.0.1:1/nothing")
    with pytest.raises(BackendUnavailable, match="unavailable.*DATABASE_URL"):
        await store.ping()
    await store.close()
