"""The worker process: both queues, structured event logs, heartbeat and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any

from bullmq import Job, Worker
from redis.exceptions import RedisError

from . import metrics
from .config import Settings
from .connections import EXECUTION_LIMITER, Queues, redis_unavailable, start_worker
from .engine import CampaignEngine
from .jobs import EXECUTION_QUEUE, RECONCILE_JOB, RECONCILER_ID, TIMEOUT_QUEUE
from .logs import event
from .processors import HandlerRegistry, Processors, default_registry
from .reconciler import Reconciler
from .scheduling import SchedulingService
from .store import Actor, StateStore

log = logging.getLogger("campaign_scheduler.worker")

HEARTBEAT_EVERY_S = 5.0  # also how soon a lost reconciler entry is re-registered
HEARTBEAT_TTL_S = 15


def heartbeat_key(prefix: str, worker_name: str = "*") -> str:
    return f"{prefix}:campaign-scheduler:worker:{worker_name}"


def _job_fields(job: Job) -> dict[str, Any]:
    data = job.data if isinstance(job.data, dict) else {}
    return {
        "jobId": job.id,
        "queue": job.queueQualifiedName.split(":")[-1] if job.queueQualifiedName else None,
        "campaignId": data.get("campaignId"),
        "nodeId": data.get("nodeId"),
        "productUserId": data.get("productUserId"),
        "attempts": job.attemptsMade,
    }


def _duration_ms(job: Job) -> int | None:
    # Trap 6: finishedOn is 0 on the worker's own events, so measure up to now.
    if not job.processedOn:
        return None
    end = job.finishedOn or int(time.time() * 1000)
    return int(end - job.processedOn)


class SchedulerWorker:
    """Runs the execution and timeout workers in one process."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        queues: Queues,
        registry: HandlerRegistry | None = None,
        name: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queues = queues
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.scheduling = SchedulingService(store, queues, settings, Actor(worker=self.name))
        self.reconciler = Reconciler(
            store, self.scheduling, settings.reconcile_grace_ms, worker=self.name
        )
        self.engine = CampaignEngine(store, self.scheduling, settings)
        self.processors = Processors(
            store,
            self.scheduling,
            registry or default_registry(settings, settings.handler_modules),
            self.reconciler,
            self.name,
            self.engine,
        )
        self.workers: list[Worker] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self.heartbeat_every = HEARTBEAT_EVERY_S
        self.started_at = time.time()

    async def start(self) -> None:
        await self.queues.ping()
        await self.store.ping()
        execution = await start_worker(
            EXECUTION_QUEUE,
            self.processors.execute,
            self.settings,
            concurrency=self.settings.concurrency,
            limiter=EXECUTION_LIMITER,
            name=self.name,
        )
        timeout = await start_worker(
            TIMEOUT_QUEUE,
            self.processors.timeout,
            self.settings,
            concurrency=self.settings.concurrency,
            name=self.name,
        )
        self.workers = [execution, timeout]
        for w in self.workers:
            self._attach_events(w)
        await self.ensure_reconciler()
        await self._beat()
        self._heartbeat = asyncio.ensure_future(self._heartbeat_loop())
        event(
            log,
            logging.INFO,
            "worker_started",
            queues=[EXECUTION_QUEUE, TIMEOUT_QUEUE],
            pid=os.getpid(),
            worker=self.name,
            concurrency=self.settings.concurrency,
        )

    def _attach_events(self, worker: Worker) -> None:
        def completed(job: Job, result: Any) -> None:
            metrics.observe_finish(job, ok=True)
            fields = _job_fields(job) | {"duration": _duration_ms(job), "result": result}
            event(log, logging.INFO, "job_completed", **fields)

        def failed(job: Job, err: BaseException) -> None:
            # Trap 6: 'failed' fires on every attempt; say whether BullMQ will retry.
            final = job.attemptsMade >= int(job.opts.get("attempts", 1)) or bool(job.finishedOn)
            metrics.observe_finish(job, ok=False, err=err, final=final)
            fields = _job_fields(job) | {
                "duration": _duration_ms(job),
                "error": f"{type(err).__name__}: {err}",
                "errorType": type(err).__name__,
                "final": final,
            }
            event(log, logging.ERROR if final else logging.WARNING, "job_failed", **fields)

        def error(err: BaseException, *_: Any) -> None:
            event(log, logging.ERROR, "worker_error", error=f"{type(err).__name__}: {err}")

        def stalled(job_id: str, *_: Any) -> None:
            event(log, logging.WARNING, "job_stalled", jobId=job_id, queue=worker.name)

        worker.on("completed", completed)
        worker.on("failed", failed)
        worker.on("error", error)
        worker.on("stalled", stalled)

    async def ensure_reconciler(self) -> None:
        """Register the reconciler as a BullMQ job scheduler entry (idempotent)."""
        timeout_queue = self.queues.timeout
        if not await timeout_queue.isJobScheduler(RECONCILER_ID):
            await timeout_queue.upsertJobScheduler(
                RECONCILER_ID,
                {"every": self.settings.reconcile_every_ms},
                RECONCILE_JOB,
                {},
                {"attempts": 1, "removeOnComplete": {"count": 100}, "removeOnFail": {"count": 100}},
            )

    async def _beat(self) -> None:
        info = {
            "worker": self.name,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "startedAt": self.started_at,
            "seenAt": time.time(),
            "concurrency": self.settings.concurrency,
        }
        await self.queues.client.set(
            heartbeat_key(self.settings.queue_prefix, self.name),
            json.dumps(info),
            ex=HEARTBEAT_TTL_S,
        )

    async def _heartbeat_loop(self) -> None:
        # Also re-registers the reconciler: a Redis that lost its data (FLUSHALL, failover
        # without persistence) loses the scheduler entry too, and the reconciler is what
        # repairs such a loss.
        while True:
            await asyncio.sleep(self.heartbeat_every)
            try:
                await self._beat()
                await self.ensure_reconciler()
            except (RedisError, OSError) as exc:
                event(log, logging.ERROR, "heartbeat_failed", error=str(exc))

    async def close(self) -> None:
        """Finish in-flight jobs, take no new ones, then release connections."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await asyncio.gather(*(w.close() for w in self.workers), return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.queues.client.delete(heartbeat_key(self.settings.queue_prefix, self.name))
        event(log, logging.INFO, "worker_stopped", worker=self.name)


async def live_workers(queues: Queues) -> list[dict[str, Any]]:
    """Workers whose heartbeat is fresh."""
    prefix = queues.settings.queue_prefix
    out = []
    async for key in queues.client.scan_iter(match=heartbeat_key(prefix)):
        raw = await queues.client.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask for a graceful stop (trap 8: bullmq installs no handlers)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):

        def on_signal(sig: signal.Signals = sig) -> None:
            event(log, logging.INFO, "shutdown_requested", signal=sig.name)
            stop.set()

        loop.add_signal_handler(sig, on_signal)


async def serve(
    settings: Settings, registry: HandlerRegistry | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run a worker until SIGTERM/SIGINT (or `stop`), then shut down gracefully."""
    from .migrate import current_revision, head_revision

    url = settings.resolved_database_url()
    current = await asyncio.to_thread(current_revision, url)
    if current != head_revision():
        from .errors import ConfigError

        raise ConfigError(
            f"database schema is at {current or 'nothing'}, expected {head_revision()}: "
            "run `campaign-scheduler migrate` first"
        )
    stop = stop or asyncio.Event()
    install_stop_signals(stop)
    store = StateStore.from_url(url)
    queues = Queues.open(settings)
    worker = SchedulerWorker(settings, store, queues, registry)
    try:
        try:
            await worker.start()
        except (RedisError, OSError) as exc:
            raise redis_unavailable(settings, exc) from exc
        await stop.wait()
    finally:
        await worker.close()
        await queues.close()
        await store.close()
