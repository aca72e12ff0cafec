"""Real worker processes and the command line, as an operator runs them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from campaign_scheduler.config import Settings
from campaign_scheduler.connections import Queues
from campaign_scheduler.scheduling import SchedulingService
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import utcnow
from tests.conftest import has_state, make_visit, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("REDIS_", "DATABASE_URL", "SCHEDULER_"))
    }
    env["PYTHONPATH"] = str(ROOT)
    if settings is not None:
        env |= {
            "REDIS_URL": settings.redis_url or "",
            "DATABASE_URL": settings.database_url or "",
            "SCHEDULER_QUEUE_PREFIX": settings.queue_prefix,
            "SCHEDULER_HANDLER_MODULES": "tests.process_handlers",
            "SCHEDULER_LOCK_DURATION_MS": "5000",
            "SCHEDULER_STALLED_INTERVAL_MS": "5000",
        }
    return env | extra


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "campaign_scheduler.cli", *args]


@pytest.fixture
def spawn(settings: Settings, tmp_path: Path) -> Iterator[object]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")
        p = subprocess.Popen(
            _cli("worker"), env=_env(settings), stdout=log, stderr=subprocess.STDOUT
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


async def _running(store: StateStore, key: NodeKey) -> bool:
    row = await store.get_state(key)
    return row is not None and row.state == "RUNNING"


async def test_sigterm_finishes_in_flight_takes_nothing_new_and_exits_0(
    settings: Settings, store: StateStore, queues: Queues, spawn: object, tmp_path: Path
) -> None:
    marker = tmp_path / "done.txt"
    visits = await make_visit(
        store, kind="Slow", config={"sleep": 3, "marker": str(marker)}, users=2
    )
    svc = SchedulingService(store, queues, settings)
    first, second = visits
    proc = spawn("w1")  # type: ignore[operator]
    await svc.schedule_campaign_node(*first.key[:2], first.user_id, first.product_user_id, utcnow())
    k1 = NodeKey(*first.key)
    await wait_for(lambda: _running(store, k1), timeout=30)
    proc.send_signal(signal.SIGTERM)
    await svc.schedule_campaign_node(
        *second.key[:2], second.user_id, second.product_user_id, utcnow() + timedelta(seconds=0.5)
    )
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert proc.returncode == 0, (tmp_path / "w1.log").read_text()
    assert await has_state(store, k1, "COMPLETED")  # in-flight job finished
    assert await has_state(store, NodeKey(*second.key), "PENDING")  # nothing new taken
    assert marker.read_text().count("\n") == 1
    log = (tmp_path / "w1.log").read_text()
    assert '"shutdown_requested"' in log and '"worker_stopped"' in log


async def test_a_standalone_worker_serves_its_job_metrics(
    settings: Settings, store: StateStore, queues: Queues, tmp_path: Path
) -> None:
    from campaign_scheduler.embedded import free_port

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *_cli("worker"),
        env=_env(settings, SCHEDULER_METRICS_PORT=str(port)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        (v,) = await make_visit(store, kind="Log")
        await SchedulingService(store, queues, settings).schedule_campaign_node(
            *v.key[:2], v.user_id, v.product_user_id, utcnow()
        )
        await wait_for(lambda: has_state(store, NodeKey(*v.key), "COMPLETED"), timeout=30)
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'campaign_jobs_completed_total{queue="campaign-execution"} 1.0' in text
        assert 'campaign_job_lateness_seconds_count{queue="campaign-execution"} 1.0' in text
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)


async def test_kill_9_mid_job_second_worker_completes_once(
    settings: Settings, store: StateStore, queues: Queues, spawn: object, tmp_path: Path
) -> None:
    marker = tmp_path / "done.txt"
    (v,) = await make_visit(store, kind="Slow", config={"sleep": 4, "marker": str(marker)})
    svc = SchedulingService(store, queues, settings)
    a = spawn("a")  # type: ignore[operator]
    await svc.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, utcnow())
    key = NodeKey(*v.key)
    await wait_for(lambda: _running(store, key), timeout=30)
    a.kill()  # SIGKILL: no chance to clean up
    a.wait()
    killed_at = time.monotonic()
    spawn("b")  # type: ignore[operator]
    await wait_for(lambda: has_state(store, key, "COMPLETED"), timeout=40)
    picked_up = time.monotonic() - killed_at
    row = await store.get_state(key)
    assert row is not None
    trail = [(t.reason, t.worker) for t in await store.history(row.id)]
    reasons = [r for r, _ in trail]
    assert reasons == ["scheduled", "started", "taken_over", "completed"], trail
    assert trail[1][1] != trail[2][1]  # a different worker took it over
    assert marker.read_text().count("\n") == 1  # the killed run never finished
    # Locks and stall checks of 5 s: about 10 s to notice, plus the 4 s job.
    assert picked_up < 25


def test_cli_run_on_embedded_defaults(tmp_path: Path) -> None:
    proc = subprocess.run(
        _cli("run", "--demo", "--users", "2", "--exit-when-done"),
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "private, started by this command" in out
    assert str(tmp_path / "campaign-data") in out
    assert out.count("RUNNING -> COMPLETED") == 2
    assert "stopped cleanly." in out
    assert (tmp_path / "campaign-data" / "campaign-scheduler.db").exists()
    assert (tmp_path / "campaign-data" / "redis" / "appendonlydir").exists()


def test_cli_run_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        _cli("run"),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Press Ctrl-C" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped cleanly." in out
    # The private Redis it started went away with it.
    match = re.search(r"redis://127.0.0.1:(\d+)/0 \(private", "".join(lines))
    assert match is not None, lines
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(match.group(1))), 1):
        pass


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"REDIS_PORT": "abc"}, "REDIS_PORT='abc' is invalid"),
        ({"SCHEDULER_DEFAULT_TIMEZONE": "Nowhere/City"}, "IANA"),
        ({"SCHEDULER_HANDLER_MODULES": "no.such.module"}, "cannot be imported"),
    ],
)
def test_cli_bad_settings_one_line_error(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    proc = subprocess.run(
        _cli("migrate") if "HANDLER" not in next(iter(env)) else _cli("reconcile"),
        cwd=tmp_path,
        env=_env(**env, REDIS_URL="redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_worker_refuses_an_unmigrated_database(tmp_path: Path) -> None:
    proc = subprocess.run(
        _cli("worker"),
        cwd=tmp_path,
        env=_env(DATABASE_URL=f"sqlite:///{tmp_path}/empty.db", REDIS_URL="redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "campaign-scheduler migrate" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_command_flows_users_to_email(tmp_path: Path) -> None:
    proc = subprocess.run(
        _cli("demo", "--users", "40", "--duration", "30"),
        cwd=tmp_path,
        env=_env(API_PORT="0"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "creating users" in out and "40/40" in out  # the progress bar
    assert "open http://127.0.0.1:" in out and "token:" in out
    sent = [int(m) for m in re.findall(r"emails sent +(\d+)", out)]
    assert sent and sent[-1] > 0, out[-2000:]
    assert "stopped cleanly." in out


def test_every_command_has_help() -> None:
    from campaign_scheduler.cli import COMMANDS

    for command in COMMANDS:
        proc = subprocess.run(
            _cli(command, "--help"), env=_env(), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0 and "usage: campaign-scheduler" in proc.stdout, command


async def test_status_and_retry_failed_commands(
    settings: Settings, store: StateStore, queues: Queues, spawn: object, tmp_path: Path
) -> None:
    marker = tmp_path / "done.txt"
    (v,) = await make_visit(store, kind="Slow", config={"sleep": 0, "marker": str(marker)})
    (bad,) = await make_visit(store, kind="Nope")  # no handler: FAILED at once
    spawn("w")  # type: ignore[operator]
    svc = SchedulingService(store, queues, settings)
    await svc.schedule_campaign_node(*v.key[:2], v.user_id, v.product_user_id, utcnow())
    await svc.schedule_campaign_node(*bad.key[:2], bad.user_id, bad.product_user_id, utcnow())
    await wait_for(lambda: has_state(store, NodeKey(*v.key), "COMPLETED"), timeout=30)
    await wait_for(lambda: has_state(store, NodeKey(*bad.key), "FAILED"), timeout=30)
    await asyncio.sleep(1)  # the failed job reaches Redis' failed set
    status = await asyncio.create_subprocess_exec(
        *_cli("status"),
        env=_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await status.communicate()
    text = out.decode()
    assert status.returncode == 0, err.decode()
    assert re.search(r"campaign-execution\s+\d+\s+\d+\s+\d+\s+1\s+1", text), (
        text
    )  # completed 1, failed 1
    assert "live workers: 1" in text and "COMPLETED 1" in text and "FAILED 1" in text
    retry = await asyncio.create_subprocess_exec(
        *_cli("retry-failed"),
        env=_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await retry.communicate()
    assert retry.returncode == 0 and "1 failed job(s) retried" in out.decode(), err.decode()
    row = await store.get_state(NodeKey(*bad.key))
    assert row is not None
    assert "retry_requested" in [t.reason for t in await store.history(row.id)]
