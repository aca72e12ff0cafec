"""The HTTP API (FastAPI): campaigns, users, events, node states and audit trail, scheduling,
failed jobs, health and Prometheus metrics. OpenAPI at /docs."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from . import __version__
from .config import Settings
from .connections import Queues, redis_unavailable
from .db import NodeStateRow, NodeTransition
from .engine import CampaignEngine, EventIn
from .errors import BackendUnavailable, InvalidInput, NotFound, SchedulerError, StateConflict
from .graph import EdgeSpec, NodeSpec
from .jobs import check_id_part
from .scheduling import SchedulingService
from .states import NodeState
from .store import Actor, NodeKey, StateStore
from .worker import live_workers

MAX_ID = 2**62  # cursors above this fit no database integer: a 422, not a 500
After = Annotated[int, Query(ge=0, le=MAX_ID, description="cursor: the `next` of the last page")]
Limit = Annotated[int, Query(ge=1, le=1000)]
DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
# Module level: FastAPI resolves the (postponed) annotations that use it in module globals.
BEARER = HTTPBearer(auto_error=False)
QUEUE_STATES = ("waiting", "active", "delayed", "completed", "failed", "paused", "prioritized")


class _In(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class NodeIn(_In):
    id: str
    kind: str
    config: dict[str, Any] = Field(default_factory=dict)


class EdgeIn(_In):
    from_id: str = Field(alias="from")
    to_id: str = Field(alias="to")
    kind: Literal["Default", "Timeout"] = "Default"


class CampaignIn(_In):
    id: str = Field(min_length=1, max_length=100)
    name: str = Field(min_length=1, max_length=200)
    user_id: str = Field(alias="userId", min_length=1)
    timezone: str | None = None
    nodes: list[NodeIn]
    edges: list[EdgeIn] = Field(default_factory=list)


class ProductUserIn(_In):
    user_id: str = Field(alias="userId", min_length=1)
    email: str | None = None
    timezone: str | None = None
    external_id: str | None = Field(None, alias="externalId")
    traits: dict[str, Any] = Field(default_factory=dict)


class EventBody(_In):
    product_user_id: str = Field(alias="productUserId", min_length=1)
    name: str = Field(min_length=1, max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)
    occurred_at: datetime | None = Field(None, alias="occurredAt")


class EventBatch(_In):
    events: list[EventBody] = Field(min_length=1, max_length=10_000)


class ScheduleIn(_In):
    campaign_id: str = Field(alias="campaignId")
    node_id: str = Field(alias="nodeId")
    user_id: str = Field(alias="userId")
    product_user_id: str = Field(alias="productUserId")
    run_at: datetime = Field(alias="runAt")


class CancelIn(_In):
    campaign_id: str = Field(alias="campaignId")
    node_id: str = Field(alias="nodeId")
    product_user_id: str = Field(alias="productUserId")


def state_out(r: NodeStateRow) -> dict[str, Any]:
    return {
        "id": r.id, "campaignId": r.campaign_id, "nodeId": r.node_id,
        "productUserId": r.product_user_id, "state": r.state, "attempts": r.attempts,
        "didTimeout": r.did_timeout, "runAt": r.run_at, "timeoutAt": r.timeout_at,
        "completedAt": r.completed_at, "jobId": r.job_id, "timeoutJobId": r.timeout_job_id,
        "lastErrorType": r.last_error_type, "lastError": r.last_error, "delivery": r.delivery,
    }  # fmt: skip


def transition_out(t: NodeTransition) -> dict[str, Any]:
    return {
        "id": t.id, "nodeStateId": t.node_state_id, "campaignId": t.campaign_id,
        "nodeId": t.node_id, "productUserId": t.product_user_id, "from": t.from_state,
        "to": t.to_state, "at": t.at, "attempt": t.attempt, "reason": t.reason,
        "worker": t.worker, "jobId": t.job_id, "errorType": t.error_type,
        "errorMessage": t.error_message,
    }  # fmt: skip


class QueueCollector(Collector):
    """Queue sizes by state and live workers, read from Redis at scrape time."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues
        self.last: list[Any] = []

    def collect(self) -> Any:
        yield from self.last

    async def refresh(self) -> None:
        jobs = GaugeMetricFamily(
            "campaign_queue_jobs", "Jobs by queue and state", labels=["queue", "state"]
        )
        for q in (self.queues.execution, self.queues.timeout):
            counts = await q.getJobCounts(*QUEUE_STATES)
            for state, n in counts.items():
                jobs.add_metric([q.name, state], n)
        workers = GaugeMetricFamily("campaign_live_workers", "Workers with a fresh heartbeat")
        workers.add_metric([], len(await live_workers(self.queues)))
        self.last = [jobs, workers]


