"""Business hours: validation of weekly ranges, holidays and exceptions, and open/closed at an instant.

Ranges are wall-clock times in the hours' own time zone, so "09:00-17:00" stays
09:00-17:00 local on the days daylight-saving time starts or ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

from backend.lib.problems import InvalidInput

MINUTES_PER_DAY = 24 * 60
LOOKAHEAD_DAYS = 400


def parse_clock(field: str, value: str) -> int:
    """Minutes since midnight of "HH:MM" (00:00 to 24:00)."""
    try:
        hours_text, minutes_text = value.split(":")
        hours, minutes = int(hours_text), int(minutes_text)
    except ValueError as exc:
        raise InvalidInput.field(field, f"{value!r} is not a time HH:MM") from exc
    if len(hours_text) != 2 or len(minutes_text) != 2 or not (0 <= minutes < 60) or not (0 <= hours <= 24):
        raise InvalidInput.field(field, f"{value!r} is not a time HH:MM")
    total = hours * 60 + minutes
    if total > MINUTES_PER_DAY:
        raise InvalidInput.field(field, f"{value!r} is after 24:00")
    return total


def _check_ranges(field: str, ranges: Sequence[tuple[int, int]]) -> None:
    ordered = sorted(ranges)
    for start, end in ordered:
        if start >= end:
            raise InvalidInput.field(field, "a range must end after it starts")
    for (_, first_end), (second_start, _) in pairwise(ordered):
        if second_start < first_end:
            raise InvalidInput.field(field, "ranges of the same day overlap")


@dataclass(frozen=True, slots=True)
class Schedule:
    """Validated business hours, ready to answer "open at this instant?"."""

    zone: ZoneInfo
    weekly: dict[int, list[tuple[int, int]]]
    holidays: frozenset[date]
    exceptions: dict[date, list[tuple[int, int]]]

    @classmethod
    def build(
        cls,
        time_zone: str,
        weekly: Sequence[dict[str, Any]],
        holidays: Sequence[dict[str, Any]],
        exceptions: Sequence[dict[str, Any]],
    ) -> Schedule:
        """Validate raw settings (422 naming the field on any error) and build the schedule."""
        zone = ZoneInfo(time_zone)
        by_day: dict[int, list[tuple[int, int]]] = {day: [] for day in range(7)}
        for index, item in enumerate(weekly):
            day = item["day"]
            by_day[day].append(
                (parse_clock(f"weekly[{index}].start", item["start"]), parse_clock(f"weekly[{index}].end", item["end"]))
            )
        for day, ranges in by_day.items():
            _check_ranges(f"weekly (day {day})", ranges)
        holiday_dates: set[date] = set()
        for index, item in enumerate(holidays):
            holiday_dates.add(_parse_date(f"holidays[{index}].date", item["date"]))
        special: dict[date, list[tuple[int, int]]] = {}
        for index, item in enumerate(exceptions):
            day_date = _parse_date(f"exceptions[{index}].date", item["date"])
            if day_date in special:
                raise InvalidInput.field(f"exceptions[{index}].date", "appears twice")
            ranges = [
                (
                    parse_clock(f"exceptions[{index}].ranges[{r}].start", rng["start"]),
                    parse_clock(f"exceptions[{index}].ranges[{r}].end", rng["end"]),
                )
                for r, rng in enumerate(item.get("ranges", []))
            ]
            _check_ranges(f"exceptions[{index}].ranges", ranges)
            special[day_date] = ranges
        return cls(zone, by_day, frozenset(holiday_dates), special)

    def ranges_on(self, day: date) -> list[tuple[int, int]]:
        """The opening ranges of a local calendar day (exceptions win over holidays over the week)."""
        if day in self.exceptions:
            return sorted(self.exceptions[day])
        if day in self.holidays:
            return []
        return sorted(self.weekly[day.weekday()])

    def is_open(self, at: datetime) -> bool:
        """Whether the hours are open at an instant (timezone-aware)."""
        local = at.astimezone(self.zone)
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.ranges_on(local.date()))

    def next_opening(self, after: datetime) -> datetime | None:
        """The first instant at or after `after` when the hours are open (UTC), or None within a year."""
        if self.is_open(after):
            return after.astimezone(UTC)
        local = after.astimezone(self.zone)
        for offset in range(LOOKAHEAD_DAYS):
            day = local.date() + timedelta(days=offset)
            for start, _ in self.ranges_on(day):
                if start >= MINUTES_PER_DAY:
                    continue
                candidate = datetime.combine(day, time(start // 60, start % 60), tzinfo=self.zone)
                if candidate.astimezone(UTC) >= after.astimezone(UTC):
                    return candidate.astimezone(UTC)
        return None


def _parse_date(field: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput.field(field, f"{value!r} is not a date YYYY-MM-DD") from exc
