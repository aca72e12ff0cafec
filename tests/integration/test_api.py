"""The HTTP API, served by a real uvicorn on a free port, with a real worker behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from campaign_scheduler.config import Settings
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import AUTH, has_state, make_visit, serve, wait_for


@pytest.fixture
async def client(settings: Settings, worker: SchedulerWorker) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(settings) as c:
        yield c


CAMPAIGN: dict[str, Any] = {
    "id": "web",
    "name": "Web",
    "userId": "acct",
    "nodes": [
        {"id": "t", "kind": "Trigger", "config": {"event": "go"}},
        {"id": "l", "kind": "Log", "config": {"message": "hi"}},
    ],
    "edges": [{"from": "t", "to": "l"}],
}


async def test_health_is_open_and_api_needs_the_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json()["status"] == "ok"
    ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    assert (await client.get("/api/campaigns/x")).status_code == 401
    bad = await client.get("/api/campaigns/x", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "API_TOKEN" in bad.json()["detail"]
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "campaign-scheduler"


async def test_campaign_lifecycle_over_http(client: httpx.AsyncClient, store: StateStore) -> None:
    r = await client.post("/api/campaigns", json=CAMPAIGN, headers=AUTH)
    assert r.status_code == 201, r.text
    assert (await client.post("/api/campaigns/web/launch", headers=AUTH)).json() == {"entered": 0}
    assert (await client.post("/api/campaigns/web/launch", headers=AUTH)).status_code == 409
    for i in range(3):
        r = await client.put(
            f"/api/product-users/u{i}",
            json={"userId": "acct", "email": f"u{i}@x.test"},
            headers=AUTH,
        )
        assert r.status_code == 200, r.text
    assert (
        await client.post("/api/events", json={"productUserId": "u0", "name": "go"}, headers=AUTH)
    ).status_code == 202
    batch = {"events": [{"productUserId": f"u{i}", "name": "go"} for i in (1, 2)]}
    assert (await client.post("/api/events/batch", json=batch, headers=AUTH)).json() == {
        "recorded": 2
    }

    async def done() -> bool:
        c = (await client.get("/api/campaigns/web", headers=AUTH)).json()
        return bool(c["funnel"].get("l", {}).get("COMPLETED") == 3)

    await wait_for(done)
    page = (await client.get("/api/campaigns/web/states?limit=4", headers=AUTH)).json()
    assert len(page["items"]) == 4 and page["next"] is not None
    rest = (
        await client.get(f"/api/campaigns/web/states?limit=4&after={page['next']}", headers=AUTH)
    ).json()
    assert len(rest["items"]) == 2 and rest["next"] is None
    audit = (await client.get("/api/product-users/u0/audit", headers=AUTH)).json()["items"]
    assert [(a["nodeId"], a["to"]) for a in audit] == [
        ("t", "PENDING"),
        ("t", "RUNNING"),
        ("t", "COMPLETED"),
        ("l", "PENDING"),
        ("l", "RUNNING"),
        ("l", "COMPLETED"),
    ]
    trail = (await client.get("/api/campaigns/web/audit?limit=100", headers=AUTH)).json()
    assert len(trail["items"]) == 18 and trail["next"] is None  # 3 users x 2 nodes x 3 changes
    assert (await client.post("/api/campaigns/web/stop", headers=AUTH)).json() == {"cancelled": 0}


async def test_bad_input_is_a_422_naming_the_field(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/campaigns", json={**CAMPAIGN, "userId": None}, headers=AUTH)
    assert r.status_code == 422 and "userId" in r.text
    graph = {**CAMPAIGN, "edges": [{"from": "l", "to": "t"}]}
    r = await client.post("/api/campaigns", json=graph, headers=AUTH)
    assert r.status_code == 422 and "points into entry node" in r.json()["detail"]
    r = await client.put(
        "/api/product-users/p1", json={"userId": "acct", "timezone": "Mars/Base"}, headers=AUTH
    )
    assert r.status_code == 422 and "Mars/Base" in r.json()["detail"]
    r = await client.post(
        "/api/events", json={"productUserId": "ghost", "name": "go"}, headers=AUTH
    )
    assert r.status_code == 404
    naive = {
        "campaignId": "web",
        "nodeId": "l",
        "userId": "acct",
        "productUserId": "p",
        "runAt": "2030-01-01T09:00:00",
    }
    r = await client.post("/api/schedule", json=naive, headers=AUTH)
    assert r.status_code == 422 and "no time zone" in r.json()["detail"]


async def test_schedule_cancel_and_failed_job_retry(
    client: httpx.AsyncClient, store: StateStore
) -> None:
    (v,) = await make_visit(store, config={"fail_times": 3})
    body = {"campaignId": v.campaign_id, "nodeId": v.node_id, "userId": v.user_id,
            "productUserId": v.product_user_id, "runAt": utcnow().isoformat()}  # fmt: skip
    r = await client.post("/api/schedule", json=body, headers=AUTH)
    assert r.status_code == 201 and r.json()["state"] == "PENDING"
    key = NodeKey(*v.key)

    await wait_for(lambda: has_state(store, key, "FAILED"), timeout=20)
    failed = (await client.get("/api/failed-jobs/execution", headers=AUTH)).json()
    assert failed["total"] == 1 and "attempt 3" in failed["items"][0]["failedReason"]
    job_id = failed["items"][0]["id"]
    assert (
        await client.post(f"/api/failed-jobs/execution/{job_id}/retry", headers=AUTH)
    ).status_code == 200
    await wait_for(lambda: has_state(store, key, "COMPLETED"), timeout=20)  # attempt 4 succeeds
    row = await store.get_state(key)
    assert row is not None and row.attempts == 4
    assert "retry_requested" in [t.reason for t in await store.history(row.id)]
    assert (
        await client.delete(f"/api/failed-jobs/execution/{job_id}", headers=AUTH)
    ).status_code == 404  # no longer failed
    (x,) = await make_visit(store, config={"nonretryable": True})
    xbody = {**body, "campaignId": x.campaign_id, "nodeId": x.node_id, "userId": x.user_id,
             "productUserId": x.product_user_id}  # fmt: skip
    assert (await client.post("/api/schedule", json=xbody, headers=AUTH)).status_code == 201
    await wait_for(lambda: has_state(store, x.key, "FAILED"), timeout=20)

    async def listed() -> bool:
        return bool((await client.get("/api/failed-jobs/execution", headers=AUTH)).json()["total"])

    await wait_for(listed, timeout=10)
    failed_id = (await client.get("/api/failed-jobs/execution", headers=AUTH)).json()["items"][0][
        "id"
    ]
    r = await client.delete(f"/api/failed-jobs/execution/{failed_id}", headers=AUTH)
    assert r.json() == {"removed": True}
    assert (await client.get("/api/failed-jobs/execution", headers=AUTH)).json()["total"] == 0
    assert (await client.get("/api/failed-jobs/nope", headers=AUTH)).status_code == 404

    (w,) = await make_visit(store)
    later = {**body, "campaignId": w.campaign_id, "nodeId": w.node_id, "userId": w.user_id,
             "productUserId": w.product_user_id, "runAt": (utcnow() + timedelta(hours=1)).isoformat()}  # fmt: skip
    assert (await client.post("/api/schedule", json=later, headers=AUTH)).status_code == 201
    cancel = {"campaignId": w.campaign_id, "nodeId": w.node_id, "productUserId": w.product_user_id}
    assert (await client.post("/api/cancel", json=cancel, headers=AUTH)).json() == {
        "cancelled": True
    }


async def test_metrics(
    client: httpx.AsyncClient, store: StateStore, worker: SchedulerWorker
) -> None:
    (v,) = await make_visit(store)
    await worker.scheduling.schedule_campaign_node(
        *v.key[:2], v.user_id, v.product_user_id, utcnow()
    )
    await wait_for(lambda: has_state(store, v.key, "COMPLETED"))
    text = (await client.get("/metrics")).text
    assert 'campaign_queue_jobs{queue="campaign-execution",state="completed"}' in text
    assert "campaign_live_workers 1.0" in text
    assert 'campaign_jobs_completed_total{queue="campaign-execution"}' in text
    assert "campaign_job_lateness_seconds_bucket" in text
    assert "campaign_worker_heartbeat_timestamp_seconds" in text


async def test_redis_down_is_a_503_with_the_fix(settings: Settings) -> None:
    dead = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    async with serve(dead) as client:
        r = await client.get("/ready")
        assert r.status_code == 503 and "REDIS_URL" in r.json()["redis"]
        r = await client.get("/api/failed-jobs/execution", headers=AUTH)
        assert (
            r.status_code == 503
            and "Redis at redis://127.0.0.1:1/0 is unavailable" in r.json()["detail"]
        )
        assert (await client.get("/metrics")).status_code == 200


async def test_database_down_is_a_503_with_the_fix(settings: Settings) -> None:
    dead = settings.model_copy(update={"database_url": "postgresql://nobody@127.0.0.1:1/nothing"})
    async with serve(dead) as client:
        r = await client.get("/api/campaigns/web", headers=AUTH)
        assert r.status_code == 503 and "DATABASE_URL" in r.json()["detail"]
        assert "Traceback" not in r.text
        r = await client.post(
            "/api/events", json={"productUserId": "u", "name": "go"}, headers=AUTH
        )
        assert r.status_code == 503
        ready = await client.get("/ready")
        assert ready.status_code == 503 and "DATABASE_URL" in ready.json()["database"]
