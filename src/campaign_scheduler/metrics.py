"""Prometheus metrics. Workers observe jobs as they finish; queue sizes and live workers are
read from Redis when Prometheus scrapes."""

from __future__ import annotations

import time

from bullmq import Job
from prometheus_client import Counter, Gauge, Histogram

JOBS_COMPLETED = Counter("campaign_jobs_completed", "Jobs completed", ["queue"])
JOBS_FAILED = Counter(
    "campaign_jobs_failed", "Job attempts that failed", ["queue", "error_type", "final"]
)
PROCESSING = Histogram(
    "campaign_job_processing_seconds",
    "Time from a job's start to its end",
    ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
LATENESS = Histogram(
    "campaign_job_lateness_seconds",
    "How late a job started after its due time",
    ["queue"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
ATTEMPTS = Histogram(
    "campaign_job_attempts", "Attempts a finished job took", ["queue"], buckets=(1, 2, 3, 5, 10)
)
HEARTBEAT = Gauge(
    "campaign_worker_heartbeat_timestamp_seconds", "When this worker last beat", ["worker"]
)


def queue_label(job: Job) -> str:
    return str(job.queueQualifiedName or "").split(":")[-1]


def observe_start(job: Job) -> None:
    due_ms = (job.timestamp or 0) + (job.delay or 0)
    if job.processedOn and due_ms:
        LATENESS.labels(queue_label(job)).observe(max(0.0, (job.processedOn - due_ms) / 1000))


def observe_finish(
    job: Job, ok: bool, err: BaseException | None = None, final: bool = True
) -> None:
    q = queue_label(job)
    if job.processedOn:
        PROCESSING.labels(q).observe(max(0.0, time.time() - job.processedOn / 1000))
    if ok:
        JOBS_COMPLETED.labels(q).inc()
        ATTEMPTS.labels(q).observe(job.attemptsMade or 1)
        observe_start(job)
    else:
        JOBS_FAILED.labels(q, type(err).__name__ if err else "Error", str(final).lower()).inc()
