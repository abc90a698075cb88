"""Leg facts read from FreeSWITCH's real documents: the hang-up event and mod_json_cdr agree on every leg."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from backend.channels.voice import legs
from backend.channels.voice.legs import (
    LegError,
    e164,
    leg_from_event,
    leg_from_json_cdr,
    leg_from_live,
    live_fields,
)
from backend.channels.voice.xml_documents import switch_text
from tests.support.freeswitch_captures import A_LEG, B_LEG, a08_events, json_cdr

pytestmark = pytest.mark.unit


def _hangup(leg: str) -> dict:
    return next(e for e in a08_events() if e["Event-Name"] == "CHANNEL_HANGUP_COMPLETE" and e["Unique-ID"] == leg)


def _posted(name: str) -> dict:
    return json.loads(json_cdr(name)[1])


def _at(micros: int) -> datetime:
    return datetime.fromtimestamp(micros / 1_000_000, UTC)


def test_a_leg_from_the_hangup_event():
    leg = leg_from_event(_hangup(A_LEG))
    assert leg.leg_uuid == uuid.UUID(A_LEG)
    assert leg.call_uuid == leg.leg_uuid and leg.is_caller_leg
    assert leg.direction == "inbound"
    assert leg.node_name == "fs-node-1"
    assert (leg.caller_number, leg.caller_name, leg.destination_number) == ("1000", "sipp", "7400")
    assert leg.started_at == _at(1795413797228968)
    assert leg.answered_at == _at(1795413797228968)
    assert leg.bridged_at == _at(1795413799908956)
    assert leg.ringing_at == _at(1795413797228968)  # early media came before the 180 of the b-leg
    assert leg.ended_at == _at(1795413805768939)
    assert leg.billable_ms == 8540  # FreeSWITCH's own billmsec for this leg
    assert (leg.hangup_cause, leg.hangup_cause_q850) == ("NORMAL_CLEARING", 16)
    assert leg.disposition == "answered"
    assert leg.domains == ("127.0.0.1",)
    assert leg.details["sip_hangup_disposition"] == "recv_bye"


def test_b_leg_names_the_call_it_belongs_to():
    leg = leg_from_event(_hangup(B_LEG))
    assert leg.direction == "outbound"
    assert leg.call_uuid == uuid.UUID(A_LEG)
    assert not leg.is_caller_leg
    assert leg.destination_number == "1001"
    assert leg.billable_ms == 5860  # billmsec of the b-leg
    assert leg.domains == ("127.0.0.1",)  # dialed_domain


@pytest.mark.parametrize(
    ("event_leg", "posted"),
    [(A_LEG, "d01_cdr_a_leg_scenario_call_7400.request.txt"), (B_LEG, "d02_cdr_b_leg_scenario_call_7400.request.txt")],
)
def test_event_and_json_cdr_describe_the_same_leg_identically(event_leg, posted):
    """Both sources of a leg give the same facts, so storing either (or both) gives the same CDR."""
    from_event = leg_from_event(_hangup(event_leg))
    from_json = leg_from_json_cdr(_posted(posted))
    assert from_json == from_event


def test_encoded_values_are_decoded_and_plain_ones_left_alone():
    """mod_json_cdr URL-encodes values with encode-values=true (the default); with false they arrive plain."""
    document = _posted("d03_cdr_a_leg_outbound_socket_7401.request.txt")
    encoded = leg_from_json_cdr(document)
    plain_variables = {k: v.replace("%20", " ").replace("%3A", ":") for k, v in document["variables"].items()}
    plain_variables["caller_id"] = "100% real"
    plain = leg_from_json_cdr({**document, "variables": plain_variables})
    assert encoded.started_at == plain.started_at == _at(1795413843088934)
    assert "%40" not in encoded.details["sip_call_id"] and "@" in encoded.details["sip_call_id"]
    assert plain.caller_name == encoded.caller_name == "sipp"


def test_loopback_legs_of_the_retried_post():
    leg = leg_from_json_cdr(_posted("d04_cdr_post_answered_500_try1.request.txt"))
    assert leg.leg_uuid == uuid.UUID("be8eca59-0658-4698-8142-5884a677f46f")
    assert leg.destination_number == "7499"
    assert leg.bridged_at is None and leg.ringing_at is None


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"variables": "nope"},
        {"variables": {"uuid": "not-a-uuid", "start_uepoch": "1"}},
        {"variables": {"uuid": A_LEG}},
        {"variables": {"uuid": A_LEG, "start_uepoch": "0"}},
    ],
)
def test_documents_that_are_not_legs_are_refused(broken):
    with pytest.raises(LegError):
        leg_from_json_cdr(broken)


def test_event_values_are_cleaned():
    event = dict(_hangup(A_LEG))
    event["Caller-Caller-ID-Name"] = "evil\x00name\r\n" + "x" * 500
    leg = leg_from_event(event)
    assert "\x00" not in leg.caller_name and "\n" not in leg.caller_name
    assert len(leg.caller_name) == 120


def test_live_fields_rebuild_a_leg_without_its_hangup():
    """What channel events told about a leg is enough to close it if its node is lost."""
    fields: dict[str, str] = {}
    for event in a08_events():
        if event.get("Unique-ID") == A_LEG and event["Event-Name"] in {
            "CHANNEL_CREATE",
            "CHANNEL_ANSWER",
            "CHANNEL_BRIDGE",
        }:
            fields.update(live_fields(event))
    leg = leg_from_live(A_LEG, fields)
    assert leg.started_at == _at(1795413797228968)
    assert leg.answered_at == _at(1795413797228968)
    assert leg.bridged_at == _at(1795413799908956)
    assert leg.ended_at is None
    closed = leg.closed(_at(1795413803000000))
    assert closed.disposition == "node_failure"
    assert closed.billable_ms == 5771


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+33142685300", "+33142685300"),
        ("33142685300", "+33142685300"),
        ("0033142685300", "+33142685300"),
        ("7400", None),
        ("+999", None),
        ("sip:1000@x", None),
        ("", None),
    ],
)
def test_dialled_numbers_in_e164(raw, expected):
    assert e164(raw) == expected
    assert e164(raw) == expected  # the second answer is the kept one


def test_e164_keeps_a_bounded_number_of_answers_and_no_long_text():
    assert e164(" 0033142685301 ") == "+33142685301"
    assert " 0033142685301 " in legs._E164_SEEN
    long = "1" * 30 + "x"
    assert e164(long) is None and long not in legs._E164_SEEN
    for n in range(legs._E164_SEEN.limit + 10):
        e164(f"+1415555{n:04d}")
    assert len(legs._E164_SEEN) == legs._E164_SEEN.limit


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Alice Agent", "Alice Agent"),
        ("${system(rm -rf /)}", "system(rm -rf /)"),
        ('Bob" <sip:x>', "Bob sip:x"),
        ("$${global}", "global"),
        ("a\\b^^:c|d", "ab:cd"),
        ("line\nbreak\ttab", "line break tab"),
        ("王小明", "王小明"),
    ],
)
def test_switch_text_leaves_nothing_freeswitch_interprets(raw, expected):
    assert switch_text(raw) == expected
