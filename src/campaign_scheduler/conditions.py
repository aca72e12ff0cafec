"""Filter and audience conditions: a small JSON language over traits and events. Pure.

{"all": [c, ...]}  {"any": [c, ...]}  {"not": c}
{"trait": "plan", "op": "eq", "value": "pro"}      ops: eq ne gt gte lt lte in contains exists
{"event": "purchased", "performed": true, "within": {"days": 7}}
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Op = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "contains", "exists"]


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid")
    days: float = Field(0, ge=0)
    hours: float = Field(0, ge=0)
    minutes: float = Field(0, ge=0)
    seconds: float = Field(0, ge=0)

    def delta(self) -> timedelta:
        return timedelta(
            days=self.days, hours=self.hours, minutes=self.minutes, seconds=self.seconds
        )


class Condition(BaseModel):
    """One node of a condition tree; exactly one of its forms is set."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    all_: list[Condition] | None = Field(None, alias="all")
    any_: list[Condition] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")
    trait: str | None = None
    op: Op = "eq"
    value: Any = None
    event: str | None = None
    performed: bool = True
    within: Window | None = None

    @model_validator(mode="after")
    def _one_form(self) -> Condition:
        forms = [self.all_ is not None, self.any_ is not None, self.not_ is not None]
        forms += [self.trait is not None, self.event is not None]
        if sum(forms) != 1:
            raise ValueError("a condition needs exactly one of all, any, not, trait or event")
        return self


def _compare(actual: Any, op: Op, expected: Any) -> bool:
    if op == "exists":
        return (actual is not None) == (expected is not False)
    if actual is None:
        return op == "ne" and expected is not None
    try:
        match op:
            case "eq":
                return bool(actual == expected)
            case "ne":
                return bool(actual != expected)
            case "gt":
                return bool(actual > expected)
            case "gte":
                return bool(actual >= expected)
            case "lt":
                return bool(actual < expected)
            case "lte":
                return bool(actual <= expected)
            case "in":
                return actual in expected
            case "contains":
                return expected in actual
    except TypeError:
        return False  # comparing a string with a number is "no match", not an error
    return False  # pragma: no cover


def _trait(traits: dict[str, Any], path: str) -> Any:
    value: Any = traits
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def evaluate(
    cond: Condition,
    traits: dict[str, Any],
    events: Sequence[tuple[str, datetime]],
    now: datetime,
) -> bool:
    """Does a user with these traits and (name, occurred_at) events match, at `now`?"""
    if cond.all_ is not None:
        return all(evaluate(c, traits, events, now) for c in cond.all_)
    if cond.any_ is not None:
        return any(evaluate(c, traits, events, now) for c in cond.any_)
    if cond.not_ is not None:
        return not evaluate(cond.not_, traits, events, now)
    if cond.trait is not None:
        return _compare(_trait(traits, cond.trait), cond.op, cond.value)
    since = now - cond.within.delta() if cond.within else None
    happened = any(
        name == cond.event and (since is None or since <= at <= now) for name, at in events
    )
    return happened == cond.performed


def events_named(cond: Condition) -> set[str]:
    """Event names a condition looks at (to know which events can change its answer)."""
    out = {cond.event} if cond.event else set()
    for child in (cond.all_ or []) + (cond.any_ or []) + ([cond.not_] if cond.not_ else []):
        out |= events_named(child)
    return out
