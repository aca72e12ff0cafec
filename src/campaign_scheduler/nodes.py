"""The built-in node kinds: what each does when a user's visit runs.

A handler returns an `Outcome`: complete (follow Default edges), wait (a Filter with no match
yet) or timeout (a Filter with no match and no time left: follow Timeout edges). Handlers with
side effects record what they delivered with the node state and look at that record first,
so a retry after a crash does not deliver twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Literal

import httpx

from .conditions import evaluate
from .config import Settings
from .errors import NonRetryableError
from .graph import EmailConfig, FilterConfig, NodeKind, WebhookConfig
from .mailer import Mailer
from .templates import render
from .timewindows import utcnow

if TYPE_CHECKING:
    from .processors import HandlerRegistry, NodeContext


@dataclass(frozen=True)
class Outcome:
    action: Literal["complete", "wait", "timeout"] = "complete"
    timeout_at: datetime | None = None
    result: dict[str, Any] | None = None


class WebhookFailed(Exception):
    """A network error or a 5xx answer: worth retrying."""


def template_context(ctx: NodeContext) -> dict[str, Any]:
    user, campaign = ctx.product_user, ctx.campaign
    traits = dict(user.traits or {})
    return {
        "user": {"id": user.id, "email": user.email, "externalId": user.external_id, **traits},
        "traits": traits,
        "campaign": {"id": campaign.id, "name": campaign.name},
    }


async def pass_through(ctx: NodeContext) -> Outcome:
    """Trigger, Audience and Wait: the timing was decided when the user arrived."""
    return Outcome()


async def filter_node(ctx: NodeContext) -> Outcome:
    cfg = FilterConfig.model_validate(ctx.node.config)
    now = utcnow()
    events = await ctx.store.user_events(ctx.product_user.id)
    if evaluate(cfg.condition, ctx.product_user.traits or {}, events, now):
        return Outcome(result={"matched": True})
    # The deadline counts from when the user reached the filter, not from a late start.
    deadline = (ctx.state.run_at or now) + cfg.wait()
    if deadline <= now:
        return Outcome("timeout", result={"matched": False})
    return Outcome("wait", timeout_at=deadline)


class EmailNode:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mailer = Mailer(settings)

    def message_id(self, ctx: NodeContext) -> str:
        # Derived from the visit: a resend after a crash carries the same Message-ID, so the
        # receiving side can recognise it.
        visit = f"cs.{ctx.state.id}.{ctx.key.campaign_id}.{ctx.key.node_id}"
        return f"<{visit}@{self.settings.message_id_domain}>"

    async def __call__(self, ctx: NodeContext) -> Outcome:
        if ctx.state.delivered_at is not None:
            return Outcome(result={"alreadySent": (ctx.state.delivery or {}).get("messageId")})
        cfg = EmailConfig.model_validate(ctx.node.config)
        to = ctx.product_user.email
        if not to:
            raise NonRetryableError(f"product user {ctx.product_user.id!r} has no email address")
        context = template_context(ctx)
        msg = EmailMessage()
        msg["From"] = cfg.sender or self.settings.email_from
        msg["To"] = to
        msg["Subject"] = render(cfg.subject, context).replace("\n", " ")
        msg["Message-ID"] = self.message_id(ctx)
        msg["Date"] = formatdate(localtime=False)
        body = render(cfg.body, context, html=cfg.html)
        if cfg.html:
            msg.set_content(body, subtype="html")
        else:
            msg.set_content(body)
        await self.mailer.send(msg)
        delivery = {"messageId": msg["Message-ID"], "to": to, "subject": msg["Subject"]}
        await ctx.store.record_delivery(ctx.state.id, ctx.token, delivery)
        return Outcome(result=delivery)


async def webhook_node(ctx: NodeContext) -> Outcome:
    if ctx.state.delivered_at is not None:
        return Outcome(result={"alreadyDelivered": True})
    cfg = WebhookConfig.model_validate(ctx.node.config)
    payload = {
        "campaign": {"id": ctx.campaign.id, "name": ctx.campaign.name},
        "node": {"id": ctx.node.id},
        "user": template_context(ctx)["user"] | {"traits": ctx.product_user.traits or {}},
        "attempt": ctx.attempt,
        "sentAt": utcnow().isoformat(),
    }
    headers = {
        **cfg.headers,
        # The same key on every retry of this visit: the receiver can drop duplicates.
        "Idempotency-Key": ctx.job_id,
        "Content-Type": "application/json",
    }
    try:
        async with httpx.AsyncClient(timeout=cfg.timeout_seconds) as client:
            resp = await client.post(str(cfg.url), content=json.dumps(payload), headers=headers)
    except httpx.HTTPError as exc:
        raise WebhookFailed(f"{type(exc).__name__} calling {cfg.url}: {exc}") from exc
    if 400 <= resp.status_code < 500:
        raise NonRetryableError(f"{cfg.url} answered {resp.status_code}: {resp.text[:200]}")
    if resp.status_code >= 500:
        raise WebhookFailed(f"{cfg.url} answered {resp.status_code}: will retry")
    delivery = {"status": resp.status_code, "url": str(cfg.url)}
    await ctx.store.record_delivery(ctx.state.id, ctx.token, delivery)
    return Outcome(result=delivery)


def register_builtins(registry: HandlerRegistry, settings: Settings) -> None:
    for kind in (NodeKind.TRIGGER, NodeKind.AUDIENCE, NodeKind.WAIT):
        registry.register(kind.value, pass_through)
    registry.register(NodeKind.FILTER.value, filter_node)
    registry.register(NodeKind.EMAIL.value, EmailNode(settings))
    registry.register(NodeKind.WEBHOOK.value, webhook_node)
