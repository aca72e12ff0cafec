"""Job processors: what a worker does with an execution job and a timeout job.

The database decides: a job only acts if its guarded transition wins. A duplicate job, a
retry after a crash, or a timeout racing an execution therefore ends in exactly one terminal
state, whatever order things happen in.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from bullmq import Job
from bullmq.custom_errors import DelayedError, UnrecoverableError

from .config import Settings, load_settings
from .db import Campaign, CampaignNode, NodeStateRow, ProductUser
from .engine import CampaignEngine
from .errors import ConfigError, InvalidInput, NonRetryableError
from .jobs import (
    RECONCILE_JOB,
    CampaignExecutionJob,
    CampaignTimeoutJob,
    execution_job_id,
    parse_job,
)
from .logs import event
from .nodes import Outcome
from .reconciler import Reconciler
from .scheduling import SchedulingService
from .states import CampaignState, NodeState
from .store import Actor, NodeKey, StartResult, StateStore
from .timewindows import utcnow

log = logging.getLogger(__name__)

EARLY_TOLERANCE = timedelta(seconds=1)


@dataclass
class NodeContext:
    """Everything a node handler may need for one attempt."""

    key: NodeKey
    campaign: Campaign
    node: CampaignNode
    product_user: ProductUser
    state: NodeStateRow
    attempt: int
    job_id: str
    token: str
    store: StateStore
    scheduling: SchedulingService


NodeHandler = Callable[[NodeContext], Awaitable[Any]]


@dataclass
class HandlerRegistry:
    """Node handlers by node kind ("Wait", "Email", ...)."""

    handlers: dict[str, NodeHandler] = field(default_factory=dict)

    def register(self, kind: str, handler: NodeHandler) -> None:
        self.handlers[kind] = handler

    def get(self, kind: str) -> NodeHandler | None:
        return self.handlers.get(kind)


async def log_handler(ctx: NodeContext) -> dict[str, Any]:
    """Built-in `Log` kind: writes the node's message. Used by the demo and smoke tests."""
    message = str(ctx.node.config.get("message", f"node {ctx.node.id} ran"))
    event(
        log,
        logging.INFO,
        "log_node",
        campaignId=ctx.key.campaign_id,
        nodeId=ctx.key.node_id,
        productUserId=ctx.key.product_user_id,
        message=message,
    )
    return {"message": message}


def default_registry(
    settings: Settings | None = None, handler_modules: str = ""
) -> HandlerRegistry:
    """The built-in kinds plus those registered by SCHEDULER_HANDLER_MODULES."""
    from .nodes import register_builtins

    registry = HandlerRegistry()
    registry.register("Log", log_handler)
    register_builtins(registry, settings or load_settings())
    for name in filter(None, (m.strip() for m in handler_modules.split(","))):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"SCHEDULER_HANDLER_MODULES names {name!r}, which cannot be imported ({exc}): "
                "check the module name and PYTHONPATH"
            ) from None
        register = getattr(module, "register", None)
        if not callable(register):
            raise ConfigError(
                f"module {name!r} has no register(registry) function: add one that calls "
                "registry.register(kind, handler)"
            )
        register(registry)
    return registry


