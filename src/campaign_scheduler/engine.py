"""The campaign engine: campaigns as graphs, run for every product user on the core queues.

It owns what happens *between* nodes - entering users, moving them along edges, stopping a
campaign - while the scheduling service and processors own each node's timing and execution.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from .conditions import Condition, evaluate, events_named
from .config import Settings
from .db import Campaign, CampaignNode, Event, NodeStateRow, ProductUser
from .errors import InvalidInput, NotFound, StateConflict
from .graph import (
    AudienceConfig,
    EdgeKind,
    EdgeSpec,
    FilterConfig,
    NodeKind,
    NodeSpec,
    TriggerConfig,
    arrival_run_at,
    check_graph,
)
from .jobs import timeout_job_id
from .logs import event
from .scheduling import SchedulingService
from .states import CampaignState, NodeState
from .store import Actor, NodeKey, StateStore, Successor
from .timewindows import ensure_utc, utcnow

log = logging.getLogger(__name__)
ENGINE = Actor(worker="engine")


@dataclass(frozen=True)
class Graph:
    nodes: dict[str, CampaignNode]
    out: dict[tuple[str, str], list[str]]  # (from node, edge kind) -> to nodes


@dataclass
class EventIn:
    product_user_id: str
    name: str
    properties: dict[str, Any] = field(default_factory=dict)
    occurred_at: datetime | None = None


class CampaignEngine:
    def __init__(
        self, store: StateStore, scheduling: SchedulingService, settings: Settings
    ) -> None:
        self.store = store
        self.scheduling = scheduling
        self.settings = settings
        self._graphs: dict[str, Graph] = {}  # campaign graphs never change after creation
        self.hours = settings.business_hours()  # parsed once, not on every move

    # ---- campaigns ------------------------------------------------------------------------

    async def create_campaign(
        self,
        campaign_id: str,
        name: str,
        user_id: str,
        nodes: list[NodeSpec],
        edges: list[EdgeSpec],
        *,
        timezone: str | None = None,
    ) -> Campaign:
        """A draft campaign; every problem with its graph is reported at once."""
        check_graph(nodes, edges)
        return await self.store.create_campaign(
            campaign_id,
            name,
            user_id,
            state=CampaignState.PENDING,
            timezone=timezone,
            nodes=[(n.id, n.kind, n.config) for n in nodes],
            edges=[(e.from_id, e.to_id, e.kind) for e in edges],
        )

    async def graph(self, campaign_id: str) -> Graph:
        if campaign_id not in self._graphs:
            nodes, edges = await self.store.load_graph(campaign_id)
            out: dict[tuple[str, str], list[str]] = defaultdict(list)
            for e in edges:
                out[(e.from_id, e.edge_kind)].append(e.to_id)
            self._graphs[campaign_id] = Graph({n.id: n for n in nodes}, dict(out))
        return self._graphs[campaign_id]

    async def launch(self, campaign_id: str) -> int:
        """Draft -> RUNNING, then enter the existing users of Existing/Both audiences."""
        campaign = await self.store.get_campaign(campaign_id)
        if campaign is None:
            raise NotFound(f"unknown campaign {campaign_id!r}")
        if not await self.store.move_campaign(
            campaign_id, CampaignState.PENDING, CampaignState.RUNNING, launched_at=utcnow()
        ):
            current = (await self.store.get_campaign(campaign_id)) or campaign
            if current.state == CampaignState.RUNNING:
                raise StateConflict(f"campaign {campaign_id!r} is already running")
            raise StateConflict(
                f"campaign {campaign_id!r} is {current.state}: only a draft can be launched; "
                "create a new campaign to run it again"
            )
        campaign.state = CampaignState.RUNNING.value
        graph = await self.graph(campaign_id)
        entered = 0
        for node in graph.nodes.values():
            if node.kind != NodeKind.AUDIENCE:
                continue
            cfg = AudienceConfig.model_validate(node.config)
            if cfg.rule not in ("Existing", "Both"):
                continue
            after = ""
            while batch := await self.store.product_users_of(campaign.user_id, after):
                after = batch[-1].id
                entered += await self._enter(campaign, node, batch, cfg.condition)
        event(log, logging.INFO, "campaign_launched", campaignId=campaign_id, entered=entered)
        return entered

    async def stop(self, campaign_id: str) -> int:
        """RUNNING -> STOPPED; every unfinished visit becomes CANCELLED and its jobs leave Redis.
        Finished visits are history and stay as they are."""
        if not await self.store.move_campaign(
            campaign_id, CampaignState.RUNNING, CampaignState.STOPPED, stopped_at=utcnow()
        ):
            campaign = await self.store.get_campaign(campaign_id)
            if campaign is None:
                raise NotFound(f"unknown campaign {campaign_id!r}")
            raise StateConflict(f"campaign {campaign_id!r} is {campaign.state}, not running")
        cancelled, after = 0, 0
        active = {NodeState.PENDING, NodeState.RUNNING, NodeState.WAITING}
        while rows := await self.store.list_states(active, campaign_id=campaign_id, after_id=after):
            after = rows[-1].id
            for row in rows:
                done = await self.store.transition(
                    row.id, active, NodeState.CANCELLED, "campaign_stopped", ENGINE,
                    values={"completed_at": utcnow()},
                )  # fmt: skip
                if done is not None:
                    cancelled += 1
                    await self.scheduling.remove_jobs(
                        NodeKey(row.campaign_id, row.node_id, row.product_user_id)
                    )
        event(log, logging.INFO, "campaign_stopped", campaignId=campaign_id, cancelled=cancelled)
        return cancelled

    # ---- users and events -----------------------------------------------------------------

    async def upsert_product_user(
        self,
        product_user_id: str,
        user_id: str,
        *,
        email: str | None = None,
        timezone: str | None = None,
        traits: dict[str, Any] | None = None,
        external_id: str | None = None,
    ) -> ProductUser:
        """Create or update a user; new ones enter New/Both audiences, and waiting filters
        are looked at again with the new traits."""
        existed = await self.store.get_product_user(product_user_id) is not None
        user = await self.store.upsert_product_user(
            product_user_id, user_id, email=email, timezone=timezone, traits=traits,
            external_id=external_id,
        )  # fmt: skip
        for campaign, node in await self.store.running_entry_nodes(NodeKind.AUDIENCE.value):
            if campaign.user_id != user_id:
                continue
            cfg = AudienceConfig.model_validate(node.config)
            if cfg.rule == "Both" or (cfg.rule == "New" and not existed):
                await self._enter(campaign, node, [user], cfg.condition)
        await self.reevaluate_filters(product_user_id)
        return user

    async def record_event(
        self,
        product_user_id: str,
        name: str,
        properties: dict[str, Any] | None = None,
        occurred_at: datetime | None = None,
    ) -> None:
        await self.record_events([EventIn(product_user_id, name, properties or {}, occurred_at)])

    async def record_events(self, events: list[EventIn]) -> None:
        """Store events, enter users into campaigns they trigger, re-evaluate waiting filters."""
        users: dict[str, ProductUser] = {}
        for e in events:
            if not e.name:
                raise InvalidInput("an event needs a name")
            if e.product_user_id not in users:
                user = await self.store.get_product_user(e.product_user_id)
                if user is None:
                    raise NotFound(f"unknown product user {e.product_user_id!r}: upsert it first")
                users[e.product_user_id] = user
        now = utcnow()
        await self.store.add_events(
            [
                Event(
                    product_user_id=e.product_user_id,
                    name=e.name,
                    properties=e.properties,
                    occurred_at=ensure_utc(e.occurred_at, "occurred_at") if e.occurred_at else now,
                    recorded_at=now,
                )
                for e in events
            ]
        )
        for campaign, node in await self.store.running_entry_nodes(NodeKind.TRIGGER.value):
            cfg = TriggerConfig.model_validate(node.config)
            hit = {
                e.product_user_id: users[e.product_user_id]
                for e in events
                if e.name == cfg.event and users[e.product_user_id].user_id == campaign.user_id
            }
            if hit:
                await self._enter(campaign, node, list(hit.values()), cfg.condition)
        await self.reevaluate_filters(*users)

    async def _enter(
        self,
        campaign: Campaign,
        node: CampaignNode,
        users: list[ProductUser],
        condition: Condition | None,
    ) -> int:
        """Enter the users who match `condition`, in one transaction and one Redis round trip."""
        if condition is not None:
            now = utcnow()
            needs_events = bool(events_named(condition))
            matching = []
            for user in users:
                events = await self.store.user_events(user.id) if needs_events else []
                if evaluate(condition, user.traits or {}, events, now):
                    matching.append(user)
            users = matching
        if not users:
            return 0
        rows = await self.store.enter(campaign, node.id, [u.id for u in users], utcnow())
        await self.scheduling.enqueue_new(rows)
        return len(rows)

    async def reevaluate_filters(self, *product_user_ids: str) -> int:
        """A waiting Filter whose condition now matches moves on along its Default edges."""
        rows = await self.store.list_states(
            {NodeState.WAITING}, product_user_ids=product_user_ids, limit=100_000
        )
        moved = 0
        cache: dict[str, tuple[ProductUser | None, list[tuple[str, datetime]]]] = {}
        for row in rows:
            if row.product_user_id not in cache:
                cache[row.product_user_id] = (
                    await self.store.get_product_user(row.product_user_id),
                    await self.store.user_events(row.product_user_id),
                )
            user, events = cache[row.product_user_id]
            if await self._filter_holds(row, user, events, utcnow()):
                moved += await self.move_on(row, NodeState.COMPLETED, "matched", ENGINE) is not None
        return moved

    async def matched_by(self, row: NodeStateRow, deadline: datetime) -> bool:
        """Did this waiting Filter's condition hold at its deadline (events up to then)?"""
        user = await self.store.get_product_user(row.product_user_id)
        events = [e for e in await self.store.user_events(row.product_user_id) if e[1] <= deadline]
        return await self._filter_holds(row, user, events, deadline)

    async def _filter_holds(
        self,
        row: NodeStateRow,
        user: ProductUser | None,
        events: list[tuple[str, datetime]],
        at: datetime,
    ) -> bool:
        """Is `row` a Filter visit whose condition holds for this user at `at`?"""
        node = (await self.graph(row.campaign_id)).nodes[row.node_id]
        if node.kind != NodeKind.FILTER or user is None:
            return False
        cfg = FilterConfig.model_validate(node.config)
        return evaluate(cfg.condition, user.traits or {}, events, at)

    # ---- moving along edges ------------------------------------------------------------

    async def successors(
        self,
        row: NodeStateRow,
        edge: EdgeKind,
        now: datetime | None = None,
        zone: ZoneInfo | None = None,
    ) -> list[Successor]:
        now = now or utcnow()
        graph = await self.graph(row.campaign_id)
        targets = graph.out.get((row.node_id, edge.value), [])
        if not targets:
            return []
        zone = zone or await self.scheduling.zone_for(row.campaign_id, row.product_user_id)
        return [
            Successor(
                t, arrival_run_at(graph.nodes[t].kind, graph.nodes[t].config, now, zone, self.hours)
            )
            for t in targets
        ]

    async def move_on(
        self,
        row: NodeStateRow,
        to: NodeState,
        reason: str,
        actor: Actor,
        *,
        token: str | None = None,
        expected: set[NodeState] | None = None,
        values: dict[str, Any] | None = None,
        campaign: Campaign | None = None,
        user: ProductUser | None = None,
    ) -> NodeStateRow | None:
        """Finish a visit (COMPLETED, or TIMEOUT along Timeout edges) and create the next
        visits in the same transaction; then queue their jobs. None if the visit was not ours.
        A caller that has the campaign and user at hand passes them to save reads."""
        edge = EdgeKind.TIMEOUT if to == NodeState.TIMEOUT else EdgeKind.DEFAULT
        campaign = campaign or await self.store.get_campaign(row.campaign_id)
        running = campaign is not None and campaign.state == CampaignState.RUNNING
        zone = self.scheduling.zone_of(campaign, user) if user is not None else None
        successors = await self.successors(row, edge, zone=zone) if running else []
        vals = {"completed_at": utcnow(), **(values or {})}
        if to == NodeState.TIMEOUT:
            vals["did_timeout"] = True
        done, created = await self.store.finish(
            row.id,
            expected or {NodeState.RUNNING, NodeState.WAITING},
            to,
            reason,
            actor,
            token=token,
            values=vals,
            successors=successors,
        )
        if done is None:
            return None
        if row.state == NodeState.WAITING or to == NodeState.TIMEOUT:
            q = self.scheduling.queues
            await q.remove(
                q.timeout, timeout_job_id(row.campaign_id, row.node_id, row.product_user_id)
            )
        await self.scheduling.enqueue_new(created)
        return done

    async def wait_for_match(
        self, row: NodeStateRow, token: str, timeout_at: datetime, actor: Actor
    ) -> NodeStateRow | None:
        """RUNNING -> WAITING until `timeout_at`; its timeout job sends it down Timeout edges."""
        key_job = timeout_job_id(row.campaign_id, row.node_id, row.product_user_id)
        waiting = await self.store.transition(
            row.id, {NodeState.RUNNING}, NodeState.WAITING, "waiting_for_match", actor,
            token=token, values={"timeout_at": timeout_at, "timeout_job_id": key_job},
        )  # fmt: skip
        if waiting is None:
            return None
        await self.scheduling.enqueue_timeout(waiting)
        # An event that arrived while we evaluated saw no WAITING row: look once more.
        await self.reevaluate_filters(row.product_user_id)
        return waiting
