"""Business hours and specific times, as properties over random instants and zones."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign_scheduler.errors import InvalidInput, UnknownTimeZone
from campaign_scheduler.timewindows import (
    BusinessHours,
    ensure_utc,
    local_to_utc,
    next_business_instant,
    next_specific_time,
    parse_days,
    resolve_zone,
)

# DST zones of both hemispheres, a half-hour and a 45-minute offset, a zone whose DST
# change happens at midnight, and zones without DST.
ZONES = [
    "UTC",
    "Europe/Paris",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "America/Santiago",
    "America/Havana",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Tokyo",
    "Pacific/Auckland",
    "Africa/Cairo",
]

instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
)
zones = st.sampled_from(ZONES).map(ZoneInfo)
day_sets = st.frozensets(st.integers(0, 6), min_size=1)
minutes = st.integers(0, 24 * 60 - 1)


@st.composite
def business_hours(draw: st.DrawFn) -> BusinessHours:
    a, b = sorted(draw(st.lists(minutes, min_size=2, max_size=2, unique=True)))
    country = draw(st.sampled_from([None, None, "US", "FR", "DE"]))
    return BusinessHours(
        days=draw(day_sets),
        start=time(a // 60, a % 60),
        end=time(b // 60, b % 60),
        holiday_country=country,
    )


def _minutes_between(a: datetime, b: datetime) -> list[datetime]:
    """Every whole-minute instant strictly after a and strictly before b."""
    first = (a + timedelta(minutes=1)).replace(second=0, microsecond=0)
    out, t = [], first
    while t < b:
        out.append(t)
        t += timedelta(minutes=1)
    return out


@settings(max_examples=300, deadline=None)
@given(now=instants, zone=zones, hours=business_hours())
def test_business_instant_is_the_earliest_allowed_instant(
    now: datetime, zone: ZoneInfo, hours: BusinessHours
) -> None:
    result = next_business_instant(now, zone, hours)
    assert result.tzinfo is UTC
    assert result >= now
    assert hours.contains(result, zone)
    if result > now:
        assert not hours.contains(now, zone)
        # Brute force: window edges and DST changes fall on whole minutes (whole seconds of
        # the hour for every zone listed), so checking each minute finds any earlier start.
        assert not any(hours.contains(t, zone) for t in _minutes_between(now, result))


@settings(max_examples=300, deadline=None)
@given(now=instants, zone=zones, minute=minutes)
def test_specific_time_is_the_next_occurrence(now: datetime, zone: ZoneInfo, minute: int) -> None:
    at = time(minute // 60, minute % 60)
    result = next_specific_time(now, zone, at)
    assert result >= now
    local = result.astimezone(zone)
    exists = local_to_utc(local.date(), at, zone).astimezone(zone).time() == at
    if exists:
        assert local.time() == at
    else:  # skipped by a DST change: moved forward to the end of the gap
        assert local.time() > at
    # "Tomorrow when already past": the occurrence one local day earlier has passed.
    previous = local_to_utc(local.date() - timedelta(days=1), at, zone)
    assert previous < now
    assert result - now <= timedelta(hours=26)


@settings(max_examples=200, deadline=None)
@given(now=instants, zone=zones)
def test_default_hours_never_land_on_a_weekend(now: datetime, zone: ZoneInfo) -> None:
    result = next_business_instant(now, zone, BusinessHours())
    local = result.astimezone(zone)
    assert local.weekday() < 5
    assert time(9) <= local.time() < time(17)


# ---- examples that pin the specification's intent (and its sample's bugs) --------------

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS).astimezone(UTC)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (paris(2026, 11, 30, 10, 0), paris(2026, 11, 30, 10, 0)),  # inside: now
        (paris(2026, 11, 30, 7, 30), paris(2026, 11, 30, 9, 0)),  # before: today 09:00
        (paris(2026, 11, 30, 17, 0), paris(2026, 12, 1, 9, 0)),  # 17:00 is outside
        (paris(2026, 11, 30, 17, 30), paris(2026, 12, 1, 9, 0)),  # not tomorrow 17:30
        (paris(2026, 11, 29, 12, 0), paris(2026, 11, 30, 9, 0)),  # Sunday: the next Monday
        (paris(2026, 12, 4, 18, 0), paris(2026, 12, 7, 9, 0)),  # Friday evening: Monday
        (paris(2026, 12, 31, 18, 0), paris(2027, 1, 1, 9, 0)),  # year end (no holidays)
    ],
)
def test_business_hours_examples(now: datetime, expected: datetime) -> None:
    assert next_business_instant(now, PARIS, BusinessHours()) == expected


def test_holidays_are_skipped() -> None:
    ny = ZoneInfo("America/New_York")
    hours = BusinessHours(holiday_country="US")
    christmas_eve = datetime(2026, 12, 24, 18, 0, tzinfo=ny)  # Thursday; Friday 25th is off
    assert next_business_instant(christmas_eve, ny, hours) == datetime(
        2026, 12, 28, 9, 0, tzinfo=ny
    ).astimezone(UTC)


def test_business_hours_follow_the_users_zone_not_the_server() -> None:
    now = datetime(2026, 11, 30, 7, 0, tzinfo=UTC)  # Monday: 16:00 in Tokyo, 02:00 in NY
    assert next_business_instant(now, ZoneInfo("Asia/Tokyo"), BusinessHours()) == now
    assert next_business_instant(now, ZoneInfo("America/New_York"), BusinessHours()) == datetime(
        2026, 11, 30, 14, 0, tzinfo=UTC
    )


def test_dst_spring_forward_gap_moves_forward() -> None:
    # 02:30 does not exist in Paris on 2026-03-29: clocks jump from 02:00 to 03:00.
    assert local_to_utc(date(2026, 3, 29), time(2, 30), PARIS) == paris(2026, 3, 29, 3, 0)


def test_dst_fall_back_ambiguity_takes_first_occurrence() -> None:
    # 02:30 happens twice in Paris on 2026-10-25; the first is at UTC+2.
    assert local_to_utc(date(2026, 10, 25), time(2, 30), PARIS) == datetime(
        2026, 10, 25, 0, 30, tzinfo=UTC
    )


def test_specific_time_tomorrow_when_past() -> None:
    now = paris(2026, 11, 30, 12, 0)
    assert next_specific_time(now, PARIS, time(11, 30)) == paris(2026, 12, 1, 11, 30)
    assert next_specific_time(now, PARIS, time(12, 0)) == now
    assert next_specific_time(now, PARIS, time(18, 0)) == paris(2026, 11, 30, 18, 0)


def test_naive_datetimes_are_refused_with_the_fix() -> None:
    with pytest.raises(InvalidInput, match="no time zone.*tzinfo=UTC"):
        ensure_utc(datetime(2026, 1, 1, 9, 0), "run_at")
    with pytest.raises(InvalidInput):
        next_business_instant(datetime(2026, 1, 1), PARIS, BusinessHours())


def test_unknown_zone_is_named() -> None:
    with pytest.raises(UnknownTimeZone, match="Mars/Olympus.*IANA"):
        resolve_zone("Mars/Olympus")


def test_day_lists() -> None:
    assert parse_days("mon-fri") == frozenset(range(5))
    assert parse_days("sat,sun") == frozenset({5, 6})
    assert parse_days("fri-mon") == frozenset({4, 5, 6, 0})
    with pytest.raises(InvalidInput, match="mon-fri"):
        parse_days("weekdays")


def test_window_must_end_after_it_starts() -> None:
    with pytest.raises(InvalidInput, match="not after start"):
        BusinessHours(start=time(17), end=time(9))
