"""Shared fixtures: a private Redis per test session, a fresh SQLite or PostgreSQL database
per test (cloned from a migrated template), and a unique queue prefix per test, so tests
never see each other's rows or jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from aiosmtpd.controller import Controller
from sqlalchemy.engine import make_url

from campaign_scheduler.api import ApiServer
from campaign_scheduler.config import Settings, load_settings
from campaign_scheduler.connections import Queues
from campaign_scheduler.embedded import EmbeddedRedis, free_port
from campaign_scheduler.errors import NonRetryableError
from campaign_scheduler.migrate import upgrade
from campaign_scheduler.processors import HandlerRegistry, NodeContext, default_registry
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.worker import SchedulerWorker

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis.start(tmp_path_factory.mktemp("redis"), persist=False)
    yield server
    server.stop()


def _pg_admin(sql: str) -> None:
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql)  # type: ignore[arg-type]
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({exc}); scripts/test starts it, "
            "or set TEST_POSTGRES_URL"
        )


def _pg_url(name: str) -> str:
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_template(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A migrated database per backend, cloned for every test (so tests never share rows)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "template.db"
        upgrade(f"sqlite:///{path}")
        yield ("sqlite", str(path))
    else:
        name = f"cs_tpl_{uuid.uuid4().hex[:12]}"
        _pg_admin(f'CREATE DATABASE "{name}"')
        upgrade(_pg_url(name))
        yield ("postgresql", name)
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(db_template: tuple[str, str], tmp_path: Path) -> Iterator[str]:
    backend, template = db_template
    if backend == "sqlite":
        path = tmp_path / "test.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
    else:
        name = f"cs_test_{uuid.uuid4().hex[:12]}"
        _pg_admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        yield _pg_url(name)
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class Mailbox:
    """Every message the test SMTP server accepted."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content, policy=email_policy.default)
        self.messages.append(msg)  # type: ignore[arg-type]
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for m in self.messages if m["To"] == address]


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[int, Mailbox]]:
    """A real SMTP server (aiosmtpd) on a free port, in its own thread."""
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    yield port, box
    controller.stop()


@dataclass
class HttpRecord:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class HttpSink:
    """A real HTTP server. /ok -> 200, /status/NNN -> NNN, /flaky/N/... -> 500 N times, then
    200, /slow/N/... -> answers late N times, then at once."""

    def __init__(self) -> None:
        self.requests: list[HttpRecord] = []
        self.hits: dict[str, int] = {}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                sink.requests.append(HttpRecord(self.path, dict(self.headers), body))
                sink.hits[self.path] = sink.hits.get(self.path, 0) + 1
                parts = self.path.strip("/").split("/")
                status = 200
                if parts[0] == "status":
                    status = int(parts[1])
                elif parts[0] == "flaky" and sink.hits[self.path] <= int(parts[1]):
                    status = 500
                elif parts[0] == "slow" and sink.hits[self.path] <= int(parts[1]):
                    time.sleep(2.5)  # longer than the node's timeout
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on a slow answer (the timeout test): expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def at(self, path: str) -> list[HttpRecord]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture(scope="session")
def http_sink() -> Iterator[HttpSink]:
    sink = HttpSink()
    yield sink
    sink.server.shutdown()


@pytest.fixture
def mailbox(smtp_server: tuple[int, Mailbox]) -> Mailbox:
    """The session's SMTP server, emptied for this test (tests run one at a time)."""
    smtp_server[1].messages.clear()
    return smtp_server[1]


@pytest.fixture
def settings(
    redis_server: EmbeddedRedis, db_url: str, tmp_path: Path, smtp_server: tuple[int, Mailbox]
) -> Settings:
    return load_settings(
        smtp_port=smtp_server[0],
        redis_url=redis_server.url,
        database_url=db_url,
        queue_prefix=new_id("t"),
        lock_duration_ms=5000,
        stalled_interval_ms=5000,
        reconcile_every_ms=60000,
        reconcile_grace_ms=0,
        data_dir=tmp_path,
    )


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[StateStore]:
    s = StateStore.from_url(db_url)
    yield s
    await s.close()


@pytest.fixture
async def queues(settings: Settings) -> AsyncIterator[Queues]:
    q = Queues.open(settings)
    yield q
    keys = [k async for k in q.client.scan_iter(match=f"{settings.queue_prefix}:*")]
    if keys:
        await q.client.delete(*keys)
    await q.close()


@dataclass
class Calls:
    """What the `Test` handler saw, per (campaign, node, product user)."""

    started: dict[tuple[str, str, str], int]
    finished: dict[tuple[str, str, str], int]

    def count(self, key: tuple[str, str, str]) -> int:
        return self.finished.get(key, 0)


@pytest.fixture
def calls() -> Calls:
    return Calls({}, {})


@pytest.fixture
def registry(calls: Calls, settings: Settings) -> HandlerRegistry:
    """`Test` kind: config {"sleep": s, "fail_times": n, "nonretryable": bool}."""
    reg = default_registry(settings)  # the Email kind sends to this test's SMTP server

    async def test_handler(ctx: NodeContext) -> dict[str, Any]:
        key = (ctx.key.campaign_id, ctx.key.node_id, ctx.key.product_user_id)
        calls.started[key] = calls.started.get(key, 0) + 1
        cfg = ctx.node.config
        if cfg.get("sleep"):
            await asyncio.sleep(float(cfg["sleep"]))
        if cfg.get("nonretryable"):
            raise NonRetryableError("the remote side said no (4xx)")
        if ctx.attempt <= int(cfg.get("fail_times", 0)):
            raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
        calls.finished[key] = calls.finished.get(key, 0) + 1
        return {"attempt": ctx.attempt}

    reg.register("Test", test_handler)
    return reg


@pytest.fixture
async def worker(
    settings: Settings, store: StateStore, queues: Queues, registry: HandlerRegistry
) -> AsyncIterator[SchedulerWorker]:
    w = SchedulerWorker(settings, store, queues, registry, name=new_id("w"))
    await w.start()
    yield w
    await w.close()


@dataclass
class Visit:
    campaign_id: str
    node_id: str
    user_id: str
    product_user_id: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.campaign_id, self.node_id, self.product_user_id)


async def make_visit(
    store: StateStore,
    kind: str = "Test",
    config: dict[str, Any] | None = None,
    *,
    user_tz: str | None = None,
    campaign_tz: str | None = None,
    users: int = 1,
) -> list[Visit]:
    campaign_id, node_id, account = new_id("c"), new_id("n"), new_id("acct")
    await store.create_campaign(
        campaign_id, "test", account, timezone=campaign_tz, nodes=[(node_id, kind, config or {})]
    )
    visits = []
    for _ in range(users):
        pu = new_id("pu")
        await store.upsert_product_user(pu, account, email=f"{pu}@example.test", timezone=user_tz)
        visits.append(Visit(campaign_id, node_id, account, pu))
    return visits


async def has_state(store: StateStore, key: NodeKey | tuple[str, str, str], state: str) -> bool:
    """Is this visit (campaign, node, product user) in `state` right now?"""
    row = await store.get_state(key if isinstance(key, NodeKey) else NodeKey(*key))
    return row is not None and row.state == state


async def wait_for(
    check: Callable[[], Awaitable[bool]], timeout: float = 20.0, every: float = 0.05
) -> None:
    """Poll until `check` is true; fail the test after `timeout` seconds (a hang guard)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    server = ApiServer(settings.model_copy(update={"api_host": "127.0.0.1"}), TOKEN, free_port())
    await server.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", timeout=30
        ) as client:
            yield client
    finally:
        await server.stop()