class Api:
    def __init__(self, settings: Settings, token: str) -> None:
        self.settings = settings
        self.token = token
        self.store = StateStore.from_url(settings.resolved_database_url())
        self.queues = Queues.open(settings)
        self.scheduling = SchedulingService(self.store, self.queues, settings)
        self.engine = CampaignEngine(self.store, self.scheduling, settings)
        self.collector = QueueCollector(self.queues)

    async def close(self) -> None:
        await self.queues.close()
        await self.store.close()


def create_app(settings: Settings, token: str | None = None) -> FastAPI:
    token = token or settings.api_token or secrets.token_urlsafe(24)
    api = Api(settings, token)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        REGISTRY.register(api.collector)
        try:
            yield
        finally:
            REGISTRY.unregister(api.collector)
            await api.close()

    app = FastAPI(
        title="campaign-scheduler",
        version=__version__,
        description="Durable campaign scheduler on BullMQ. Authenticate with `Authorization: "
        "Bearer <API_TOKEN>`; /health, /ready and /metrics are open.",
        lifespan=lifespan,
    )
    app.state.api = api

    def auth(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if creds is None or not secrets.compare_digest(creds.credentials, api.token):
            raise HTTPException(
                401, "missing or wrong bearer token: send Authorization: Bearer <API_TOKEN>",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(_: Request, exc: BackendUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        return JSONResponse({"detail": str(redis_unavailable(settings, exc))}, status_code=503)

    @app.exception_handler(OperationalError)
    async def _db(_: Request, exc: OperationalError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc.orig}"}, status_code=503)

    @app.exception_handler(NotFound)
    async def _nf(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(StateConflict)
    async def _conflict(_: Request, exc: StateConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(InvalidInput)
    async def _invalid(_: Request, exc: InvalidInput) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    # ---- open endpoints ---------------------------------------------------------------

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        # The page itself holds no data; it calls the API with the token the user enters.
        return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))

    @app.get("/api/queues", dependencies=[Depends(auth)], tags=["jobs"])
    async def queues_overview() -> dict[str, Any]:
        out = {}
        for q in (api.queues.execution, api.queues.timeout):
            out[q.name] = await q.getJobCounts(*QUEUE_STATES)
        async with api.store.session(readonly=True) as s:
            # Lateness of the most recent first attempts: started minus due. (A retry is due
            # after its backoff, not at run_at, so it would count its backoff as lateness.)
            rows = await s.execute(
                select(NodeTransition.at, NodeStateRow.run_at)
                .join(NodeStateRow, NodeStateRow.id == NodeTransition.node_state_id)
                .where(NodeTransition.reason == "started", NodeTransition.attempt == 1)
                .order_by(NodeTransition.id.desc())
                .limit(200)
            )
            late = sorted(
                max(0.0, (at - run_at).total_seconds() * 1000) for at, run_at in rows if run_at
            )
        pick = (lambda f: round(late[min(len(late) - 1, int(f * len(late)))], 1)) if late else None
        return {
            "queues": out,
            "workers": len(await live_workers(api.queues)),
            "completedTotal": sum(c.get("completed", 0) for c in out.values()),
            "latenessMs": {"n": len(late), "p50": pick(0.5) if pick else None,
                           "p99": pick(0.99) if pick else None},
        }  # fmt: skip

    @app.get("/health", tags=["health"])
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/ready", tags=["health"])
    async def ready() -> JSONResponse:
        checks: dict[str, Any] = {}
        try:
            await api.queues.ping()
            checks["redis"] = "ok"
            workers = await live_workers(api.queues)
            checks["workers"] = len(workers)
        except BackendUnavailable as exc:
            checks["redis"] = str(exc)
            checks["workers"] = 0
        try:
            await api.store.ping()
            checks["database"] = "ok"
        except BackendUnavailable as exc:
            checks["database"] = str(exc)
        ok = checks["redis"] == "ok" and checks["database"] == "ok" and checks["workers"] > 0
        return JSONResponse({"ready": ok, **checks}, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def metrics_endpoint() -> PlainTextResponse:
        try:
            await api.collector.refresh()
        except (RedisError, OSError):
            api.collector.last = []  # Redis down: the process metrics still go out
        return PlainTextResponse(
            generate_latest(REGISTRY).decode(), media_type="text/plain; version=0.0.4"
        )

    # ---- campaigns ----------------------------------------------------------------------

    secured = [Depends(auth)]

    @app.post("/api/campaigns", status_code=201, dependencies=secured, tags=["campaigns"])
    async def create_campaign(body: CampaignIn) -> dict[str, Any]:
        c = await api.engine.create_campaign(
            body.id, body.name, body.user_id,
            [NodeSpec(n.id, n.kind, n.config) for n in body.nodes],
            [EdgeSpec(e.from_id, e.to_id, e.kind) for e in body.edges],
            timezone=body.timezone,
        )  # fmt: skip
        return {"id": c.id, "state": c.state}

    @app.get("/api/campaigns/{campaign_id}", dependencies=secured, tags=["campaigns"])
    async def get_campaign(campaign_id: str) -> dict[str, Any]:
        c = await api.store.get_campaign(campaign_id)
        if c is None:
            raise NotFound(f"unknown campaign {campaign_id!r}")
        nodes, edges = await api.store.load_graph(campaign_id)
        async with api.store.session(readonly=True) as s:
            rows = await s.execute(
                select(NodeStateRow.node_id, NodeStateRow.state, func.count())
                .where(NodeStateRow.campaign_id == campaign_id)
                .group_by(NodeStateRow.node_id, NodeStateRow.state)
            )
            funnel: dict[str, dict[str, int]] = {}
            for node_id, state, n in rows:
                funnel.setdefault(node_id, {})[state] = n
        return {
            "id": c.id, "name": c.name, "userId": c.user_id, "state": c.state,
            "timezone": c.timezone, "launchedAt": c.launched_at, "stoppedAt": c.stopped_at,
            "nodes": [{"id": n.id, "kind": n.kind, "config": n.config} for n in nodes],
            "edges": [{"from": e.from_id, "to": e.to_id, "kind": e.edge_kind} for e in edges],
            "funnel": funnel,
        }  # fmt: skip

    @app.post("/api/campaigns/{campaign_id}/launch", dependencies=secured, tags=["campaigns"])
    async def launch(campaign_id: str) -> dict[str, int]:
        return {"entered": await api.engine.launch(campaign_id)}

    @app.post("/api/campaigns/{campaign_id}/stop", dependencies=secured, tags=["campaigns"])
    async def stop(campaign_id: str) -> dict[str, int]:
        return {"cancelled": await api.engine.stop(campaign_id)}

    @app.get("/api/campaigns/{campaign_id}/states", dependencies=secured, tags=["audit"])
    async def campaign_states(
        campaign_id: str,
        after: After = 0,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        rows = await api.store.list_states(
            set(NodeState), campaign_id=campaign_id, after_id=after, limit=limit
        )
        return {
            "items": [state_out(r) for r in rows],
            "next": rows[-1].id if len(rows) == limit else None,
        }

    @app.get("/api/campaigns/{campaign_id}/audit", dependencies=secured, tags=["audit"])
    async def campaign_audit(
        campaign_id: str,
        after: After = 0,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        return await _audit(NodeTransition.campaign_id == campaign_id, after, limit)

    @app.get("/api/product-users/{product_user_id}/audit", dependencies=secured, tags=["audit"])
    async def user_audit(
        product_user_id: str,
        after: After = 0,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        return await _audit(NodeTransition.product_user_id == product_user_id, after, limit)

    async def _audit(where: Any, after: int, limit: int) -> dict[str, Any]:
        async with api.store.session(readonly=True) as s:
            rows = list(
                (
                    await s.execute(
                        select(NodeTransition)
                        .where(where, NodeTransition.id > after)
                        .order_by(NodeTransition.id)
                        .limit(limit)
                    )
                ).scalars()
            )
        return {
            "items": [transition_out(t) for t in rows],
            "next": rows[-1].id if len(rows) == limit else None,
        }

    # ---- users and events -------------------------------------------------------------

    @app.put("/api/product-users/{product_user_id}", dependencies=secured, tags=["users"])
    async def upsert_user(product_user_id: str, body: ProductUserIn) -> dict[str, Any]:
        check_id_part("product user id", product_user_id)
        u = await api.engine.upsert_product_user(
            product_user_id, body.user_id, email=body.email, timezone=body.timezone,
            traits=body.traits, external_id=body.external_id,
        )  # fmt: skip
        return {
            "id": u.id,
            "userId": u.user_id,
            "email": u.email,
            "timezone": u.timezone,
            "traits": u.traits,
        }

    @app.post("/api/events", status_code=202, dependencies=secured, tags=["events"])
    async def post_event(body: EventBody) -> dict[str, int]:
        await api.engine.record_events(
            [EventIn(body.product_user_id, body.name, body.properties, body.occurred_at)]
        )
        return {"recorded": 1}

    @app.post("/api/events/batch", status_code=202, dependencies=secured, tags=["events"])
    async def post_events(body: EventBatch) -> dict[str, int]:
        await api.engine.record_events(
            [EventIn(e.product_user_id, e.name, e.properties, e.occurred_at) for e in body.events]
        )
        return {"recorded": len(body.events)}

    # ---- scheduling ---------------------------------------------------------------------

    @app.post("/api/schedule", status_code=201, dependencies=secured, tags=["scheduling"])
    async def schedule(body: ScheduleIn) -> dict[str, Any]:
        row = await api.scheduling.schedule_campaign_node(
            body.campaign_id, body.node_id, body.user_id, body.product_user_id, body.run_at
        )
        return state_out(row)

    @app.post("/api/cancel", dependencies=secured, tags=["scheduling"])
    async def cancel(body: CancelIn) -> dict[str, bool]:
        return {
            "cancelled": await api.scheduling.cancel_node(
                body.campaign_id, body.node_id, body.product_user_id
            )
        }

    # ---- failed jobs --------------------------------------------------------------------

    def queue_of(name: str) -> Any:
        if name not in ("execution", "timeout"):
            raise NotFound(f"unknown queue {name!r}: use execution or timeout")
        return api.queues.execution if name == "execution" else api.queues.timeout

    @app.get("/api/failed-jobs/{queue}", dependencies=secured, tags=["jobs"])
    async def failed_jobs(
        queue: str,
        start: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> dict[str, Any]:
        q = queue_of(queue)
        jobs = await q.getFailed(start, start + limit - 1)
        total = (await q.getJobCounts("failed"))["failed"]
        return {
            "total": total,
            "items": [
                {"id": j.id, "name": j.name, "data": j.data, "failedReason": j.failedReason,
                 "attemptsMade": j.attemptsMade, "finishedOn": j.finishedOn}
                for j in jobs
            ],
        }  # fmt: skip

    @app.post("/api/failed-jobs/{queue}/{job_id}/retry", dependencies=secured, tags=["jobs"])
    async def retry_job(queue: str, job_id: str) -> dict[str, Any]:
        return {"retried": await retry_failed_job(api, queue_of(queue), job_id)}

    @app.delete("/api/failed-jobs/{queue}/{job_id}", dependencies=secured, tags=["jobs"])
    async def remove_job(queue: str, job_id: str) -> dict[str, bool]:
        q = queue_of(queue)
        if await q.getJobState(job_id) != "failed":
            raise NotFound(f"no failed job {job_id!r} in the {queue} queue")
        return {"removed": await api.queues.remove(q, job_id)}

    return app


async def retry_failed_job(api: Api, queue: Any, job_id: str) -> bool:
    """Retry a failed job: its FAILED visit goes back to PENDING (audited), then it re-runs."""

    job = await queue.getJob(job_id)
    if job is None or await queue.getJobState(job_id) != "failed":
        raise NotFound(f"no failed job {job_id!r}")
    data = job.data if isinstance(job.data, dict) else {}

    if {"campaignId", "nodeId", "productUserId"} <= data.keys() and queue is api.queues.execution:
        row = await api.store.get_state(
            NodeKey(data["campaignId"], data["nodeId"], data["productUserId"])
        )
        if row is not None and row.state == NodeState.FAILED:
            await api.store.transition(
                row.id, {NodeState.FAILED}, NodeState.PENDING, "retry_requested",
                Actor("api", job_id), values={"completed_at": None, "run_token": None},
            )  # fmt: skip
    await job.retry("failed")
    return True


class ApiServer:
    """uvicorn inside our own event loop, stopped by our signal handling (not uvicorn's), so
    one SIGTERM stops a `run` process's worker and API together."""

    def __init__(self, settings: Settings, token: str, port: int) -> None:
        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # type: ignore[no-untyped-def]
                yield  # SIGTERM/SIGINT are ours

        config = uvicorn.Config(
            create_app(settings, token), host=settings.api_host, port=port, log_config=None,
            access_log=False, lifespan="on",
        )  # fmt: skip
        self.server = Server(config)
        self.port = port
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises the start-up error (e.g. port in use)
                raise SchedulerError("the API server stopped at start-up")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
