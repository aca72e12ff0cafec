"""Job ids and payloads on the wire, settings from the environment, the state machine."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from campaign_scheduler.config import load_settings
from campaign_scheduler.connections import job_options, redis_options
from campaign_scheduler.errors import ConfigError, InvalidInput
from campaign_scheduler.jobs import (
    CampaignExecutionJob,
    CampaignTimeoutJob,
    check_job_id,
    execution_job_id,
    parse_job,
    timeout_job_id,
)
from campaign_scheduler.states import ALLOWED, TERMINAL, NodeState, check_transition


def test_job_ids_are_the_specifications() -> None:
    assert execution_job_id("c1", "n1", "u1") == "c1-n1-u1"
    assert timeout_job_id("c1", "n1", "u1") == "timeout-c1-n1-u1"


@pytest.mark.parametrize("bad", ["a:b", "has space", "", "x" * 101])
def test_unsafe_id_parts_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInput, match="not a usable id"):
        execution_job_id(bad, "n", "u")


@pytest.mark.parametrize("bad", ["2", "17", "1e5", "3.5", "-4"])
def test_number_like_job_ids_are_refused(bad: str) -> None:
    # BULLMQ-PYTHON-NOTES 4: a custom id "2" is overwritten by BullMQ's own job 2.
    with pytest.raises(InvalidInput, match="looks like a number"):
        check_job_id(bad)


def test_payload_is_camel_case_on_the_wire() -> None:
    job = CampaignExecutionJob(
        campaign_id="c1",
        node_id="n1",
        user_id="acct",
        product_user_id="u1",
        execution_time=datetime(2026, 12, 1, 9, tzinfo=UTC),
    )
    assert job.wire() == {
        "campaignId": "c1",
        "nodeId": "n1",
        "userId": "acct",
        "productUserId": "u1",
        "attempts": 0,
        "executionTime": "2026-12-01T09:00:00Z",
        "didTimeout": False,
    }
    # What a Node.js producer sends (Date serialised by JSON.stringify) parses back.
    node_js = {**job.wire(), "executionTime": "2026-12-01T09:00:00.000Z"}
    assert parse_job(CampaignExecutionJob, node_js).execution_time == job.execution_time
    assert job.job_id == "c1-n1-u1"


def test_malformed_payloads_name_the_fields() -> None:
    with pytest.raises(InvalidInput, match="nodeId"):
        parse_job(CampaignExecutionJob, {"campaignId": "c", "userId": "a", "productUserId": "u"})
    with pytest.raises(InvalidInput, match="timeoutAt"):
        parse_job(
            CampaignTimeoutJob,
            {"campaignId": "c", "nodeId": "n", "userId": "a", "productUserId": "u",
             "timeoutAt": "2026-12-01T09:00:00"},
        )  # fmt: skip


def test_settings_errors_name_the_variable_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_PORT", "sixty")
    monkeypatch.setenv("SCHEDULER_CONCURRENCY", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    text = str(err.value)
    assert "REDIS_PORT='sixty'" in text and "6379" in text
    assert "SCHEDULER_CONCURRENCY='0'" in text and "whole number" in text


@pytest.mark.parametrize(
    ("var", "value", "hint"),
    [
        ("SCHEDULER_DEFAULT_TIMEZONE", "Mars/Base", "IANA"),
        ("REDIS_URL", "http://x", "redis://"),
        ("DATABASE_URL", "mysql://x", "postgresql://"),
        ("SCHEDULER_HOLIDAY_COUNTRY", "XX", "country"),
        ("SCHEDULER_BUSINESS_DAYS", "someday", "mon-fri"),
    ],
)
def test_each_bad_setting_is_explained(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, hint: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"{var}=.*{hint}"):
        load_settings()


def test_business_end_before_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCHEDULER_BUSINESS_START", "18:00")
    with pytest.raises(ConfigError, match="SCHEDULER_BUSINESS_END"):
        load_settings()


def test_redis_settings_from_parts_and_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis")
    monkeypatch.setenv("REDIS_PORT", "6380")
    monkeypatch.setenv("REDIS_PASSWORD", "s3cret")
    monkeypatch.setenv("REDIS_DB", "2")
    opts = redis_options(load_settings())
    assert (opts["host"], opts["port"], opts["password"], opts["db"]) == (
        "redis",
        6380,
        "s3cret",
        2,
    )
    # Trap 1: no socket timeout, or redis-py 8 breaks bullmq's 10 s blocking reads.
    assert opts["socket_timeout"] is None
    tls = redis_options(load_settings(redis_url="rediss://:pw@cache.example:6390/3"))
    assert tls["ssl"] is True and tls["port"] == 6390 and tls["db"] == 3 and tls["password"] == "pw"
    assert tls["socket_timeout"] is None


def test_default_job_options_follow_the_specification() -> None:
    opts = job_options(load_settings())
    assert opts["attempts"] == 3
    assert opts["backoff"] == {"type": "exponential", "delay": 1000}


def test_state_machine_has_one_way_out_of_each_terminal_state() -> None:
    for state in TERMINAL:
        outs = {dst for src, dst in ALLOWED if src == state}
        # Only a FAILED visit may be retried by hand; other outcomes are final.
        assert outs == ({NodeState.PENDING} if state == NodeState.FAILED else set())
    with pytest.raises(ValueError):
        check_transition(NodeState.COMPLETED, NodeState.RUNNING)
    check_transition(NodeState.RUNNING, NodeState.TIMEOUT)
