"""The durable state store: campaigns, product users and guarded node-state transitions.

Every change of a node's state goes through `_transition`: in one transaction it locks the
row, checks that the state is one the caller expected, updates it with the observed state in
the WHERE clause (so a concurrent writer cannot slip in between) and appends the audit row.
A caller that loses the race gets None and must treat the work as someone else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from .db import (
    Campaign,
    CampaignEdge,
    CampaignEntry,
    CampaignNode,
    Event,
    NodeStateRow,
    NodeTransition,
    ProductUser,
    describe_url,
    is_sqlite,
    make_engine,
    make_sessionmaker,
)
from .errors import BackendUnavailable, NotFound, StateConflict
from .jobs import execution_job_id
from .states import CampaignState, NodeState, check_transition
from .timewindows import ensure_utc, resolve_zone, utcnow

DEFAULT_WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class NodeKey:
    campaign_id: str
    node_id: str
    product_user_id: str

    def __str__(self) -> str:
        return f"campaign {self.campaign_id} node {self.node_id} user {self.product_user_id}"


@dataclass(frozen=True)
class Successor:
    """A node a user moves on to, created PENDING in the transition that finishes the last."""

    node_id: str
    run_at: datetime


@dataclass(frozen=True)
class StartResult:
    """What `start_run` did: `outcome` is started, taken_over, early, missing or
    not_startable; on a start, the visit's campaign, node and product user come along."""

    row: NodeStateRow | None
    outcome: str
    campaign: Campaign | None = None
    node: CampaignNode | None = None
    product_user: ProductUser | None = None

    @property
    def started(self) -> bool:
        return self.outcome in ("started", "taken_over")


@dataclass(frozen=True)
class Actor:
    """Who makes a change, for the audit trail."""

    worker: str | None = None
    job_id: str | None = None


