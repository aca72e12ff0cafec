"""Redis connections, BullMQ queues and workers: the one place that knows bullmq's quirks.

Each fix below refers to a numbered trap in BULLMQ-PYTHON-NOTES.md and has a test in
tests/integration/test_bullmq_traps.py that fails without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from bullmq import Queue, Worker
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .config import Settings
from .errors import BackendUnavailable
from .jobs import EXECUTION_QUEUE, TIMEOUT_QUEUE, check_job_id
from .logs import event

log = logging.getLogger(__name__)

# The specification's limiter for the execution queue: at most 1000 jobs per 1000 ms.
EXECUTION_LIMITER = {"max": 1000, "duration": 1000}
# The specification's defaults: 3 attempts, exponential backoff from 1 s.
ATTEMPTS = 3
BACKOFF = {"type": "exponential", "delay": 1000}


def redis_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for redis-py, from REDIS_URL or REDIS_HOST/PORT/PASSWORD/DB."""
    if settings.redis_url:
        opts: dict[str, Any] = dict(parse_url(settings.redis_url))
        cls = opts.pop("connection_class", None)
        if cls is SSLConnection:
            opts["ssl"] = True
        elif cls is UnixDomainSocketConnection:
            opts["unix_socket_path"] = opts.pop("path")
    else:
        opts = {
            "host": settings.redis_host or "127.0.0.1",
            "port": settings.redis_port,
            "db": settings.redis_db,
            "password": settings.redis_password,
        }
    # Trap 1: redis-py 8 defaults socket_timeout to 5 s, shorter than bullmq's 10 s blocking
    # reads; the timeout then kills the wait and an idle worker starts jobs minutes late.
    opts["socket_timeout"] = None
    opts["socket_connect_timeout"] = 5
    opts["socket_keepalive"] = True
    return opts


def describe_redis(settings: Settings) -> str:
    opts = redis_options(settings)
    if "unix_socket_path" in opts:
        return f"unix://{opts['unix_socket_path']}"
    scheme = "rediss" if opts.get("ssl") else "redis"
    return f"{scheme}://{opts.get('host')}:{opts.get('port')}/{opts.get('db', 0)}"


def redis_client(settings: Settings) -> Redis:
    """A client for producers and bookkeeping: a few quick retries, then a clear error.

    bullmq's own connections retry 20 times with back-off up to 20 s, right for a worker
    riding out a Redis restart, but it makes a producer hang for minutes when Redis is down.
    """
    return Redis(
        decode_responses=True,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.1), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, BusyLoadingError],
        **redis_options(settings),
    )


def redis_unavailable(settings: Settings, exc: BaseException) -> BackendUnavailable:
    return BackendUnavailable(
        f"Redis at {describe_redis(settings)} is unavailable ({exc}); start it or correct "
        "REDIS_URL / REDIS_HOST / REDIS_PORT - the node state is saved, and the reconciler "
        "enqueues its job once Redis is back"
    )


def job_options(settings: Settings) -> dict[str, Any]:
    """Default job options. Finished jobs are trimmed by age: the audit trail is in the DB."""
    return {
        "attempts": ATTEMPTS,
        "backoff": dict(BACKOFF),
        "removeOnComplete": {"age": settings.keep_completed_s},
        "removeOnFail": {"age": settings.keep_failed_s},
    }


def queue_options(settings: Settings) -> dict[str, Any]:
    return {
        "connection": redis_client(settings),
        "prefix": settings.queue_prefix,
        "defaultJobOptions": job_options(settings),
    }


class Enqueued(StrEnum):
    ADDED = "added"
    REPLACED = "replaced"  # an older job with this id was removed first
    UNCHANGED = "unchanged"  # the same job is already waiting
    ACTIVE = "active"  # a worker holds it right now; left alone


_LIVE = ("delayed", "waiting", "prioritized", "waiting-children", "wait")


