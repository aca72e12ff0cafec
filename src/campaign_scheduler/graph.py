"""Campaign graphs: node kinds, their configuration, the rules a graph must follow, and the
run time a node gets when a user reaches it. Pure: no I/O."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError, field_validator

from .conditions import Condition, Window
from .errors import InvalidInput
from .jobs import check_id_part
from .timewindows import (
    BusinessHours,
    local_to_utc,
    next_business_instant,
    next_specific_time,
    parse_days,
    parse_hhmm,
)


class NodeKind(StrEnum):
    TRIGGER = "Trigger"
    AUDIENCE = "Audience"
    WAIT = "Wait"
    FILTER = "Filter"
    EMAIL = "Email"
    WEBHOOK = "Webhook"
    LOG = "Log"


ENTRY_KINDS = frozenset({NodeKind.TRIGGER, NodeKind.AUDIENCE})


class EdgeKind(StrEnum):
    DEFAULT = "Default"
    TIMEOUT = "Timeout"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class TriggerConfig(_Config):
    event: str = Field(min_length=1)
    condition: Condition | None = None


class AudienceConfig(_Config):
    rule: Literal["Existing", "New", "Both"]
    condition: Condition | None = None


class WaitConfig(Window):
    """A relative wait (days, hours, minutes, seconds), or `until` a local time of day."""

    until: str | None = None  # a local time of day, HH:MM, in the user's zone

    @field_validator("until")
    @classmethod
    def _hhmm(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hhmm(v)
        return v

    def delta(self) -> timedelta:
        return timedelta(
            days=self.days, hours=self.hours, minutes=self.minutes, seconds=self.seconds
        )


class FilterConfig(_Config):
    condition: Condition
    wait_value: float = Field(0, ge=0, alias="waitValue")  # 0: decide now
    wait_unit: Literal["days", "hours", "minutes", "seconds"] = Field("days", alias="waitUnit")

    def wait(self) -> timedelta:
        return timedelta(**{self.wait_unit: self.wait_value})


class BusinessHoursConfig(_Config):
    days: str = "mon-fri"
    start: str = "09:00"
    end: str = "17:00"
    holiday_country: str | None = Field(None, alias="holidayCountry")

    def hours(self) -> BusinessHours:
        return BusinessHours(
            days=parse_days(self.days),
            start=parse_hhmm(self.start),
            end=parse_hhmm(self.end),
            holiday_country=self.holiday_country,
        )


class EmailConfig(_Config):
    subject: str = Field(min_length=1)
    body: str
    html: bool = False
    sender: str | None = Field(None, alias="from")
    scheduling: Literal["Immediately", "BusinessHours", "SpecificTime"] = "Immediately"
    time: str | None = None  # for SpecificTime, HH:MM local
    business_hours: BusinessHoursConfig | None = Field(None, alias="businessHours")

    @field_validator("time")
    @classmethod
    def _hhmm(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hhmm(v)
        return v

    def model_post_init(self, _: Any) -> None:
        if self.scheduling == "SpecificTime" and self.time is None:
            raise ValueError('SpecificTime scheduling needs a time, e.g. "time": "11:30"')


class WebhookConfig(_Config):
    url: HttpUrl
    timeout_seconds: float = Field(10, gt=0, le=120, alias="timeoutSeconds")
    headers: dict[str, str] = Field(default_factory=dict)


class LogConfig(_Config):
    message: str = ""


CONFIG_MODELS: dict[NodeKind, type[BaseModel]] = {
    NodeKind.TRIGGER: TriggerConfig,
    NodeKind.AUDIENCE: AudienceConfig,
    NodeKind.WAIT: WaitConfig,
    NodeKind.FILTER: FilterConfig,
    NodeKind.EMAIL: EmailConfig,
    NodeKind.WEBHOOK: WebhookConfig,
    NodeKind.LOG: LogConfig,
}


@dataclass(frozen=True)
class NodeSpec:
    id: str
    kind: str
    config: dict[str, Any]


@dataclass(frozen=True)
class EdgeSpec:
    from_id: str
    to_id: str
    kind: str = EdgeKind.DEFAULT.value


def validate_graph(nodes: list[NodeSpec], edges: list[EdgeSpec]) -> list[str]:
    """Every problem with a campaign graph (empty when it is valid)."""
    problems: list[str] = []
    by_id: dict[str, NodeSpec] = {}
    for n in nodes:
        try:
            check_id_part("node id", n.id)  # node ids become part of job ids
        except InvalidInput as exc:
            problems.append(str(exc))
        if n.id in by_id:
            problems.append(f"node {n.id!r} is defined twice")
        by_id[n.id] = n
        try:
            kind = NodeKind(n.kind)
        except ValueError:
            problems.append(
                f"node {n.id!r} has unknown kind {n.kind!r}: use one of "
                + ", ".join(k.value for k in NodeKind)
            )
            continue
        try:
            CONFIG_MODELS[kind].model_validate(n.config)
        except ValidationError as exc:
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "config"
                problems.append(f"node {n.id!r} ({n.kind}): {where}: {err['msg']}")
    entries = {n.id for n in nodes if n.kind in ENTRY_KINDS}
    if not entries:
        problems.append("the campaign has no entry node: add a Trigger or an Audience node")
    out: dict[str, list[str]] = defaultdict(list)
    for e in edges:
        bad_end = [x for x in (e.from_id, e.to_id) if x not in by_id]
        if bad_end:
            problems.append(f"edge {e.from_id!r} -> {e.to_id!r} names unknown node {bad_end[0]!r}")
            continue
        if e.kind not in (EdgeKind.DEFAULT, EdgeKind.TIMEOUT):
            problems.append(f"edge {e.from_id!r} -> {e.to_id!r} has unknown kind {e.kind!r}")
        if e.to_id in entries:
            problems.append(f"edge {e.from_id!r} -> {e.to_id!r} points into entry node {e.to_id!r}")
        if e.kind == EdgeKind.TIMEOUT and by_id[e.from_id].kind != NodeKind.FILTER:
            problems.append(
                f"Timeout edge {e.from_id!r} -> {e.to_id!r} starts at a {by_id[e.from_id].kind} "
                "node: only Filter nodes have a timeout"
            )
        out[e.from_id].append(e.to_id)
    # Cycles: a depth-first search that meets a node still on its stack.
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in out[n]:
            if state.get(m) == 1:
                cycle = [*path[path.index(m) :], m] if m in path else [n, m]
                cycles.append(" -> ".join(cycle))
            elif m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for node_id in by_id:
        if node_id not in state:
            visit(node_id, [node_id])
    problems += [f"the graph has a cycle: {c}" for c in cycles]
    # Reachability from the entry nodes.
    seen, stack = set(entries), list(entries)
    while stack:
        for m in out[stack.pop()]:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    problems += [f"node {i!r} is not reachable from any entry node" for i in by_id if i not in seen]
    return problems


def check_graph(nodes: list[NodeSpec], edges: list[EdgeSpec]) -> None:
    problems = validate_graph(nodes, edges)
    if problems:
        raise InvalidInput(
            f"invalid campaign graph ({len(problems)} problems): " + "; ".join(problems)
        )


def arrival_run_at(
    kind: str, config: dict[str, Any], now: datetime, zone: ZoneInfo, default_hours: BusinessHours
) -> datetime:
    """When a node runs once a user reaches it at `now` (UTC), in the user's zone `zone`."""
    k = NodeKind(kind)
    if k == NodeKind.WAIT:
        wait = WaitConfig.model_validate(config)
        if wait.until is not None:
            at: time = parse_hhmm(wait.until)
            # Strictly after now: a wait "until 09:00" reached at 09:00 waits a day.
            candidate = next_specific_time(now, zone, at)
            return (
                candidate
                if candidate > now
                else local_to_utc(candidate.astimezone(zone).date() + timedelta(days=1), at, zone)
            )
        return now + wait.delta()
    if k == NodeKind.EMAIL:
        email = EmailConfig.model_validate(config)
        if email.scheduling == "BusinessHours":
            hours = email.business_hours.hours() if email.business_hours else default_hours
            return next_business_instant(now, zone, hours)
        if email.scheduling == "SpecificTime":
            assert email.time is not None
            return next_specific_time(now, zone, parse_hhmm(email.time))
    return now