class Processors:
    def __init__(
        self,
        store: StateStore,
        scheduling: SchedulingService,
        registry: HandlerRegistry,
        reconciler: Reconciler,
        worker_name: str,
        engine: CampaignEngine,
    ) -> None:
        self.store = store
        self.engine = engine
        self.scheduling = scheduling
        self.registry = registry
        self.reconciler = reconciler
        self.worker_name = worker_name

    # ---- execution ------------------------------------------------------------------------

    async def execute(self, job: Job, token: str) -> dict[str, Any]:
        try:
            payload = parse_job(CampaignExecutionJob, job.data)
        except InvalidInput as exc:
            # Kept in the failed set with this reason, and logged: never silently dropped.
            raise UnrecoverableError(str(exc)) from None
        key = NodeKey(payload.campaign_id, payload.node_id, payload.product_user_id)
        actor = Actor(self.worker_name, str(job.id))
        start = await self.store.start_run(
            key, str(job.id), token, actor, not_before=utcnow() + EARLY_TOLERANCE
        )
        if start.outcome == "missing":
            raise UnrecoverableError(
                f"{key} has no node state: schedule nodes through SchedulingService "
                "(which writes the state before the job)"
            )
        if start.outcome == "early" and start.row is not None and start.row.run_at is not None:
            # The visit was rescheduled later after this job was queued: wait for it.
            await job.moveToDelayed(int(start.row.run_at.timestamp() * 1000), token)
            raise DelayedError()
        if not start.started:
            state = start.row.state if start.row else None
            event(log, logging.INFO, "execution_skipped", jobId=job.id, state=state)
            return {"skipped": True, "state": state}
        return await self._run(job, token, key, start, actor)

    async def _run(
        self, job: Job, token: str, key: NodeKey, start: StartResult, actor: Actor
    ) -> dict[str, Any]:
        row, campaign, node, user = start.row, start.campaign, start.node, start.product_user
        assert row is not None
        if campaign is None or node is None or user is None:
            err = NonRetryableError(f"{key}: its campaign, node or product user was deleted")
            await self._fail(row, token, actor, err, final=True)
            raise UnrecoverableError(str(err))
        if campaign.state != CampaignState.RUNNING:
            await self.store.transition(
                row.id,
                {NodeState.RUNNING},
                NodeState.CANCELLED,
                f"campaign_{campaign.state.lower()}",
                actor,
                token=token,
                values={"completed_at": utcnow()},
            )
            return {"state": NodeState.CANCELLED.value, "reason": f"campaign is {campaign.state}"}
        handler = self.registry.get(node.kind)
        max_attempts = int(job.opts.get("attempts", 1))
        final = job.attemptsMade + 1 >= max_attempts
        if handler is None:
            err = NonRetryableError(
                f"no handler for node kind {node.kind!r}: register one in the HandlerRegistry"
            )
            await self._fail(row, token, actor, err, final=True)
            raise UnrecoverableError(str(err))
        ctx = NodeContext(
            key, campaign, node, user, row, row.attempts, str(job.id), token, self.store,
            self.scheduling,
        )  # fmt: skip
        started = time.monotonic()
        try:
            result = await handler(ctx)
        except NonRetryableError as exc:
            await self._fail(row, token, actor, exc, final=True)
            raise UnrecoverableError(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            await self._fail(row, token, actor, exc, final=final)
            raise
        outcome = (
            result
            if isinstance(result, Outcome)
            else Outcome(result=result if isinstance(result, dict) else None)
        )
        if outcome.action == "wait":
            assert outcome.timeout_at is not None
            waiting = await self.engine.wait_for_match(row, token, outcome.timeout_at, actor)
            if waiting is None:
                return await self._lost(row)
            return {"state": waiting.state, "timeoutAt": outcome.timeout_at.isoformat()}
        to = NodeState.TIMEOUT if outcome.action == "timeout" else NodeState.COMPLETED
        reason = "no_match" if outcome.action == "timeout" else "completed"
        try:
            done = await self.engine.move_on(
                row, to, reason, actor, token=token, expected={NodeState.RUNNING},
                campaign=campaign, user=user,
            )  # fmt: skip
        except Exception as exc:
            # Moving on failed (the database went away, a bad successor): say why on the
            # visit. A retry re-runs the handler, whose delivery record prevents a resend.
            with contextlib.suppress(Exception):
                await self._fail(row, token, actor, exc, final=final)
            raise
        if done is None:
            return await self._lost(row)
        return {
            "state": done.state,
            "handlerMs": round((time.monotonic() - started) * 1000, 1),
            "result": outcome.result,
        }

    async def _lost(self, row: NodeStateRow) -> dict[str, Any]:
        # A timeout or cancel won the race while the handler ran; its state stands.
        current = await self.store.get_state_by_id(row.id)
        return {"state": current.state if current else "unknown", "lostRace": True}

    async def _fail(
        self, row: NodeStateRow, token: str, actor: Actor, exc: BaseException, *, final: bool
    ) -> None:
        await self.store.transition(
            row.id,
            {NodeState.RUNNING},
            NodeState.FAILED if final else NodeState.PENDING,
            "failed" if final else "retry_scheduled",
            actor,
            token=token,
            values={"completed_at": utcnow()} if final else {},
            error=exc,
        )

    # ---- timeout queue --------------------------------------------------------------------

    async def timeout(self, job: Job, token: str) -> dict[str, Any]:
        if job.name == RECONCILE_JOB:
            report = await self.reconciler.run_once()
            return report.as_dict()
        try:
            payload = parse_job(CampaignTimeoutJob, job.data)
        except InvalidInput as exc:
            raise UnrecoverableError(str(exc)) from None
        key = NodeKey(payload.campaign_id, payload.node_id, payload.product_user_id)
        row = await self.store.get_state(key)
        if row is None:
            raise UnrecoverableError(f"{key} has no node state: nothing can time out")
        if row.state == NodeState.WAITING and await self.engine.matched_by(row, payload.timeout_at):
            # An event from before the deadline is recorded but its re-evaluation has not run
            # yet: it counts, the user takes the Default edges.
            done = await self.engine.move_on(
                row, NodeState.COMPLETED, "matched", Actor(self.worker_name, str(job.id)),
                expected={NodeState.WAITING},
            )  # fmt: skip
            if done is not None:
                return {"state": done.state, "matchedAtDeadline": True}
        won = await self.engine.move_on(
            row,
            NodeState.TIMEOUT,
            "timed_out",
            Actor(self.worker_name, str(job.id)),
            expected={NodeState.PENDING, NodeState.RUNNING, NodeState.WAITING},
        )
        if won is None:
            return {"skipped": True, "state": row.state}  # finished first: left alone
        await self.scheduling.queues.remove(
            self.scheduling.queues.execution,
            execution_job_id(key.campaign_id, key.node_id, key.product_user_id),
        )
        return {"state": NodeState.TIMEOUT.value}
