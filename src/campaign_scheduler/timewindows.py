"""Pure time arithmetic: UTC instants in, UTC instants out; local time only in between.

Business hours and specific times of day are wall-clock rules in a product user's zone.
The functions here turn them into UTC instants exactly, including across DST changes:
within a stretch of constant UTC offset the wall clock is a linear function of the instant,
so each stretch is solved arithmetically and the next stretch starts at the zone's next
offset change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .errors import InvalidInput, UnknownTimeZone

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SEARCH_DAYS = 800  # how far ahead a rule may push a run (two years covers any holiday list)


def resolve_zone(name: str) -> ZoneInfo:
    """An IANA zone, or UnknownTimeZone naming the bad value."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise UnknownTimeZone(str(name)) from None


def ensure_utc(value: datetime, what: str = "time") -> datetime:
    """Reject naive datetimes (their zone is a guess); return the same instant in UTC."""
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(
            f"{what} {value.isoformat()} has no time zone: pass an aware datetime, "
            "e.g. datetime(..., tzinfo=UTC) or datetime.now(UTC)"
        )
    return value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_hhmm(text: str) -> time:
    try:
        hh, mm = text.strip().split(":")
        return time(int(hh), int(mm))
    except (ValueError, AttributeError):
        raise InvalidInput(f"{text!r} is not a time of day: write HH:MM, e.g. 09:00") from None


def parse_days(text: str) -> frozenset[int]:
    """'mon-fri', 'mon,wed,fri', 'sat-sun' -> weekday numbers (Monday = 0)."""
    days: set[int] = set()
    try:
        for part in text.lower().replace(" ", "").split(","):
            if "-" in part:
                a, b = (DAY_NAMES.index(p[:3]) for p in part.split("-"))
                days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
            elif part:
                days.add(DAY_NAMES.index(part[:3]))
    except ValueError:
        raise InvalidInput(
            f"{text!r} is not a list of days: write e.g. mon-fri or mon,tue,thu"
        ) from None
    if not days:
        raise InvalidInput("no business days given: write e.g. mon-fri")
    return frozenset(days)


@functools.lru_cache(maxsize=64)
def _holiday_calendar(country: str, subdiv: str | None) -> object:
    import holidays

    return holidays.country_holidays(country, subdiv=subdiv)


def is_holiday(day: date, country: str | None, subdiv: str | None = None) -> bool:
    if not country:
        return False
    return day in _holiday_calendar(country, subdiv)  # type: ignore[operator]


@dataclass(frozen=True)
class BusinessHours:
    """Allowed local wall-clock window: on `days`, from `start` (inclusive) to `end` (exclusive)."""

    days: frozenset[int] = field(default_factory=lambda: frozenset(range(5)))
    start: time = time(9, 0)
    end: time = time(17, 0)
    holiday_country: str | None = None
    holiday_subdiv: str | None = None

    def __post_init__(self) -> None:
        if not self.days or not self.days <= set(range(7)):
            raise InvalidInput("business days must be weekday numbers 0 (Monday) to 6 (Sunday)")
        if self.end <= self.start:
            raise InvalidInput(
                f"business hours end {self.end} is not after start {self.start}: "
                "give an end later in the same day"
            )

    def day_allowed(self, day: date) -> bool:
        return day.weekday() in self.days and not is_holiday(
            day, self.holiday_country, self.holiday_subdiv
        )

    def contains(self, instant: datetime, zone: ZoneInfo) -> bool:
        """Is this instant inside the window, reading the wall clock in `zone`?"""
        local = ensure_utc(instant).astimezone(zone)
        return self.day_allowed(local.date()) and self.start <= local.time() < self.end


def _next_offset_change(t: datetime, zone: ZoneInfo, horizon: timedelta) -> datetime | None:
    """First instant after `t` whose UTC offset differs from the offset at `t`, or None."""

    def offset_at(seconds: int) -> timedelta | None:
        return datetime.fromtimestamp(seconds, UTC).astimezone(zone).utcoffset()

    off = t.astimezone(zone).utcoffset()
    lo = math.floor(t.timestamp())
    end = math.ceil((t + horizon).timestamp())
    while lo < end:
        hi = min(lo + 86400, end)
        if offset_at(hi) != off:
            # Offsets change on whole seconds: bisect to the first second of the new offset.
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if offset_at(mid) == off:
                    lo = mid
                else:
                    hi = mid
            return datetime.fromtimestamp(hi, UTC)
        lo = hi
    return None


def next_allowed_instant(
    now: datetime,
    zone: ZoneInfo,
    day_allowed: Callable[[date], bool],
    start: time,
    end: time,
) -> datetime:
    """Earliest instant >= now whose local wall clock is on an allowed day in [start, end)."""
    t = ensure_utc(now, "now")
    horizon = timedelta(days=_SEARCH_DAYS)
    limit = t + horizon
    while t < limit:
        offset = t.astimezone(zone).utcoffset()
        assert offset is not None
        seg_end = _next_offset_change(t, zone, limit - t)
        wall = t.replace(tzinfo=None) + offset
        for k in range(_SEARCH_DAYS):
            day = wall.date() + timedelta(days=k)
            if not day_allowed(day):
                continue
            w_start, w_end = datetime.combine(day, start), datetime.combine(day, end)
            if w_end <= wall:
                continue
            candidate = (max(wall, w_start) - offset).replace(tzinfo=UTC)
            if seg_end is None or candidate < seg_end:
                return candidate
            break  # the wall clock leaves this offset stretch first
        if seg_end is None:
            break
        t = seg_end
    raise InvalidInput(
        f"no allowed time within {_SEARCH_DAYS} days of {now.isoformat()}: "
        "check the business days, hours and holiday country"
    )


def next_business_instant(now: datetime, zone: ZoneInfo, hours: BusinessHours) -> datetime:
    """Now if inside business hours, else the start of the next business window (as UTC)."""
    return next_allowed_instant(now, zone, hours.day_allowed, hours.start, hours.end)


def local_to_utc(day: date, at: time, zone: ZoneInfo) -> datetime:
    """The UTC instant the wall clock in `zone` reads `day at`.

    An ambiguous time (clocks going back) is its first occurrence; a time skipped by clocks
    going forward moves forward to the instant the gap ends.
    """
    naive = datetime.combine(day, at)
    first = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if first.astimezone(zone).replace(tzinfo=None) == naive:
        return first
    # In a gap, fold=1 maps before the change and fold=0 after it: the change lies between.
    before = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    change = _next_offset_change(min(before, first), zone, abs(first - before) + timedelta(1))
    assert change is not None
    return change


def next_specific_time(now: datetime, zone: ZoneInfo, at: time) -> datetime:
    """Today's `at` in `zone` if it is still ahead (or now), else tomorrow's."""
    t = ensure_utc(now, "now")
    today = t.astimezone(zone).date()
    for k in range(3):
        candidate = local_to_utc(today + timedelta(days=k), at, zone)
        if candidate >= t:
            return candidate
    raise AssertionError("unreachable: tomorrow's time is always ahead")  # pragma: no cover