class StateStore:
    def __init__(
        self, engine: AsyncEngine, url: str | None = None, read_engine: AsyncEngine | None = None
    ) -> None:
        self.engine = engine
        self.read_engine = read_engine or engine
        self.sessions = make_sessionmaker(engine)
        self.read_sessions = make_sessionmaker(self.read_engine)
        self.url = describe_url(url or str(engine.url))
        # SQLite has one writer at a time; queueing our own writers here is far cheaper than
        # letting them spin in SQLite's busy handler (other processes still use it).
        self._write_lock: asyncio.Lock | None = (
            asyncio.Lock() if engine.dialect.name == "sqlite" else None
        )

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        # SQLite: a separate pool whose transactions do not take the write lock.
        reader = make_engine(url, writer=False) if is_sqlite(url) else None
        return cls(make_engine(url), url, reader)

    async def close(self) -> None:
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()

    @asynccontextmanager
    async def session(self, readonly: bool = False) -> AsyncIterator[AsyncSession]:
        """A transaction; connection trouble becomes BackendUnavailable with the fix in it."""
        maker = self.read_sessions if readonly else self.sessions
        lock = None if readonly else self._write_lock
        try:
            async with contextlib.AsyncExitStack() as stack:
                if lock is not None:
                    await stack.enter_async_context(lock)
                s = await stack.enter_async_context(maker())
                await stack.enter_async_context(s.begin())
                yield s
        except (OperationalError, InterfaceError) as exc:
            reason = " ".join(str(exc.orig or exc).split())[:200]  # one line, whatever the driver
            raise BackendUnavailable(
                f"database {self.url} is unavailable ({reason}); "
                "start it or correct DATABASE_URL - nothing was changed, retry when it is back"
            ) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise BackendUnavailable(
                    f"lost the connection to database {self.url}; retry when it is back"
                ) from exc
            raise

    async def ping(self) -> None:
        async with self.session(readonly=True) as s:
            await s.execute(select(1))

    # ---- campaigns, nodes, product users ----------------------------------------------

    async def create_campaign(
        self,
        campaign_id: str,
        name: str,
        user_id: str,
        *,
        state: CampaignState = CampaignState.RUNNING,
        timezone: str | None = None,
        nodes: Sequence[tuple[str, str, dict[str, Any]]] = (),
        edges: Sequence[tuple[str, str, str]] = (),
    ) -> Campaign:
        if timezone is not None:
            resolve_zone(timezone)
        now = utcnow()
        campaign = Campaign(
            id=campaign_id,
            name=name,
            user_id=user_id,
            state=state.value,
            timezone=timezone,
            created_at=now,
            launched_at=now if state == CampaignState.RUNNING else None,
        )
        try:
            async with self.session() as s:
                s.add(campaign)
                await s.flush()
                for node_id, kind, config in nodes:
                    s.add(
                        CampaignNode(id=node_id, campaign_id=campaign_id, kind=kind, config=config)
                    )
                await s.flush()
                for from_id, to_id, edge_kind in edges:
                    s.add(
                        CampaignEdge(
                            campaign_id=campaign_id,
                            from_id=from_id,
                            to_id=to_id,
                            edge_kind=edge_kind,
                        )
                    )
        except IntegrityError:
            raise StateConflict(
                f"campaign {campaign_id!r} or one of its node ids already exists: choose new ids"
            ) from None
        return campaign

    async def move_campaign(
        self, campaign_id: str, expected: CampaignState, to: CampaignState, **values: Any
    ) -> bool:
        """Guarded campaign state change; False if it was not in `expected`."""
        async with self.session() as s:
            res = await s.execute(
                update(Campaign)
                .where(Campaign.id == campaign_id, Campaign.state == expected.value)
                .values(state=to.value, **values)
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def load_graph(self, campaign_id: str) -> tuple[list[CampaignNode], list[CampaignEdge]]:
        async with self.session(readonly=True) as s:
            nodes = (
                await s.execute(select(CampaignNode).where(CampaignNode.campaign_id == campaign_id))
            ).scalars()
            edges = (
                await s.execute(select(CampaignEdge).where(CampaignEdge.campaign_id == campaign_id))
            ).scalars()
            return list(nodes), list(edges)

    async def running_entry_nodes(self, kind: str) -> list[tuple[Campaign, CampaignNode]]:
        """Entry nodes of this kind in RUNNING campaigns."""
        async with self.session(readonly=True) as s:
            rows = await s.execute(
                select(Campaign, CampaignNode)
                .join(CampaignNode, CampaignNode.campaign_id == Campaign.id)
                .where(Campaign.state == CampaignState.RUNNING.value, CampaignNode.kind == kind)
            )
            return [(c, n) for c, n in rows]

    async def product_users_of(
        self, user_id: str, after_id: str = "", limit: int = 500
    ) -> list[ProductUser]:
        async with self.session(readonly=True) as s:
            rows = await s.execute(
                select(ProductUser)
                .where(ProductUser.user_id == user_id, ProductUser.id > after_id)
                .order_by(ProductUser.id)
                .limit(limit)
            )
            return list(rows.scalars())

    async def add_events(self, events: Sequence[Event]) -> None:
        async with self.session() as s:
            s.add_all(events)

    async def user_events(self, product_user_id: str) -> list[tuple[str, datetime]]:
        async with self.session(readonly=True) as s:
            rows = await s.execute(
                select(Event.name, Event.occurred_at).where(
                    Event.product_user_id == product_user_id
                )
            )
            return [(name, at) for name, at in rows]

    async def enter(
        self,
        campaign: Campaign,
        entry_node_id: str,
        product_user_ids: Sequence[str],
        run_at: datetime,
    ) -> list[NodeStateRow]:
        """Enter users into a campaign at its entry node, in one transaction. Users who
        entered before are skipped: the unique constraint makes it at most once."""
        created: list[NodeStateRow] = []
        async with self.session() as s:
            for product_user_id in product_user_ids:
                try:
                    async with s.begin_nested():
                        s.add(
                            CampaignEntry(
                                campaign_id=campaign.id,
                                product_user_id=product_user_id,
                                entry_node_id=entry_node_id,
                                entered_at=utcnow(),
                            )
                        )
                        await s.flush()
                except IntegrityError:
                    continue
                created += await self._create_states(
                    s, campaign.id, product_user_id, campaign.user_id,
                    [Successor(entry_node_id, run_at)], "entered", Actor("engine"),
                )  # fmt: skip
        return created

    async def _create_states(
        self,
        s: AsyncSession,
        campaign_id: str,
        product_user_id: str,
        user_id: str,
        successors: Sequence[Successor],
        reason: str,
        actor: Actor,
    ) -> list[NodeStateRow]:
        """New PENDING visits; a node this user already visited is skipped (one row a visit)."""
        created = []
        for succ in successors:
            key = NodeKey(campaign_id, succ.node_id, product_user_id)
            if await self._by_key(s, key) is not None:
                continue
            now = utcnow()
            row = NodeStateRow(
                campaign_id=campaign_id,
                node_id=succ.node_id,
                product_user_id=product_user_id,
                user_id=user_id,
                state=NodeState.PENDING.value,
                attempts=0,
                did_timeout=False,
                run_at=succ.run_at,
                job_id=execution_job_id(campaign_id, succ.node_id, product_user_id),
                created_at=now,
                updated_at=now,
            )
            try:
                async with s.begin_nested():
                    s.add(row)
                    await s.flush()
            except IntegrityError:
                continue  # created concurrently by another path into the same node
            self._audit(s, row, None, NodeState.PENDING, reason, actor, row.job_id)
            created.append(row)
        return created

    async def record_delivery(
        self, node_state_id: int, token: str, delivery: dict[str, Any]
    ) -> bool:
        """Note what an attempt delivered, only while that attempt still owns the visit."""
        async with self.session() as s:
            res = await s.execute(
                update(NodeStateRow)
                .where(
                    NodeStateRow.id == node_state_id,
                    NodeStateRow.state == NodeState.RUNNING.value,
                    NodeStateRow.run_token == token,
                )
                .values(delivered_at=utcnow(), delivery=delivery, updated_at=utcnow())
            )
            return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def set_campaign_state(self, campaign_id: str, state: CampaignState) -> None:
        async with self.session() as s:
            res = await s.execute(
                update(Campaign).where(Campaign.id == campaign_id).values(state=state.value)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"unknown campaign {campaign_id!r}")

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
        if timezone is not None:
            resolve_zone(timezone)
        async with self.session() as s:
            pu = await s.get(ProductUser, product_user_id, with_for_update=True)
            if pu is None:
                pu = ProductUser(id=product_user_id, user_id=user_id, traits={})
                s.add(pu)
            pu.email = email if email is not None else pu.email
            pu.timezone = timezone if timezone is not None else pu.timezone
            pu.external_id = external_id if external_id is not None else pu.external_id
            if traits:
                pu.traits = {**(pu.traits or {}), **traits}
            pu.updated_at = utcnow()
        return pu

    async def get_campaign(self, campaign_id: str) -> Campaign | None:
        async with self.session(readonly=True) as s:
            return await s.get(Campaign, campaign_id)

    async def get_product_user(self, product_user_id: str) -> ProductUser | None:
        async with self.session(readonly=True) as s:
            return await s.get(ProductUser, product_user_id)

    async def require_visit_parts(self, key: NodeKey) -> tuple[Campaign, CampaignNode, ProductUser]:
        """The campaign, node and product user a visit names, or NotFound naming the missing one."""
        async with self.session(readonly=True) as s:
            campaign = await s.get(Campaign, key.campaign_id)
            node = await s.get(CampaignNode, key.node_id)
            user = await s.get(ProductUser, key.product_user_id)
        if campaign is None:
            raise NotFound(f"unknown campaign {key.campaign_id!r}: create it first")
        if node is None or node.campaign_id != key.campaign_id:
            raise NotFound(f"campaign {key.campaign_id!r} has no node {key.node_id!r}")
        if user is None:
            raise NotFound(f"unknown product user {key.product_user_id!r}: upsert it first")
        return campaign, node, user

    # ---- node states --------------------------------------------------------------------

    async def get_state(self, key: NodeKey) -> NodeStateRow | None:
        async with self.session(readonly=True) as s:
            return await self._by_key(s, key)

    async def get_state_by_id(self, node_state_id: int) -> NodeStateRow | None:
        async with self.session(readonly=True) as s:
            return await s.get(NodeStateRow, node_state_id)

    @staticmethod
    async def _by_key(s: AsyncSession, key: NodeKey, lock: bool = False) -> NodeStateRow | None:
        stmt = select(NodeStateRow).where(
            NodeStateRow.campaign_id == key.campaign_id,
            NodeStateRow.node_id == key.node_id,
            NodeStateRow.product_user_id == key.product_user_id,
        )
        if lock:
            stmt = stmt.with_for_update()
        return (await s.execute(stmt)).scalar_one_or_none()

    async def history(self, node_state_id: int) -> list[NodeTransition]:
        async with self.session(readonly=True) as s:
            rows = await s.execute(
                select(NodeTransition)
                .where(NodeTransition.node_state_id == node_state_id)
                .order_by(NodeTransition.id)
            )
            return list(rows.scalars())

    async def transitions_since(self, after_id: int, limit: int = 500) -> list[NodeTransition]:
        async with self.session(readonly=True) as s:
            rows = await s.execute(
                select(NodeTransition)
                .where(NodeTransition.id > after_id)
                .order_by(NodeTransition.id)
                .limit(limit)
            )
            return list(rows.scalars())

    async def list_states(
        self,
        states: Collection[NodeState],
        *,
        updated_before: datetime | None = None,
        after_id: int = 0,
        limit: int = 500,
        campaign_id: str | None = None,
        product_user_id: str | None = None,
        product_user_ids: Collection[str] | None = None,
    ) -> list[NodeStateRow]:
        stmt = (
            select(NodeStateRow)
            .where(
                NodeStateRow.state.in_([NodeState(s).value for s in states]),
                NodeStateRow.id > after_id,
            )
            .order_by(NodeStateRow.id)
            .limit(limit)
        )
        if updated_before is not None:
            stmt = stmt.where(NodeStateRow.updated_at < updated_before)
        if campaign_id is not None:
            stmt = stmt.where(NodeStateRow.campaign_id == campaign_id)
        if product_user_id is not None:
            stmt = stmt.where(NodeStateRow.product_user_id == product_user_id)
        if product_user_ids is not None:
            stmt = stmt.where(NodeStateRow.product_user_id.in_(list(product_user_ids)))
        async with self.session(readonly=True) as s:
            return list((await s.execute(stmt)).scalars())

    async def schedule_pending(
        self,
        key: NodeKey,
        user_id: str,
        run_at: datetime,
        job_id: str,
        actor: Actor,
        reason: str = "scheduled",
    ) -> NodeStateRow:
        """Create the visit as PENDING at `run_at`, or move an existing PENDING/FAILED one there.

        Runs before the job is enqueued: if Redis then fails, the reconciler still finds it.
        """
        run_at = ensure_utc(run_at, "run_at")
        for _ in range(2):  # a concurrent insert of the same visit loses once, then updates
            try:
                async with self.session() as s:
                    row = await self._by_key(s, key, lock=True)
                    if row is None:
                        now = utcnow()
                        row = NodeStateRow(
                            campaign_id=key.campaign_id,
                            node_id=key.node_id,
                            product_user_id=key.product_user_id,
                            user_id=user_id,
                            state=NodeState.PENDING.value,
                            attempts=0,
                            did_timeout=False,
                            run_at=run_at,
                            job_id=job_id,
                            created_at=now,
                            updated_at=now,
                        )
                        s.add(row)
                        await s.flush()
                        self._audit(s, row, None, NodeState.PENDING, reason, actor, job_id)
                        return row
                    src = NodeState(row.state)
                    if src not in (NodeState.PENDING, NodeState.FAILED):
                        raise StateConflict(
                            f"{key} is {src}: only a PENDING or FAILED visit can be scheduled; "
                            "a finished visit is kept as history"
                        )
                    if src == NodeState.PENDING and row.run_at == run_at and row.job_id == job_id:
                        return row  # idempotent repeat of the same request
                    values: dict[str, Any] = {"run_at": run_at, "job_id": job_id}
                    if src == NodeState.FAILED:
                        values |= {"completed_at": None, "run_token": None}
                    won = await self._apply(
                        s,
                        row,
                        src,
                        NodeState.PENDING,
                        reason if src == NodeState.PENDING else "retry_requested",
                        actor,
                        values,
                    )
                    assert won is not None  # the row is locked by us
                    return won
            except IntegrityError:
                continue
        raise StateConflict(f"{key} is being scheduled concurrently; retry")

    async def set_timeout(
        self, key: NodeKey, timeout_at: datetime, timeout_job_id: str, actor: Actor
    ) -> NodeStateRow:
        timeout_at = ensure_utc(timeout_at, "timeout_at")
        async with self.session() as s:
            row = await self._by_key(s, key, lock=True)
            if row is None:
                raise NotFound(f"{key} has no node state: schedule the node before its timeout")
            src = NodeState(row.state)
            if src not in (NodeState.PENDING, NodeState.RUNNING):
                raise StateConflict(f"{key} is {src}: a finished visit cannot time out")
            row.timeout_at = timeout_at
            row.timeout_job_id = timeout_job_id
            row.updated_at = utcnow()
            self._audit(s, row, src, src, "timeout_scheduled", actor, timeout_job_id)
            return row

    async def transition(
        self,
        node_state_id: int,
        expected: Collection[NodeState],
        to: NodeState,
        reason: str,
        actor: Actor,
        *,
        token: str | None = None,
        values: dict[str, Any] | None = None,
        error: BaseException | None = None,
    ) -> NodeStateRow | None:
        """Guarded change from one of `expected` (and, with `token`, only by that attempt).

        Returns the updated row, or None when the row was not in an expected state: some
        other job, worker or timeout got there first, and the caller must not act.
        """
        row, _ = await self.finish(
            node_state_id, expected, to, reason, actor, token=token, values=values, error=error
        )
        return row

    async def finish(
        self,
        node_state_id: int,
        expected: Collection[NodeState],
        to: NodeState,
        reason: str,
        actor: Actor,
        *,
        token: str | None = None,
        values: dict[str, Any] | None = None,
        error: BaseException | None = None,
        successors: Sequence[Successor] = (),
    ) -> tuple[NodeStateRow | None, list[NodeStateRow]]:
        """`transition`, plus the user's next nodes created PENDING in the same transaction:
        either both happen or neither, so a crash cannot strand a user between nodes."""
        async with self.session() as s:
            row = await s.get(NodeStateRow, node_state_id, with_for_update=True)
            if row is None or NodeState(row.state) not in expected:
                return None, []
            if token is not None and row.run_token != token:
                return None, []
            done = await self._apply(
                s, row, NodeState(row.state), to, reason, actor, dict(values or {}), error, token
            )
            if done is None or not successors:
                return done, []
            created = await self._create_states(
                s, row.campaign_id, row.product_user_id, row.user_id, successors,
                f"from {row.node_id}"[:64], actor,
            )  # fmt: skip
            return done, created

    async def start_run(
        self, key: NodeKey, job_id: str, token: str, actor: Actor, *, not_before: datetime
    ) -> StartResult:
        """PENDING -> RUNNING for this attempt, or RUNNING -> RUNNING when BullMQ hands the same
        job to a new worker after the previous one lost its lock (crash or stall).

        One transaction also loads what the handler needs. A visit due after `not_before` is
        not started (the job fired early: the visit was rescheduled later).
        """
        async with self.session() as s:
            row = await self._by_key(s, key, lock=True)
            if row is None:
                return StartResult(None, "missing")
            src = NodeState(row.state)
            if src == NodeState.PENDING and row.run_at is not None and row.run_at > not_before:
                return StartResult(row, "early")
            if src == NodeState.PENDING:
                reason = "started"
            elif src == NodeState.RUNNING and row.job_id == job_id and row.run_token != token:
                reason = "taken_over"
            else:
                return StartResult(row, "not_startable")
            values = {"attempts": row.attempts + 1, "run_token": token, "job_id": job_id}
            won = await self._apply(
                s, row, src, NodeState.RUNNING, reason, actor, values, None, row.run_token
            )
            if won is None:
                return StartResult(row, "not_startable")
            campaign = await s.get(Campaign, key.campaign_id)
            node = await s.get(CampaignNode, key.node_id)
            user = await s.get(ProductUser, key.product_user_id)
            return StartResult(won, reason, campaign, node, user)

    async def _apply(
        self,
        s: AsyncSession,
        row: NodeStateRow,
        src: NodeState,
        to: NodeState,
        reason: str,
        actor: Actor,
        values: dict[str, Any],
        error: BaseException | None = None,
        token: str | None = None,
    ) -> NodeStateRow | None:
        check_transition(src, to)
        now = utcnow()
        if error is not None:
            values |= {"last_error_type": type(error).__name__, "last_error": str(error)[:4000]}
        guard = [NodeStateRow.id == row.id, NodeStateRow.state == src.value]
        if token is not None:
            guard.append(NodeStateRow.run_token == token)
        res = await s.execute(
            update(NodeStateRow)
            .where(*guard)
            .values(state=to.value, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return None
        # Mirror the UPDATE on the loaded row without marking it dirty (no second UPDATE,
        # no re-SELECT).
        for name, value in {"state": to.value, "updated_at": now, **values}.items():
            set_committed_value(row, name, value)
        self._audit(s, row, src, to, reason, actor, actor.job_id, error)
        return row

    @staticmethod
    def _audit(
        s: AsyncSession,
        row: NodeStateRow,
        src: NodeState | None,
        to: NodeState,
        reason: str,
        actor: Actor,
        job_id: str | None,
        error: BaseException | None = None,
    ) -> None:
        s.add(
            NodeTransition(
                node_state_id=row.id,
                campaign_id=row.campaign_id,
                node_id=row.node_id,
                product_user_id=row.product_user_id,
                from_state=src.value if src else None,
                to_state=to.value,
                at=utcnow(),
                attempt=row.attempts,
                reason=reason,
                worker=actor.worker or DEFAULT_WORKER,
                job_id=job_id,
                error_type=type(error).__name__ if error else None,
                error_message=str(error)[:4000] if error else None,
            )
        )
