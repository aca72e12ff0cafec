"""The campaign engine end to end: real Redis, real database, real SMTP and HTTP servers."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.exc import IntegrityError

from campaign_scheduler.db import CampaignEntry, NodeStateRow
from campaign_scheduler.engine import CampaignEngine, EventIn
from campaign_scheduler.errors import InvalidInput, NotFound, StateConflict
from campaign_scheduler.graph import EdgeSpec, NodeSpec
from campaign_scheduler.jobs import execution_job_id
from campaign_scheduler.nodes import EmailNode
from campaign_scheduler.processors import NodeContext
from campaign_scheduler.store import NodeKey, StateStore
from campaign_scheduler.timewindows import next_business_instant, resolve_zone, utcnow
from campaign_scheduler.worker import SchedulerWorker
from tests.conftest import HttpSink, Mailbox, has_state, wait_for

ACCT = "acct-1"


async def _campaign(
    engine: CampaignEngine,
    nodes: list[tuple[str, str, dict[str, Any]]],
    edges: list[tuple[str, str] | tuple[str, str, str]],
    campaign_id: str = "camp",
) -> str:
    await engine.create_campaign(
        campaign_id, "Onboarding", ACCT,
        [NodeSpec(*n) for n in nodes], [EdgeSpec(*e) for e in edges],
    )  # fmt: skip
    await engine.launch(campaign_id)
    return campaign_id


async def _state(store: StateStore, campaign: str, node: str, user: str) -> NodeStateRow | None:
    return await store.get_state(NodeKey(campaign, node, user))


@pytest.mark.slow
async def test_trigger_wait_filter_email_for_200_users(
    worker: SchedulerWorker, store: StateStore, mailbox: Mailbox
) -> None:
    engine = worker.engine
    c = await _campaign(
        engine,
        [
            ("signup", "Trigger", {"event": "signed_up"}),
            ("pause", "Wait", {"seconds": 1}),
            ("activated", "Filter", {"condition": {"event": "activated"}, "waitValue": 30, "waitUnit": "seconds"}),
            ("welcome", "Email", {"subject": "Welcome aboard, {{ user.first_name }}",
                                  "body": "Hi {{ user.first_name }}, thanks for activating {{ campaign.name }}."}),
            ("nudge", "Email", {"subject": "Need a hand, {{ user.first_name }}?",
                                "body": "Hi {{ user.first_name }}, can we help you get started?"}),
        ],
        [("signup", "pause"), ("pause", "activated"), ("activated", "welcome"),
         ("activated", "nudge", "Timeout")],
    )  # fmt: skip
    groups = {"early": [], "before": [], "after": [], "never": []}  # type: dict[str, list[str]]
    for i in range(200):
        group = list(groups)[i % 4]
        uid = f"u{i:03d}-{group}"
        groups[group].append(uid)
        await engine.upsert_product_user(
            uid, ACCT, email=f"{uid}@example.test", traits={"first_name": f"Name{i}"}
        )
    await engine.record_events([EventIn(u, "signed_up") for g in groups.values() for u in g])
    await engine.record_events([EventIn(u, "activated") for u in groups["early"]])

    async def all_in(group: str, state: str) -> bool:
        rows = [await _state(store, c, "activated", u) for u in groups[group]]
        return all(r is not None and r.state == state for r in rows)

    # "before": each user waits at the filter, and the event comes well before the deadline.
    async def send_to_waiting() -> bool:
        waiting = await store.list_states({"WAITING"}, campaign_id=c, limit=1000)  # type: ignore[arg-type]
        ready = [r.product_user_id for r in waiting if r.product_user_id in before_left]
        if ready:
            await engine.record_events([EventIn(u, "activated") for u in ready])
            before_left.difference_update(ready)
        return not before_left

    before_left = set(groups["before"])
    await wait_for(send_to_waiting, timeout=150, every=0.3)
    # "after": the deadline has passed when the event comes; it must change nothing.
    await wait_for(lambda: all_in("after", "TIMEOUT"), timeout=150, every=0.5)
    await engine.record_events([EventIn(u, "activated") for u in groups["after"]])

    async def all_mailed() -> bool:
        done = await store.list_states({"COMPLETED"}, campaign_id=c, limit=5000)  # type: ignore[arg-type]
        return sum(r.node_id in ("welcome", "nudge") for r in done) == 200

    await wait_for(all_mailed, timeout=180, every=0.5)
    await asyncio.sleep(1)  # nothing more may arrive
    waited_then_matched = 0
    for group, users in groups.items():
        yes = group in ("early", "before")
        for u in users:
            f = await _state(store, c, "activated", u)
            assert f is not None
            assert f.state == ("COMPLETED" if yes else "TIMEOUT"), (u, f.state)
            assert f.did_timeout is (not yes)
            assert await _state(store, c, "nudge" if yes else "welcome", u) is None
            mails = mailbox.to(f"{u}@example.test")
            assert len(mails) == 1, (u, [m["Subject"] for m in mails])
            n = int(u[1:4])
            expected = f"Welcome aboard, Name{n}" if yes else f"Need a hand, Name{n}?"
            assert mails[0]["Subject"] == expected
            assert f"Hi Name{n}," in mails[0].get_content()
            reasons = [t.reason for t in await store.history(f.id)]
            if group == "before":  # released by the event, not by a fresh evaluation
                waited_then_matched += 1
                assert reasons[-2:] == ["waiting_for_match", "matched"]
            if not yes:
                assert reasons[-2:] == ["waiting_for_match", "timed_out"]
    assert waited_then_matched == 50
    ids = [m["Message-ID"] for u in groups["early"] for m in mailbox.to(f"{u}@example.test")]
    assert len(set(ids)) == len(ids)


async def test_launch_and_stop_rules(worker: SchedulerWorker) -> None:
    engine = worker.engine
    await _campaign(engine, [("t", "Trigger", {"event": "x"}), ("l", "Log", {})], [("t", "l")])
    with pytest.raises(StateConflict, match="already running"):
        await engine.launch("camp")
    await engine.stop("camp")
    with pytest.raises(StateConflict, match="only a draft can be launched"):
        await engine.launch("camp")
    with pytest.raises(StateConflict, match="STOPPED, not running"):
        await engine.stop("camp")
    with pytest.raises(NotFound):
        await engine.launch("nope")


async def test_invalid_graph_is_refused_whole(worker: SchedulerWorker, store: StateStore) -> None:
    with pytest.raises(InvalidInput, match=r"3 problems.*into entry node.*cycle.*not reachable"):
        await worker.engine.create_campaign(
            "bad", "Bad", ACCT,
            [NodeSpec("t", "Trigger", {"event": "x"}), NodeSpec("e", "Email", {"subject": "s", "body": "b"}),
             NodeSpec("orphan", "Log", {})],
            [EdgeSpec("e", "t"), EdgeSpec("t", "e")],
        )  # fmt: skip
    assert await store.get_campaign("bad") is None


async def test_audience_rules_and_entry_at_most_once(
    worker: SchedulerWorker, store: StateStore
) -> None:
    engine = worker.engine
    await engine.upsert_product_user("old-pro", ACCT, email="a@x.test", traits={"plan": "pro"})
    await engine.upsert_product_user("old-free", ACCT, email="b@x.test", traits={"plan": "free"})
    await engine.upsert_product_user("other-account", "acct-2", email="c@x.test")
    pro = {"trait": "plan", "value": "pro"}
    for rule in ("Existing", "New", "Both"):
        await _campaign(
            engine,
            [(f"a-{rule}", "Audience", {"rule": rule, "condition": pro}), (f"l-{rule}", "Log", {})],
            [(f"a-{rule}", f"l-{rule}")],
            campaign_id=f"c-{rule}",
        )
    await engine.upsert_product_user("new-pro", ACCT, email="d@x.test", traits={"plan": "pro"})
    await engine.upsert_product_user("old-pro", ACCT, traits={"seen": True})  # an update
    entered = {
        rule: {u for u in ("old-pro", "old-free", "other-account", "new-pro")
               if await _state(store, f"c-{rule}", f"a-{rule}", u) is not None}
        for rule in ("Existing", "New", "Both")
    }  # fmt: skip
    assert entered == {
        "Existing": {"old-pro"},
        "New": {"new-pro"},
        "Both": {"old-pro", "new-pro"},
    }
    await wait_for(lambda: has_state(store, ("c-Both", "l-Both", "new-pro"), "COMPLETED"))
    # At most once is a database constraint, not only a check in code.
    with pytest.raises(IntegrityError):
        async with store.session() as s:
            s.add(
                CampaignEntry(
                    campaign_id="c-Both", product_user_id="old-pro", entry_node_id="a-Both"
                )
            )


async def test_trigger_enters_once_even_when_the_event_repeats(
    worker: SchedulerWorker, store: StateStore
) -> None:
    engine = worker.engine
    await _campaign(engine, [("t", "Trigger", {"event": "paid"}), ("l", "Log", {})], [("t", "l")])
    await engine.upsert_product_user("u1", ACCT, email="u1@x.test")
    await asyncio.gather(*(engine.record_event("u1", "paid") for _ in range(5)))
    await engine.record_event("u1", "something-else")
    await wait_for(lambda: has_state(store, ("camp", "l", "u1"), "COMPLETED"))
    row = await _state(store, "camp", "t", "u1")
    assert row is not None
    assert next(t.reason for t in await store.history(row.id)) == "entered"
    with pytest.raises(NotFound, match="upsert it first"):
        await engine.record_event("ghost", "paid")


async def test_stop_mid_run_cancels_pending_and_keeps_history(
    worker: SchedulerWorker, store: StateStore, mailbox: Mailbox
) -> None:
    engine = worker.engine
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}), ("w", "Wait", {"minutes": 5}),
         ("e", "Email", {"subject": "never", "body": "never"})],
        [("t", "w"), ("w", "e")],
    )  # fmt: skip
    users = [f"s{i}" for i in range(10)]
    for u in users:
        await engine.upsert_product_user(u, ACCT, email=f"{u}@stop.test")
    await engine.record_events([EventIn(u, "go") for u in users])
    for u in users:
        await wait_for(lambda u=u: has_state(store, ("camp", "w", u), "PENDING"))
    assert await engine.stop("camp") == 10
    q = worker.queues
    for u in users:
        assert await has_state(store, ("camp", "t", u), "COMPLETED")  # history kept
        assert await has_state(store, ("camp", "w", u), "CANCELLED")
        assert await q.job_state(q.execution, execution_job_id("camp", "w", u)) == "unknown"
    assert not [m for m in mailbox.messages if m["To"].endswith("@stop.test")]


async def test_filter_decides_now_with_zero_wait(
    worker: SchedulerWorker, store: StateStore
) -> None:
    engine = worker.engine
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}), ("f", "Filter", {"condition": {"trait": "vip", "value": True}}),
         ("yes", "Log", {}), ("no", "Log", {})],
        [("t", "f"), ("f", "yes"), ("f", "no", "Timeout")],
    )  # fmt: skip
    await engine.upsert_product_user("vip", ACCT, traits={"vip": True})
    await engine.upsert_product_user("plain", ACCT, traits={"vip": False})
    await engine.record_events([EventIn("vip", "go"), EventIn("plain", "go")])
    await wait_for(lambda: has_state(store, ("camp", "yes", "vip"), "COMPLETED"))
    await wait_for(lambda: has_state(store, ("camp", "no", "plain"), "COMPLETED"))
    f = await _state(store, "camp", "f", "plain")
    assert f is not None and f.state == "TIMEOUT" and f.did_timeout


async def test_trait_update_releases_a_waiting_filter(
    worker: SchedulerWorker, store: StateStore
) -> None:
    engine = worker.engine
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}),
         ("f", "Filter", {"condition": {"trait": "plan", "value": "pro"}, "waitValue": 1, "waitUnit": "hours"}),
         ("yes", "Log", {})],
        [("t", "f"), ("f", "yes")],
    )  # fmt: skip
    await engine.upsert_product_user("u", ACCT, traits={"plan": "free"})
    await engine.record_event("u", "go")
    await wait_for(lambda: has_state(store, ("camp", "f", "u"), "WAITING"))
    f = await _state(store, "camp", "f", "u")
    assert f is not None and f.timeout_at is not None
    assert timedelta(minutes=59) < f.timeout_at - utcnow() <= timedelta(hours=1)
    q = worker.queues
    assert (
        await q.job_state(q.timeout, f"timeout-{execution_job_id('camp', 'f', 'u')}") == "delayed"
    )
    await engine.upsert_product_user("u", ACCT, traits={"plan": "pro"})
    await wait_for(lambda: has_state(store, ("camp", "yes", "u"), "COMPLETED"))
    assert (
        await q.job_state(q.timeout, f"timeout-{execution_job_id('camp', 'f', 'u')}") == "unknown"
    )


async def _webhook_campaign(engine: CampaignEngine, url: str) -> None:
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}), ("h", "Webhook", {"url": url, "timeoutSeconds": 2})],
        [("t", "h")],
    )
    await engine.upsert_product_user("u", ACCT, email="u@hook.test", traits={"plan": "pro"})
    await engine.record_event("u", "go")


async def test_webhook_posts_with_an_idempotency_key(
    worker: SchedulerWorker, store: StateStore, http_sink: HttpSink
) -> None:
    path = f"/ok/{worker.settings.queue_prefix}"
    await _webhook_campaign(worker.engine, http_sink.url + path)
    await wait_for(lambda: has_state(store, ("camp", "h", "u"), "COMPLETED"))
    (req,) = http_sink.at(path)
    assert req.headers["Idempotency-Key"] == execution_job_id("camp", "h", "u")
    assert req.body["user"]["email"] == "u@hook.test" and req.body["campaign"]["id"] == "camp"
    row = await _state(store, "camp", "h", "u")
    assert row is not None and row.delivery == {"status": 200, "url": http_sink.url + path}


async def test_webhook_5xx_is_retried(
    worker: SchedulerWorker, store: StateStore, http_sink: HttpSink
) -> None:
    path = f"/flaky/2/{worker.settings.queue_prefix}"
    await _webhook_campaign(worker.engine, http_sink.url + path)
    await wait_for(lambda: has_state(store, ("camp", "h", "u"), "COMPLETED"), timeout=20)
    reqs = http_sink.at(path)
    assert len(reqs) == 3 and len({r.headers["Idempotency-Key"] for r in reqs}) == 1
    row = await _state(store, "camp", "h", "u")
    assert row is not None and row.attempts == 3


async def test_webhook_4xx_fails_without_retry(
    worker: SchedulerWorker, store: StateStore, http_sink: HttpSink
) -> None:
    path = f"/status/422/{worker.settings.queue_prefix}"
    await _webhook_campaign(worker.engine, http_sink.url + path)
    await wait_for(lambda: has_state(store, ("camp", "h", "u"), "FAILED"), timeout=10)
    await asyncio.sleep(1.5)
    assert len(http_sink.at(path)) == 1
    row = await _state(store, "camp", "h", "u")
    assert row is not None and row.attempts == 1 and "422" in (row.last_error or "")


async def test_webhook_network_error_is_retried(worker: SchedulerWorker, store: StateStore) -> None:
    await _webhook_campaign(worker.engine, "http://127.0.0.1:1/hook")
    await wait_for(lambda: has_state(store, ("camp", "h", "u"), "FAILED"), timeout=20)
    row = await _state(store, "camp", "h", "u")
    assert row is not None and row.attempts == 3 and row.last_error_type == "WebhookFailed"


async def test_email_retry_after_a_crash_does_not_send_twice(
    worker: SchedulerWorker, store: StateStore, mailbox: Mailbox
) -> None:
    email = EmailNode(worker.settings)

    async def send_then_crash(ctx: NodeContext) -> Any:
        result = await email(ctx)
        if ctx.attempt == 1:
            raise ConnectionResetError("worker lost its connection right after sending")
        return result

    worker.processors.registry.register("SendThenCrash", send_then_crash)
    await store.create_campaign(
        "camp", "c", ACCT, nodes=[("m", "SendThenCrash", {"subject": "Once", "body": "only once"})]
    )
    await store.upsert_product_user("u", ACCT, email="once@x.test")
    await worker.scheduling.schedule_campaign_node("camp", "m", ACCT, "u", utcnow())
    await wait_for(lambda: has_state(store, ("camp", "m", "u"), "COMPLETED"), timeout=15)
    row = await _state(store, "camp", "m", "u")
    assert row is not None and row.attempts == 2
    (msg,) = mailbox.to("once@x.test")
    assert msg["Message-ID"] == row.delivery["messageId"]  # type: ignore[index]


async def test_template_injection_fails_the_node_and_sends_nothing(
    worker: SchedulerWorker, store: StateStore, mailbox: Mailbox
) -> None:
    engine = worker.engine
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}),
         ("e", "Email", {"subject": "hi", "body": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})],
        [("t", "e")],
    )  # fmt: skip
    await engine.upsert_product_user("u", ACCT, email="victim@x.test")
    await engine.record_event("u", "go")
    await wait_for(lambda: has_state(store, ("camp", "e", "u"), "FAILED"))
    row = await _state(store, "camp", "e", "u")
    assert row is not None and row.attempts == 1 and "not allowed" in (row.last_error or "")
    assert mailbox.to("victim@x.test") == []


async def test_business_hours_email_per_user_zone(
    worker: SchedulerWorker, store: StateStore
) -> None:
    engine = worker.engine
    await _campaign(
        engine,
        [("t", "Trigger", {"event": "go"}),
         ("e", "Email", {"subject": "s", "body": "b", "scheduling": "BusinessHours"})],
        [("t", "e")],
    )  # fmt: skip
    zones = [
        "Asia/Tokyo",
        "America/New_York",
        "Europe/Paris",
        "Australia/Sydney",
        "America/Sao_Paulo",
    ]
    for z in zones:
        await engine.upsert_product_user(z.replace("/", "_"), ACCT, email=f"{z}@x.test", timezone=z)
    await engine.record_events([EventIn(z.replace("/", "_"), "go") for z in zones])
    hours = worker.settings.business_hours()
    for z in zones:
        u = z.replace("/", "_")
        await wait_for(lambda u=u: _has(store, "camp", "e", u))
        row = await _state(store, "camp", "e", u)
        assert row is not None and row.run_at is not None
        zone = resolve_zone(z)
        # Computed when the user reached the node, just before the row was written.
        lo = next_business_instant(row.created_at - timedelta(seconds=2), zone, hours)
        hi = next_business_instant(row.created_at, zone, hours)
        assert lo <= row.run_at <= hi
        assert hours.contains(row.run_at, zone)


async def _has(store: StateStore, c: str, n: str, u: str) -> bool:
    return await _state(store, c, n, u) is not None


async def test_batch_events_and_counts(worker: SchedulerWorker, store: StateStore) -> None:
    engine = worker.engine
    await _campaign(engine, [("t", "Trigger", {"event": "go"}), ("l", "Log", {})], [("t", "l")])
    for i in range(30):
        await engine.upsert_product_user(f"b{i}", ACCT)
    await engine.record_events([EventIn(f"b{i}", "go", {"n": i}) for i in range(30)] * 2)
    for i in range(30):
        await wait_for(lambda i=i: has_state(store, ("camp", "l", f"b{i}"), "COMPLETED"))
    rows = await store.list_states({"COMPLETED"}, campaign_id="camp", limit=1000)  # type: ignore[arg-type]
    assert Counter(r.node_id for r in rows) == {"t": 30, "l": 30}


async def test_webhook_timeout_is_retried(
    worker: SchedulerWorker, store: StateStore, http_sink: HttpSink
) -> None:
    path = f"/slow/1/{worker.settings.queue_prefix}"
    await _campaign(
        worker.engine,
        [
            ("t", "Trigger", {"event": "go"}),
            ("h", "Webhook", {"url": http_sink.url + path, "timeoutSeconds": 0.5}),
        ],
        [("t", "h")],
    )
    await worker.engine.upsert_product_user("u", ACCT)
    await worker.engine.record_event("u", "go")
    await wait_for(lambda: has_state(store, ("camp", "h", "u"), "COMPLETED"), timeout=20)
    row = await _state(store, "camp", "h", "u")
    assert row is not None and row.attempts == 2 and row.last_error_type == "WebhookFailed"
    assert "ReadTimeout" in (row.last_error or "")


async def test_reconciler_queues_successors_a_dead_worker_left(
    worker: SchedulerWorker, store: StateStore
) -> None:
    from campaign_scheduler.states import NodeState
    from campaign_scheduler.store import Actor, Successor

    await store.create_campaign(
        "camp", "c", ACCT, nodes=[("a", "Log", {}), ("b", "Log", {})], edges=[("a", "b", "Default")]
    )
    await store.upsert_product_user("u", ACCT)
    row = await store.schedule_pending(
        NodeKey("camp", "a", "u"),
        ACCT,
        utcnow() + timedelta(hours=1),
        execution_job_id("camp", "a", "u"),
        Actor("t"),
    )
    started = await store.start_run(
        NodeKey("camp", "a", "u"),
        row.job_id or "",
        "tok",
        Actor("t"),
        not_before=utcnow() + timedelta(hours=2),
    )
    assert started.started
    # The visit finishes and its successor is written in one transaction; then the worker
    # dies before queueing the successor's job.
    done, created = await store.finish(
        row.id,
        {NodeState.RUNNING},
        NodeState.COMPLETED,
        "completed",
        Actor("t"),
        token="tok",
        successors=[Successor("b", utcnow())],
    )
    assert done is not None and [c.node_id for c in created] == ["b"]
    q = worker.queues
    assert await q.job_state(q.execution, execution_job_id("camp", "b", "u")) == "unknown"
    report = await worker.reconciler.run_once()
    assert report.requeued >= 1
    await wait_for(lambda: has_state(store, ("camp", "b", "u"), "COMPLETED"))
