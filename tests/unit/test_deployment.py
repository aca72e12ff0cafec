"""The Docker deployment, alert rules and dashboard are checked as files (no Docker engine
runs on this machine); metric names are checked against what the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
METRICS = {
    "campaign_queue_jobs",
    "campaign_live_workers",
    "campaign_jobs_completed_total",
    "campaign_jobs_failed_total",
    "campaign_job_processing_seconds_bucket",
    "campaign_job_lateness_seconds_bucket",
    "campaign_job_attempts_bucket",
    "campaign_worker_heartbeat_timestamp_seconds",
}


def test_exported_metric_names_match_this_list() -> None:
    from prometheus_client import generate_latest

    from campaign_scheduler import metrics

    metrics.LATENESS.labels("q")
    metrics.PROCESSING.labels("q")
    metrics.ATTEMPTS.labels("q")
    metrics.JOBS_COMPLETED.labels("q")
    metrics.JOBS_FAILED.labels("q", "E", "true")
    metrics.HEARTBEAT.labels("w")
    text = generate_latest().decode()
    exported = set(re.findall(r"^(campaign_[a-z_]+)", text, re.M))
    # The two queue gauges are collected by the API at scrape time (tests/integration/test_api.py).
    assert METRICS - {"campaign_queue_jobs", "campaign_live_workers"} <= exported


def test_compose_services_follow_the_specification() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "worker", "api", "migrate"} <= services.keys()
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert (
        "--appendonly yes" in redis["command"]
        and "--maxmemory-policy noeviction" in redis["command"]
    )
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert (
        redis["healthcheck"]["interval"],
        redis["healthcheck"]["timeout"],
        redis["healthcheck"]["retries"],
    ) == ("10s", "5s", 3)
    assert redis["deploy"]["resources"] == {
        "limits": {"memory": "1G"},
        "reservations": {"memory": "512M"},
    }
    assert "redis_data:/data" in redis["volumes"]
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "Dockerfile.worker"
    assert (
        "REDIS_HOST=redis" in worker["environment"] and "REDIS_PORT=6379" in worker["environment"]
    )
    assert any(e.startswith("DATABASE_URL=postgresql://") for e in worker["environment"])
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["deploy"]["restart_policy"] == {
        "condition": "on-failure",
        "max_attempts": 3,
        "window": "120s",
    }
    api = services["api"]
    assert any(e.startswith("API_TOKEN=") for e in api["environment"])
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert {"redis_data", "postgres_data"} <= compose["volumes"].keys()


def test_dockerfiles_start_the_right_command() -> None:
    worker = (ROOT / "Dockerfile.worker").read_text()
    assert 'CMD ["campaign-scheduler", "worker"]' in worker  # exec form: SIGTERM reaches it
    assert 'CMD ["campaign-scheduler", "api"]' in (ROOT / "Dockerfile.api").read_text()


def test_alert_rules_and_dashboard_use_real_metrics() -> None:
    rules = yaml.safe_load((ROOT / "deploy/prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {
        "CampaignBacklogGrowing",
        "CampaignJobFailureRate",
        "CampaignNoLiveWorker",
        "CampaignJobsLate",
    } <= alerts.keys()
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    exprs = [r["expr"] for r in alerts.values()] + [
        t["expr"] for p in dashboard["panels"] for t in p["targets"]
    ]
    used = {m for e in exprs for m in re.findall(r"campaign_[a-z_]+", e)}
    assert used and used <= METRICS, used - METRICS
