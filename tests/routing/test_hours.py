"""Business hours in the tenant's time zone, across daylight-saving changes."""

from datetime import UTC, datetime

import pytest

from backend.lib.problems import InvalidInput
from backend.routing.hours import Schedule

pytestmark = pytest.mark.unit

EVERY_DAY = [{"day": d, "start": "09:00", "end": "17:00"} for d in range(7)]


def paris(**extra) -> Schedule:
    return Schedule.build(
        "Europe/Paris", extra.get("weekly", EVERY_DAY), extra.get("holidays", []), extra.get("exceptions", [])
    )


def test_open_by_wall_clock_on_both_sides_of_the_spring_change():
    """Paris moves from UTC+1 to UTC+2 on 2026-03-29: 09:00 local is 08:00Z before and 07:00Z after."""
    hours = paris()
    assert hours.is_open(datetime(2026, 3, 28, 8, 0, tzinfo=UTC))  # 09:00 CET
    assert not hours.is_open(datetime(2026, 3, 28, 7, 30, tzinfo=UTC))  # 08:30 CET
    assert hours.is_open(datetime(2026, 3, 29, 7, 0, tzinfo=UTC))  # 09:00 CEST
    assert not hours.is_open(datetime(2026, 3, 29, 15, 0, tzinfo=UTC))  # 17:00 CEST: closed at the end
    assert hours.is_open(datetime(2026, 3, 28, 15, 59, tzinfo=UTC))  # 16:59 CET


def test_autumn_change_and_next_opening_crosses_it():
    """On 2026-10-25 Paris returns to UTC+1; the next opening after Saturday evening is Sunday 09:00 CET."""
    hours = paris()
    saturday_evening = datetime(2026, 10, 24, 18, 0, tzinfo=UTC)  # 20:00 CEST
    assert not hours.is_open(saturday_evening)
    assert hours.next_opening(saturday_evening) == datetime(2026, 10, 25, 8, 0, tzinfo=UTC)


def test_holidays_close_and_exceptions_override():
    hours = paris(
        holidays=[{"date": "2026-12-25", "name": "Christmas"}],
        exceptions=[
            {"date": "2026-12-24", "ranges": [{"start": "09:00", "end": "12:00"}]},
            {"date": "2026-12-26", "ranges": []},
        ],
    )
    assert not hours.is_open(datetime(2026, 12, 25, 10, 0, tzinfo=UTC))
    assert hours.is_open(datetime(2026, 12, 24, 10, 0, tzinfo=UTC))  # 11:00 CET
    assert not hours.is_open(datetime(2026, 12, 24, 12, 0, tzinfo=UTC))  # 13:00 CET: the short day is over
    assert not hours.is_open(datetime(2026, 12, 26, 10, 0, tzinfo=UTC))
    assert hours.next_opening(datetime(2026, 12, 24, 12, 0, tzinfo=UTC)) == datetime(2026, 12, 27, 8, 0, tzinfo=UTC)


def test_midnight_ranges_and_24_hours():
    hours = Schedule.build("Asia/Shanghai", [{"day": 0, "start": "00:00", "end": "24:00"}], [], [])
    assert hours.is_open(datetime(2026, 11, 22, 16, 0, tzinfo=UTC))  # Monday 00:00 in Shanghai
    assert hours.is_open(datetime(2026, 11, 23, 15, 59, tzinfo=UTC))  # Monday 23:59
    assert not hours.is_open(datetime(2026, 11, 23, 16, 0, tzinfo=UTC))  # Tuesday


@pytest.mark.parametrize(
    ("weekly", "field"),
    [
        (
            [{"day": 0, "start": "09:00", "end": "12:00"}, {"day": 0, "start": "11:00", "end": "13:00"}],
            "weekly (day 0)",
        ),
        ([{"day": 1, "start": "12:00", "end": "09:00"}], "weekly (day 1)"),
        ([{"day": 1, "start": "25:00", "end": "26:00"}], "weekly[0].start"),
        ([{"day": 1, "start": "09:60", "end": "10:00"}], "weekly[0].start"),
        ([{"day": 1, "start": "9:00", "end": "10:00"}], "weekly[0].start"),
    ],
)
def test_malformed_or_overlapping_ranges_are_refused(weekly, field):
    with pytest.raises(InvalidInput) as caught:
        Schedule.build("Europe/Paris", weekly, [], [])
    assert caught.value.errors[0]["field"] == field


def test_bad_dates_are_refused():
    with pytest.raises(InvalidInput):
        Schedule.build("Europe/Paris", [], [{"date": "2026-02-30"}], [])
    with pytest.raises(InvalidInput):
        Schedule.build(
            "Europe/Paris", [], [], [{"date": "2026-01-01", "ranges": []}, {"date": "2026-01-01", "ranges": []}]
        )
