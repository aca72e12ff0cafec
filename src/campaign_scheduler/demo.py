"""`campaign-scheduler demo`: an example campaign, a few thousand generated users, a local
SMTP sink and a flaky web hook, so a newcomer can watch jobs flow on the dashboard."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from .embedded import free_port
from .engine import CampaignEngine, EventIn
from .graph import EdgeSpec, NodeSpec
from .timewindows import utcnow

ZONES = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney", "Europe/London"]
NAMES = ["Ana", "Ben", "Chloé", "Dmitri", "Eva", "Farid", "Grace", "Hiro", "Inès", "Jon"]


@dataclass
class SmtpSink:
    """Counts what the demo's emails would have delivered."""

    received: int = 0
    port: int = field(default_factory=free_port)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 OK"

    def start(self) -> Controller:
        controller = Controller(self, hostname="127.0.0.1", port=self.port)
        controller.start()
        return controller


class FlakyHook:
    """A web hook that fails the first three calls for about 1 user in 20: their webhook
    nodes end FAILED, ready to be retried from the dashboard (the fourth call succeeds)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = self.headers.get("Idempotency-Key", "")
                hook.calls[key] = hook.calls.get(key, 0) + 1
                flaky = zlib.crc32(key.encode()) % 20 == 0 and hook.calls[key] <= 3
                self.send_response(503 if flaky else 200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/crm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def progress(label: str, done: int, total: int) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    end = "\n" if done >= total else ""
    sys.stdout.write(f"\r{label:<22} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    sys.stdout.flush()


async def seed(engine: CampaignEngine, users: int, hook_url: str) -> tuple[str, asyncio.Task[None]]:
    stamp = utcnow().strftime("%H%M%S")
    campaign_id = f"demo-onboarding-{stamp}"
    welcome = {
        "subject": "Welcome aboard, {{ user.first_name }}!",
        "body": "Hi {{ user.first_name }}, thanks for activating {{ campaign.name }}.",
    }
    nudge = {
        "subject": "Need a hand, {{ user.first_name }}?",
        "body": "Hi {{ user.first_name }}, reply to this email and we will help you start.",
    }
    nodes = [
        NodeSpec("signup", "Trigger", {"event": "signed_up"}),
        NodeSpec("pause", "Wait", {"seconds": 5}),
        NodeSpec("activated", "Filter",
                 {"condition": {"event": "activated"}, "waitValue": 20, "waitUnit": "seconds"}),
        NodeSpec("welcome", "Email", welcome),
        NodeSpec("crm", "Webhook", {"url": hook_url, "timeoutSeconds": 5}),
        NodeSpec("nudge", "Email", nudge),
    ]  # fmt: skip
    edges = [EdgeSpec("signup", "pause"), EdgeSpec("pause", "activated"),
             EdgeSpec("activated", "welcome"), EdgeSpec("welcome", "crm"),
             EdgeSpec("activated", "nudge", "Timeout")]  # fmt: skip
    await engine.create_campaign(campaign_id, "Demo onboarding", "demo-account", nodes, edges)
    await engine.launch(campaign_id)
    rng = random.Random(7)
    ids = [f"demo-{stamp}-{i:05d}" for i in range(users)]
    for n, uid in enumerate(ids, 1):
        await engine.store.upsert_product_user(
            uid, "demo-account", email=f"{uid}@example.test", timezone=rng.choice(ZONES),
            traits={"first_name": rng.choice(NAMES), "plan": rng.choice(["free", "pro"])},
        )  # fmt: skip
        if n % 100 == 0 or n == users:
            progress("creating users", n, users)
    for start in range(0, users, 250):
        await engine.record_events([EventIn(u, "signed_up") for u in ids[start : start + 250]])
        progress("users signing up", min(start + 250, users), users)
    # About 60% activate over the next half minute: some before their filter's deadline,
    # some too late; the rest never do.
    activating = rng.sample(ids, int(users * 0.6))

    async def activate() -> None:
        for i in range(0, len(activating), 50):
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            await engine.record_events([EventIn(u, "activated") for u in activating[i : i + 50]])

    return campaign_id, asyncio.ensure_future(activate())
