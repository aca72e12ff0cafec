"""Graph rules, conditions, arrival times and templates: pure logic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from campaign_scheduler.conditions import Condition, evaluate
from campaign_scheduler.errors import InvalidInput, NonRetryableError
from campaign_scheduler.graph import EdgeSpec, NodeSpec, arrival_run_at, check_graph, validate_graph
from campaign_scheduler.templates import render
from campaign_scheduler.timewindows import BusinessHours

FILTER = {"condition": {"event": "activated"}, "waitValue": 2}
EMAIL = {"subject": "Hi", "body": "Hello"}


def valid() -> tuple[list[NodeSpec], list[EdgeSpec]]:
    nodes = [
        NodeSpec("t", "Trigger", {"event": "signed_up"}),
        NodeSpec("w", "Wait", {"seconds": 5}),
        NodeSpec("f", "Filter", FILTER),
        NodeSpec("yes", "Email", EMAIL),
        NodeSpec("no", "Email", EMAIL),
    ]
    edges = [
        EdgeSpec("t", "w"),
        EdgeSpec("w", "f"),
        EdgeSpec("f", "yes"),
        EdgeSpec("f", "no", "Timeout"),
    ]
    return nodes, edges


def test_a_valid_graph_has_no_problems() -> None:
    assert validate_graph(*valid()) == []


def test_every_problem_is_listed_at_once() -> None:
    nodes, edges = valid()
    nodes += [
        NodeSpec("a", "Audience", {"rule": "Sometimes"}),  # bad config
        NodeSpec("lonely", "Email", EMAIL),  # unreachable
        NodeSpec("x", "Teleport", {}),  # unknown kind
        NodeSpec("c1", "Wait", {"minutes": 1}),
        NodeSpec("c2", "Wait", {"minutes": 1}),
        NodeSpec("why?", "Log", {}),  # not usable in a job id
    ]
    edges += [
        EdgeSpec("w", "t"),  # into an entry node
        EdgeSpec("yes", "no", "Timeout"),  # Timeout edge not from a Filter
        EdgeSpec("yes", "c1"),
        EdgeSpec("c1", "c2"),
        EdgeSpec("c2", "c1"),  # cycle
        EdgeSpec("f", "ghost"),  # unknown node
        EdgeSpec("t", "why?"),
    ]
    problems = validate_graph(nodes, edges)
    text = "\n".join(problems)
    assert "node 'a' (Audience): rule" in text
    assert "'lonely' is not reachable" in text
    assert "unknown kind 'Teleport'" in text
    assert "points into entry node 't'" in text
    assert "Timeout edge 'yes' -> 'no' starts at a Email node" in text
    assert "cycle: " in text and "c1 -> c2 -> c1" in text
    assert "unknown node 'ghost'" in text
    assert "node id 'why?' is not a usable id" in text
    with pytest.raises(InvalidInput, match=r"invalid campaign graph \(\d+ problems\)"):
        check_graph(nodes, edges)


def test_a_graph_needs_an_entry_node() -> None:
    assert any("no entry node" in p for p in validate_graph([NodeSpec("e", "Email", EMAIL)], []))


def test_specific_time_email_needs_a_time() -> None:
    problems = validate_graph(
        [
            NodeSpec("t", "Trigger", {"event": "x"}),
            NodeSpec("e", "Email", EMAIL | {"scheduling": "SpecificTime"}),
        ],
        [EdgeSpec("t", "e")],
    )
    assert any("needs a time" in p for p in problems)


NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
EVENTS = [("purchased", NOW - timedelta(days=2)), ("opened", NOW - timedelta(days=20))]


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ({"trait": "plan", "op": "eq", "value": "pro"}, True),
        ({"trait": "plan", "op": "ne", "value": "pro"}, False),
        ({"trait": "age", "op": "gte", "value": 30}, True),
        ({"trait": "age", "op": "lt", "value": "thirty"}, False),  # type mismatch: no match
        ({"trait": "address.city", "op": "eq", "value": "Lyon"}, True),
        ({"trait": "tags", "op": "contains", "value": "vip"}, True),
        ({"trait": "plan", "op": "in", "value": ["pro", "team"]}, True),
        ({"trait": "missing", "op": "exists", "value": True}, False),
        ({"event": "purchased", "within": {"days": 7}}, True),
        ({"event": "opened", "within": {"days": 7}}, False),
        ({"event": "opened"}, True),
        ({"event": "refunded", "performed": False}, True),
        ({"all": [{"trait": "plan", "value": "pro"}, {"event": "purchased"}]}, True),
        ({"any": [{"trait": "plan", "value": "free"}, {"event": "refunded"}]}, False),
        ({"not": {"event": "refunded"}}, True),
    ],
)
def test_conditions(cond: dict[str, object], expected: bool) -> None:
    traits = {"plan": "pro", "age": 31, "address": {"city": "Lyon"}, "tags": ["vip", "beta"]}
    assert evaluate(Condition.model_validate(cond), traits, EVENTS, NOW) is expected


def test_a_condition_has_exactly_one_form() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Condition.model_validate({"trait": "a", "event": "b"})


PARIS = ZoneInfo("Europe/Paris")
HOURS = BusinessHours()


def test_arrival_times_by_kind() -> None:
    assert arrival_run_at(
        "Wait", {"hours": 1, "minutes": 30}, NOW, PARIS, HOURS
    ) == NOW + timedelta(hours=1.5)
    # 12:00 UTC is 13:00 in Paris: "until 09:00" means tomorrow 09:00 Paris.
    assert arrival_run_at("Wait", {"until": "09:00"}, NOW, PARIS, HOURS) == datetime(
        2026, 12, 1, 8, 0, tzinfo=UTC
    )
    assert arrival_run_at("Email", EMAIL, NOW, PARIS, HOURS) == NOW
    saturday = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    bh = EMAIL | {"scheduling": "BusinessHours"}
    assert arrival_run_at("Email", bh, saturday, PARIS, HOURS) == datetime(
        2026, 12, 7, 8, 0, tzinfo=UTC
    )
    own = bh | {"businessHours": {"days": "mon-sat", "start": "10:00", "end": "14:00"}}
    assert arrival_run_at("Email", own, saturday, PARIS, HOURS) == saturday
    st = EMAIL | {"scheduling": "SpecificTime", "time": "11:30"}
    assert arrival_run_at("Email", st, NOW, PARIS, HOURS) == datetime(
        2026, 12, 1, 10, 30, tzinfo=UTC
    )
    assert arrival_run_at("Filter", FILTER, NOW, PARIS, HOURS) == NOW


def test_templates_render_user_fields() -> None:
    ctx = {
        "user": {"email": "a@b.c", "first_name": "Ana"},
        "traits": {"first_name": "Ana"},
        "campaign": {"name": "Welcome"},
    }
    assert render("Hi {{ user.first_name }} ({{ campaign.name }})", ctx) == "Hi Ana (Welcome)"
    assert render("{{ traits.missing.deeper }}!", ctx) == "!"  # missing fields render empty
    assert render(
        "<b>{{ user.first_name }}</b>", {"user": {"first_name": "<script>"}}, html=True
    ) == ("<b>&lt;script&gt;</b>")


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ user.__class__.__init__.__globals__ }}",
        "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% include '/etc/passwd' %}",
    ],
)
def test_templates_cannot_reach_python_or_files(attack: str) -> None:
    with pytest.raises(NonRetryableError, match="template cannot be rendered"):
        render(attack, {"user": {"email": "x"}})


def test_broken_template_is_not_retried() -> None:
    with pytest.raises(NonRetryableError, match="TemplateSyntaxError"):
        render("{{ user.email ", {})
