"""Bring Redis back in line with the database, which is the source of truth.

Runs as a BullMQ job scheduler entry on the timeout queue (not a cron or a sleep loop). It
finds visits whose job is missing - Redis lost data, an enqueue failed after the state was
written, a worker vanished - and recreates the job; RUNNING visits whose job is gone go back
to PENDING so they run again (their attempt counter keeps growing, and gives up at the limit).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .connections import ATTEMPTS
from .logs import event
from .states import NodeState
from .store import Actor, StateStore
from .timewindows import utcnow

if TYPE_CHECKING:
    from .scheduling import SchedulingService

log = logging.getLogger(__name__)

_GONE = ("unknown", "completed", "failed")
BATCH = 500


@dataclass
class ReconcileReport:
    checked: int = 0
    requeued: int = 0
    recovered: int = 0
    gave_up: int = 0
    timeouts_requeued: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reconciler:
    def __init__(
        self, store: StateStore, scheduling: SchedulingService, grace_ms: int, worker: str
    ) -> None:
        self.store = store
        self.scheduling = scheduling
        self.grace = timedelta(milliseconds=grace_ms)
        self.actor = Actor(worker=worker, job_id="reconciler")

    async def run_once(self) -> ReconcileReport:
        report = ReconcileReport()
        queues = self.scheduling.queues
        # Rows touched within the grace period may still have their enqueue in flight.
        cutoff = utcnow() - self.grace
        after = 0
        while True:
            rows = await self.store.list_states(
                {NodeState.PENDING, NodeState.RUNNING, NodeState.WAITING},
                updated_before=cutoff,
                after_id=after,
                limit=BATCH,
            )
            if not rows:
                break
            after = rows[-1].id
            for row in rows:
                report.checked += 1
                state = NodeState(row.state)
                job_state = (
                    await queues.job_state(queues.execution, row.job_id or "")
                    if state != NodeState.WAITING  # a waiting filter only has a timeout job
                    else "n/a"
                )
                if state == NodeState.PENDING and job_state in _GONE:
                    await self.scheduling.enqueue_execution(row)
                    report.requeued += 1
                elif state == NodeState.RUNNING and job_state in _GONE:
                    give_up = row.attempts >= ATTEMPTS
                    moved = await self.store.transition(
                        row.id,
                        {NodeState.RUNNING},
                        NodeState.FAILED if give_up else NodeState.PENDING,
                        "gave_up_job_lost" if give_up else "recovered_job_lost",
                        self.actor,
                        values={"run_token": None, "completed_at": utcnow() if give_up else None},
                    )
                    if moved is not None and not give_up:
                        await self.scheduling.enqueue_execution(moved)
                        report.recovered += 1
                    elif moved is not None:
                        report.gave_up += 1
                if row.timeout_at is not None and row.timeout_job_id:
                    t_state = await queues.job_state(queues.timeout, row.timeout_job_id)
                    if t_state in _GONE:
                        await self.scheduling.enqueue_timeout(row)
                        report.timeouts_requeued += 1
        if report.requeued or report.recovered or report.gave_up or report.timeouts_requeued:
            event(log, logging.WARNING, "reconciled", **report.as_dict())
        return report
