"""Node handlers loaded by worker processes in the acceptance tests
(SCHEDULER_HANDLER_MODULES=tests.process_handlers)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from campaign_scheduler.processors import HandlerRegistry, NodeContext


async def slow(ctx: NodeContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.node.config.get("sleep", 1)))
    # One line per finished run, so a test can count real completions across processes.
    line = f"{ctx.key.product_user_id} attempt={ctx.attempt} pid={os.getpid()}\n"
    await asyncio.to_thread(_append, ctx.node.config["marker"], line)
    return {"pid": os.getpid()}


def _append(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


def register(registry: HandlerRegistry) -> None:
    registry.register("Slow", slow)
