"""The scheduling service: turn "run this node for this user at that time" into a node state
row (first) and a delayed BullMQ job (second), and compute business-hours / specific-time
run times in the product user's zone."""

from __future__ import annotations

from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from redis.exceptions import RedisError

from .config import Settings
from .connections import Enqueued, Queues, redis_unavailable
from .db import Campaign, NodeStateRow, ProductUser
from .errors import InvalidInput
from .jobs import (
    EXECUTION_JOB,
    TIMEOUT_JOB,
    CampaignExecutionJob,
    CampaignTimeoutJob,
    execution_job_id,
    timeout_job_id,
)
from .states import NodeState
from .store import Actor, NodeKey, StateStore
from .timewindows import (
    BusinessHours,
    ensure_utc,
    next_business_instant,
    next_specific_time,
    resolve_zone,
    utcnow,
)


def _ms(instant: datetime) -> int:
    return int(instant.timestamp() * 1000)


class SchedulingService:
    def __init__(
        self, store: StateStore, queues: Queues, settings: Settings, actor: Actor | None = None
    ) -> None:
        self.store = store
        self.queues = queues
        self.settings = settings
        self.actor = actor or Actor(worker="scheduler")

    # ---- scheduling ---------------------------------------------------------------------

    async def schedule_campaign_node(
        self,
        campaign_id: str,
        node_id: str,
        user_id: str,
        product_user_id: str,
        run_at: datetime,
    ) -> NodeStateRow:
        """Schedule one visit. A run time in the past runs now; a naive one is refused."""
        run_at = ensure_utc(run_at, "run_at")
        key = NodeKey(campaign_id, node_id, product_user_id)
        job_id = execution_job_id(campaign_id, node_id, product_user_id)
        campaign, _node, user = await self.store.require_visit_parts(key)
        if user_id not in (campaign.user_id, user.user_id) or campaign.user_id != user.user_id:
            raise InvalidInput(
                f"user {user_id!r} does not own both campaign {campaign_id!r} "
                f"(owner {campaign.user_id!r}) and product user {product_user_id!r} "
                f"(owner {user.user_id!r}): pass the owning account's id"
            )
        row = await self.store.schedule_pending(
            key, user_id, run_at, job_id, Actor(self.actor.worker, job_id)
        )
        await self.enqueue_execution(row)
        return row

    @staticmethod
    def execution_payload(row: NodeStateRow) -> CampaignExecutionJob:
        assert row.run_at is not None
        return CampaignExecutionJob(
            campaign_id=row.campaign_id,
            node_id=row.node_id,
            user_id=row.user_id,
            product_user_id=row.product_user_id,
            execution_time=row.run_at,
            attempts=row.attempts,
            did_timeout=row.did_timeout,
        )

    async def enqueue_execution(self, row: NodeStateRow) -> Enqueued:
        """(Re)create the execution job of a PENDING row; safe to repeat."""
        assert row.run_at is not None
        payload = self.execution_payload(row)
        wire = payload.wire()

        def same(existing: dict[str, Any]) -> bool:
            return bool(existing.get("executionTime") == wire["executionTime"])

        return await self.queues.add_unique(
            self.queues.execution, EXECUTION_JOB, wire, payload.job_id, _ms(row.run_at), same
        )

    async def enqueue_new(self, rows: list[NodeStateRow]) -> None:
        """Jobs for visits just created (no job can exist under their ids yet), in one round
        trip. Safe to repeat: Redis ignores an id it already has."""
        if not rows:
            return
        jobs = []
        for row in rows:
            assert row.run_at is not None
            payload = self.execution_payload(row)
            delay = max(0, _ms(row.run_at) - _ms(utcnow()))
            jobs.append(
                {"name": EXECUTION_JOB, "data": payload.wire(),
                 "opts": {"jobId": payload.job_id, "delay": delay}}
            )  # fmt: skip
        try:
            await self.queues.execution.addBulk(jobs)
        except (RedisError, OSError) as exc:
            raise redis_unavailable(self.settings, exc) from exc

    async def schedule_timeout(
        self,
        campaign_id: str,
        node_id: str,
        user_id: str,
        product_user_id: str,
        timeout_at: datetime,
    ) -> NodeStateRow:
        timeout_at = ensure_utc(timeout_at, "timeout_at")
        key = NodeKey(campaign_id, node_id, product_user_id)
        job_id = timeout_job_id(campaign_id, node_id, product_user_id)
        row = await self.store.set_timeout(
            key, timeout_at, job_id, Actor(self.actor.worker, job_id)
        )
        await self.enqueue_timeout(row)
        return row

    async def enqueue_timeout(self, row: NodeStateRow) -> Enqueued:
        assert row.timeout_at is not None
        payload = CampaignTimeoutJob(
            campaign_id=row.campaign_id,
            node_id=row.node_id,
            user_id=row.user_id,
            product_user_id=row.product_user_id,
            timeout_at=row.timeout_at,
            attempts=row.attempts,
        )
        wire = payload.wire()

        def same(existing: dict[str, Any]) -> bool:
            return bool(existing.get("timeoutAt") == wire["timeoutAt"])

        return await self.queues.add_unique(
            self.queues.timeout, TIMEOUT_JOB, wire, payload.job_id, _ms(row.timeout_at), same
        )

    async def cancel_node(
        self, campaign_id: str, node_id: str, product_user_id: str, reason: str = "cancelled"
    ) -> bool:
        """PENDING/RUNNING -> CANCELLED and remove its jobs. False if it had already finished."""
        key = NodeKey(campaign_id, node_id, product_user_id)
        row = await self.store.get_state(key)
        if row is None:
            return False
        won = await self.store.transition(
            row.id,
            {NodeState.PENDING, NodeState.RUNNING},
            NodeState.CANCELLED,
            reason,
            self.actor,
            values={"completed_at": utcnow()},
        )
        if won is None:
            return False
        await self.remove_jobs(key)
        return True

    async def remove_jobs(self, key: NodeKey) -> None:
        """Remove a visit's execution and timeout jobs (a job a worker holds stays)."""
        parts = (key.campaign_id, key.node_id, key.product_user_id)
        await self.queues.remove(self.queues.execution, execution_job_id(*parts))
        await self.queues.remove(self.queues.timeout, timeout_job_id(*parts))

    # ---- run-time rules -----------------------------------------------------------------

    def zone_of(self, campaign: Campaign | None, user: ProductUser | None) -> ZoneInfo:
        """The product user's zone, else the campaign's, else SCHEDULER_DEFAULT_TIMEZONE."""
        name = (user and user.timezone) or (campaign and campaign.timezone)
        return resolve_zone(name or self.settings.default_timezone)

    async def zone_for(self, campaign_id: str, product_user_id: str) -> ZoneInfo:
        """`zone_of`, loading the user and campaign first."""
        user = await self.store.get_product_user(product_user_id)
        campaign = await self.store.get_campaign(campaign_id)
        return self.zone_of(campaign, user)

    async def business_hours_time(
        self,
        campaign_id: str,
        product_user_id: str,
        now: datetime | None = None,
        hours: BusinessHours | None = None,
    ) -> datetime:
        """Now if inside the user's business hours, else the start of the next window."""
        zone = await self.zone_for(campaign_id, product_user_id)
        return next_business_instant(
            ensure_utc(now or utcnow(), "now"), zone, hours or self.settings.business_hours()
        )

    async def specific_time(
        self, campaign_id: str, product_user_id: str, at: time, now: datetime | None = None
    ) -> datetime:
        """The next `at` on the user's wall clock (tomorrow when today's has passed)."""
        zone = await self.zone_for(campaign_id, product_user_id)
        return next_specific_time(ensure_utc(now or utcnow(), "now"), zone, at)
