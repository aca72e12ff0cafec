"""`campaign-scheduler`: run everything on embedded defaults, or one part at a time."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__, logs
from .config import Settings, load_settings
from .connections import Queues, describe_redis
from .db import NodeTransition, describe_url
from .embedded import EmbeddedRedis
from .errors import SchedulerError
from .processors import default_registry
from .store import StateStore
from .timewindows import ensure_utc, utcnow

if TYPE_CHECKING:  # the worker module is imported lazily: `--help` stays fast
    from .worker import SchedulerWorker


def _say(msg: str) -> None:
    print(msg, flush=True)


def _fmt(t: NodeTransition) -> str:
    src = t.from_state or "-"
    err = f"  [{t.error_type}: {t.error_message}]" if t.error_type else ""
    return (
        f"{t.at:%H:%M:%S.%f}"[:-3]
        + f"  {t.campaign_id}/{t.node_id}/{t.product_user_id}  {src} -> {t.to_state}"
        + f"  ({t.reason}, attempt {t.attempt}){err}"
    )


# ---- run: everything on embedded defaults --------------------------------------------------


async def _seed_demo(
    worker: SchedulerWorker, store: StateStore, users: int
) -> list[tuple[str, datetime]]:
    stamp = utcnow().strftime("%Y%m%d%H%M%S")
    campaign_id = f"demo-{stamp}"
    await store.create_campaign(
        campaign_id,
        "Demo campaign",
        "demo-account",
        timezone="Europe/Paris",
        nodes=[(f"{campaign_id}-hello", "Log", {"message": "Hello from the demo campaign"})],
    )
    zones = ["Europe/Paris", "America/New_York", "Asia/Tokyo", "Australia/Sydney"]
    due = []
    for i in range(users):
        pu = f"demo-user-{i + 1}"
        await store.upsert_product_user(
            pu, "demo-account", email=f"{pu}@example.test", timezone=zones[i % len(zones)]
        )
        run_at = utcnow() + timedelta(seconds=3 * (i + 1))
        await worker.scheduling.schedule_campaign_node(
            campaign_id, f"{campaign_id}-hello", "demo-account", pu, run_at
        )
        due.append((pu, run_at))
    return due


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from .migrate import upgrade
    from .worker import SchedulerWorker, install_stop_signals

    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    log_file = data_dir / "logs" / "worker.log"
    logs.setup(settings.log_level, log_file)
    embedded = None
    if not settings.redis_configured:
        _say(f"starting a private Redis (data in {data_dir / 'redis'}) ...")
        embedded = EmbeddedRedis.start(data_dir / "redis")
        settings = settings.model_copy(update={"redis_url": embedded.url})
    sinks: list[object] = []
    smtp = hook = None
    if args.command == "demo":
        from .demo import FlakyHook, SmtpSink

        smtp, hook = SmtpSink(), FlakyHook()
        sinks = [smtp.start()]
        settings = settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": smtp.port})
    db_url = settings.resolved_database_url()
    try:
        _say(f"migrating the database {describe_url(db_url)} ...")
        await asyncio.to_thread(upgrade, db_url)
        stop = asyncio.Event()
        install_stop_signals(stop)
        store, queues = StateStore.from_url(db_url), Queues.open(settings)
        worker = SchedulerWorker(settings, store, queues)
        await worker.start()
        import secrets

        token = settings.api_token or secrets.token_urlsafe(24)
        port = _api_port(settings)
        from .api import ApiServer

        api = ApiServer(settings, token, port)
        await api.start()
        note = "" if settings.api_token else "  (generated; set API_TOKEN to keep one)"
        _say(
            "\ncampaign-scheduler is running\n"
            f"  api:      http://{settings.api_host}:{port}  (OpenAPI: /docs, metrics: /metrics)\n"
            f"  token:    {token}{note}\n"
            f"  redis:    {describe_redis(settings)}"
            f"{' (private, started by this command)' if embedded else ''}\n"
            f"  database: {describe_url(db_url)}\n"
            f"  logs:     {log_file}\n"
            f"  queues:   {settings.queue_prefix}:campaign-execution, "
            f"{settings.queue_prefix}:campaign-timeout\n"
            "Press Ctrl-C to stop.\n"
        )
        pending: set[str] = set()
        activating = None
        if smtp is not None and hook is not None:
            from .demo import seed

            _say(f"demo: SMTP sink on 127.0.0.1:{smtp.port}, web hook at {hook.url}")
            campaign_id, activating = await seed(worker.engine, args.users, hook.url)
            _say(
                f"demo campaign {campaign_id} is running: open http://{settings.api_host}:{port}/ "
                "and paste the token; some web hook calls fail on purpose - retry them there.\n"
            )
        if getattr(args, "demo", False):
            due = await _seed_demo(worker, store, args.users)
            for pu, at in due:
                _say(f"scheduled demo node for {pu} at {at:%H:%M:%S.%f}"[:-3] + " UTC")
                pending.add(pu)
            _say("\naudit trail (live):")
        last = max((t.id for t in await store.transitions_since(0, 100000)), default=0)
        if getattr(args, "demo", False):
            last = 0
        started = asyncio.get_running_loop().time()
        next_summary = started
        try:
            while not stop.is_set():
                now = asyncio.get_running_loop().time()
                if smtp is not None:
                    if now >= next_summary:  # thousands of users: a summary, not every line
                        counts = await queues.execution.getJobCounts(
                            "waiting", "delayed", "active", "completed", "failed"
                        )
                        _say(
                            f"{utcnow():%H:%M:%S}  emails sent {smtp.received:>5}  "
                            + "  ".join(f"{k} {v}" for k, v in counts.items())
                        )
                        next_summary = now + 2
                    if args.duration and now - started >= args.duration:
                        _say(f"--duration {args.duration:g} s reached; stopping.")
                        break
                else:
                    for t in await store.transitions_since(last):
                        last = t.id
                        _say(_fmt(t))
                        if t.to_state in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"):
                            pending.discard(t.product_user_id)
                    if args.exit_when_done and args.demo and not pending:
                        _say("all demo nodes finished; stopping.")
                        break
                try:
                    await asyncio.wait_for(stop.wait(), 0.25)
                except TimeoutError:
                    pass
        finally:
            _say("stopping: finishing in-flight jobs ...")
            if activating is not None:
                activating.cancel()
            await api.stop()
            await worker.close()
            await queues.close()
            await store.close()
    finally:
        for sink in sinks:
            sink.stop()  # type: ignore[attr-defined]
        if embedded:
            embedded.stop()
    _say("stopped cleanly.")
    return 0


# ---- the HTTP API ------------------------------------------------------------------------


def _api_port(settings: Settings) -> int:
    import socket

    from .embedded import free_port

    if settings.api_port == 0:
        return free_port()
    with socket.socket() as s:
        try:
            s.bind((settings.api_host, settings.api_port))
            return settings.api_port
        except OSError:
            port = free_port()
            _say(f"port {settings.api_port} is taken; the API uses {port} (set API_PORT to choose)")
            return port


async def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    import secrets

    from .worker import install_stop_signals

    logs.setup(settings.log_level)
    token = settings.api_token
    if not token:
        token = secrets.token_urlsafe(24)
        _say(f"API_TOKEN is not set: this run uses the generated token {token}")
    stop = asyncio.Event()
    install_stop_signals(stop)
    from .api import ApiServer

    server = ApiServer(settings, token, settings.api_port)
    await server.start()
    _say(f"API on http://{settings.api_host}:{settings.api_port} (OpenAPI at /docs)")
    await stop.wait()
    await server.stop()
    return 0


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import func, select

    from .api import QUEUE_STATES
    from .db import NodeStateRow
    from .worker import live_workers

    store, queues = StateStore.from_url(settings.resolved_database_url()), Queues.open(settings)
    try:
        await queues.ping()
        _say(f"{'queue':<22}" + "".join(f"{s:>12}" for s in QUEUE_STATES))
        for q in (queues.execution, queues.timeout):
            counts = await q.getJobCounts(*QUEUE_STATES)
            _say(f"{q.name:<22}" + "".join(f"{counts.get(s, 0):>12}" for s in QUEUE_STATES))
        workers = await live_workers(queues)
        _say(f"\nlive workers: {len(workers)}")
        for w in workers:
            _say(f"  {w['worker']}  pid {w['pid']}  concurrency {w['concurrency']}")
        async with store.session(readonly=True) as s:
            rows = await s.execute(
                select(NodeStateRow.state, func.count()).group_by(NodeStateRow.state)
            )
            _say("\nnode visits: " + ", ".join(f"{st} {n}" for st, n in rows))
    finally:
        await queues.close()
        await store.close()
    return 0


async def cmd_retry_failed(settings: Settings, args: argparse.Namespace) -> int:
    from .api import Api, retry_failed_job

    api = Api(settings, "cli")
    try:
        await api.queues.ping()
        queue = api.queues.execution if args.queue == "execution" else api.queues.timeout
        jobs = await queue.getFailed(0, args.limit - 1)
        for job in jobs:
            await retry_failed_job(api, queue, str(job.id))
            _say(f"retried {job.id}")
        _say(f"{len(jobs)} failed job(s) retried")
    finally:
        await api.close()
    return 0


# ---- the parts -----------------------------------------------------------------------------


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from .worker import serve

    logs.setup(settings.log_level)
    if settings.metrics_port:
        from prometheus_client import start_http_server

        # Job histograms and counters live in the process that runs the jobs.
        start_http_server(settings.metrics_port, addr=settings.api_host)
        _say(f"worker metrics on http://{settings.api_host}:{settings.metrics_port}/metrics")
    await serve(settings)
    return 0


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from .migrate import upgrade

    url = settings.resolved_database_url()
    await asyncio.to_thread(upgrade, url)
    _say(f"database {describe_url(url)} is at the newest schema")
    return 0


async def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from .worker import SchedulerWorker

    store, queues = StateStore.from_url(settings.resolved_database_url()), Queues.open(settings)
    try:
        await queues.ping()
        report = await SchedulerWorker(settings, store, queues).reconciler.run_once()
        _say(" ".join(f"{k}={v}" for k, v in report.as_dict().items()))
    finally:
        await queues.close()
        await store.close()
    return 0


async def cmd_schedule(settings: Settings, args: argparse.Namespace) -> int:
    from .scheduling import SchedulingService

    if args.at:
        try:
            run_at = ensure_utc(datetime.fromisoformat(args.at), "--at")
        except ValueError:
            raise SchedulerError(
                f"--at {args.at!r} is not an ISO time: write e.g. 2026-12-01T09:00:00+01:00"
            ) from None
    else:
        run_at = utcnow() + timedelta(seconds=args.in_seconds)
    store, queues = StateStore.from_url(settings.resolved_database_url()), Queues.open(settings)
    try:
        row = await SchedulingService(store, queues, settings).schedule_campaign_node(
            args.campaign, args.node, args.user, args.product_user, run_at
        )
        _say(f"scheduled {row.job_id} at {row.run_at:%Y-%m-%d %H:%M:%S} UTC (state {row.state})")
    finally:
        await queues.close()
        await store.close()
    return 0


async def cmd_history(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    store = StateStore.from_url(settings.resolved_database_url())
    try:
        async with store.session() as s:
            stmt = select(NodeTransition).where(NodeTransition.campaign_id == args.campaign)
            if args.product_user:
                stmt = stmt.where(NodeTransition.product_user_id == args.product_user)
            rows = (await s.execute(stmt.order_by(NodeTransition.id).limit(args.limit))).scalars()
            for t in rows:
                _say(_fmt(t))
    finally:
        await store.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="campaign-scheduler",
        description="Durable campaign-node scheduler on Redis-backed BullMQ queues. "
        "Settings come from the environment (see README: Configuration).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="everything on embedded defaults: private Redis, SQLite, migrations, worker",
        description="Start a private Redis (unless REDIS_URL/REDIS_HOST is set), use a SQLite "
        "file (unless DATABASE_URL is set), migrate, and run the worker until Ctrl-C.",
    )
    run.add_argument(
        "--demo", action="store_true", help="schedule a demo campaign a few seconds ahead"
    )
    run.add_argument("--users", type=int, default=3, help="demo product users (default 3)")
    run.add_argument(
        "--exit-when-done", action="store_true", help="with --demo: stop once the demo finished"
    )
    demo = sub.add_parser(
        "demo",
        help="run with an example campaign, thousands of users, an SMTP sink and a flaky hook",
        description="Everything `run` does, plus an example onboarding campaign for generated "
        "users (with a progress bar), email to a local SMTP sink and a web hook that fails for "
        "some users so you can retry them from the dashboard.",
    )
    demo.add_argument("--users", type=int, default=1000, help="generated users (default 1000)")
    demo.add_argument("--duration", type=float, default=0, help="stop after this many seconds")
    sub.add_parser("worker", help="process both queues until SIGTERM/SIGINT")
    sub.add_parser("api", help="serve the HTTP API (API_HOST, API_PORT, API_TOKEN)")
    sub.add_parser("status", help="queue counts, live workers and node visits by state")
    rf = sub.add_parser(
        "retry-failed", help="retry failed jobs (their FAILED visits go back to PENDING)"
    )
    rf.add_argument("--queue", choices=["execution", "timeout"], default="execution")
    rf.add_argument("--limit", type=int, default=1000)
    sub.add_parser("migrate", help="bring the database to the newest schema")
    sub.add_parser("reconcile", help="one reconciler pass: re-enqueue jobs Redis lost")
    sch = sub.add_parser("schedule", help="schedule one node visit")
    sch.add_argument("--campaign", required=True)
    sch.add_argument("--node", required=True)
    sch.add_argument("--user", required=True, help="owning account id")
    sch.add_argument("--product-user", required=True)
    when = sch.add_mutually_exclusive_group(required=True)
    when.add_argument("--at", help="ISO time with offset, e.g. 2026-12-01T09:00:00+01:00")
    when.add_argument("--in", dest="in_seconds", type=float, help="seconds from now")
    hist = sub.add_parser("history", help="print the audit trail of a campaign")
    hist.add_argument("--campaign", required=True)
    hist.add_argument("--product-user")
    hist.add_argument("--limit", type=int, default=1000)
    return p


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_run,
    "worker": cmd_worker,
    "api": cmd_api,
    "status": cmd_status,
    "retry-failed": cmd_retry_failed,
    "migrate": cmd_migrate,
    "reconcile": cmd_reconcile,
    "schedule": cmd_schedule,
    "history": cmd_history,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        default_registry(
            settings, settings.handler_modules
        )  # a bad handler module fails here, first
        if args.command not in ("run", "demo"):
            Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        return asyncio.run(COMMANDS[args.command](settings, args))
    except SchedulerError as exc:
        print(f"campaign-scheduler: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        logging.shutdown()


if __name__ == "__main__":
    sys.exit(main())