@dataclass
class Queues:
    """The two queues of the specification plus a plain client for bookkeeping."""

    settings: Settings
    execution: Queue
    timeout: Queue
    client: Redis

    @classmethod
    def open(cls, settings: Settings) -> Queues:
        opts = queue_options(settings)
        return cls(
            settings,
            Queue(EXECUTION_QUEUE, opts),
            Queue(TIMEOUT_QUEUE, opts),
            redis_client(settings),
        )

    async def close(self) -> None:
        for closer in (self.execution.close, self.timeout.close, self.client.aclose):
            with contextlib.suppress(Exception):
                await closer()

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            raise redis_unavailable(self.settings, exc) from exc

    async def add_unique(
        self,
        queue: Queue,
        name: str,
        data: dict[str, Any],
        job_id: str,
        run_at_ms: int,
        same: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Enqueued:
        """Add a job under a deterministic id, knowing what really happened.

        Trap 5: a duplicate `add` is silently ignored by Redis yet returns a Job with the new
        data, so we look first. A finished job under the id (kept for inspection) would swallow
        the add, so it is removed; a waiting one with other data (a reschedule) is replaced.
        """
        check_job_id(job_id)
        try:
            outcome = Enqueued.ADDED
            existing = await queue.getJob(job_id)
            if existing is not None:
                state = await queue.getJobState(job_id)
                if state == "active":
                    return Enqueued.ACTIVE
                if state in _LIVE and (same is None or same(existing.data or {})):
                    return Enqueued.UNCHANGED
                if not await queue.remove(job_id):
                    return Enqueued.ACTIVE  # locked by a worker between our two reads
                outcome = Enqueued.REPLACED
            delay = max(0, run_at_ms - int(time.time() * 1000))
            await queue.add(name, data, {"jobId": job_id, "delay": delay})
            return outcome
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise redis_unavailable(self.settings, exc) from exc

    async def remove(self, queue: Queue, job_id: str) -> bool:
        """Remove a waiting/delayed job; False if absent or held by a worker."""
        try:
            return bool(await queue.remove(job_id))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise redis_unavailable(self.settings, exc) from exc
        except RedisError:
            return False  # bullmq reports a locked job as a script error

    async def job_state(self, queue: Queue, job_id: str) -> str:
        """BullMQ's state name, or 'unknown' when no job has this id."""
        return str(await queue.getJobState(job_id))


Processor = Callable[..., Awaitable[Any]]


async def start_worker(
    queue_name: str,
    processor: Processor,
    settings: Settings,
    *,
    concurrency: int,
    limiter: dict[str, int] | None = None,
    name: str | None = None,
) -> Worker:
    """A running bullmq Worker with every fix applied."""
    opts: dict[str, Any] = {
        "connection": redis_options(settings),
        "prefix": settings.queue_prefix,
        "autorun": False,
        "concurrency": concurrency,
        # Trap 3: once the limiter trips, the worker idles for drainDelay (5 s by default)
        # instead of the limiter's reset time; 1 s keeps throughput near the limit.
        "drainDelay": 1,
        # Trap 9: 5 s locks and stall checks recover a killed worker's job in about 10 s.
        "lockDuration": settings.lock_duration_ms,
        "stalledInterval": settings.stalled_interval_ms,
        "maxStalledCount": 1,
        "name": name or f"{socket.gethostname()}-{os.getpid()}",
    }
    if limiter:
        opts["limiter"] = limiter
    worker = Worker(queue_name, processor, opts)
    try:
        # Trap 2: without knowing the server version the worker rounds every blocking wait
        # up to whole seconds, so delayed jobs start up to 1 s late. Asking first fixes that.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await worker.blockingRedisConnection.getRedisVersion()
            await worker.redisConnection.getRedisVersion()
        for w in caught:  # e.g. an eviction policy other than noeviction: say it in our logs
            event(log, logging.WARNING, "redis_warning", message=str(w.message))
    except (RedisError, OSError) as exc:
        await worker.close()
        raise redis_unavailable(settings, exc) from exc
    worker.run_task = asyncio.ensure_future(worker.run())
    return worker
