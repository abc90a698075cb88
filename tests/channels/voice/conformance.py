"""Shapes of captured and simulated calls: event order by leg, and header names without their values."""

from __future__ import annotations

from backend.channels.voice.esl import Event, FrameParser, decode_frame
from tests.support.freeswitch_captures import fixture

# Headers whose presence depends on what the dialplan, the SIP peers or the clock did, not on the switch.
VARIABLE_PREFIX = "variable_"


def captured_events(relative: str) -> list[Event]:
    frames = FrameParser().feed(fixture(relative).read_bytes())
    return [m for m in map(decode_frame, frames) if isinstance(m, Event)]


def call_window(events: list[Event]) -> tuple[list[Event], dict[str, str]]:
    """The events of the first call: from its a-leg's first event to its CS_DESTROY, with leg roles."""
    a_leg = next(e.unique_id for e in events if e.name == "CHANNEL_CREATE" and e.get("Call-Direction") == "inbound")
    b_leg = next(
        (e.unique_id for e in events if e.name == "CHANNEL_CREATE" and e.get("Call-Direction") == "outbound"), None
    )
    assert a_leg
    roles = {a_leg: "a"}
    if b_leg:
        roles[b_leg] = "b"
    start = next(i for i, e in enumerate(events) if e.unique_id == a_leg)
    end = max(
        i
        for i, e in enumerate(events)
        if e.unique_id == a_leg and e.name == "CHANNEL_STATE" and e.get("Channel-State") == "CS_DESTROY"
    )
    window = [
        e
        for e in events[start : end + 1]
        if e.unique_id in roles or e.name == "API" or (e.name == "CUSTOM" and e.unique_id is None)
    ]
    return window, roles


def shape(event: Event, roles: dict[str, str]) -> tuple[str, str, str]:
    return (event.name, event.subclass or "", roles.get(event.unique_id or "", "-"))


def header_names(event: Event, *, ignore: frozenset[str] = frozenset()) -> list[str]:
    return [name for name in event.headers.names() if not name.startswith(VARIABLE_PREFIX) and name not in ignore]


def variable_names(event: Event) -> set[str]:
    return {name[len(VARIABLE_PREFIX) :] for name in event.headers.names() if name.startswith(VARIABLE_PREFIX)}
