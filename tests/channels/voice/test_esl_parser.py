"""The sans-IO ESL parsers against every captured byte stream, whole, fragmented and coalesced."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.channels.voice.esl import (
    ApiResponse,
    CommandParser,
    CommandReply,
    DisconnectNotice,
    Event,
    FrameParser,
    LogLine,
    ProtocolError,
    RudeRejection,
    decode_frame,
    url_encode,
)
from backend.channels.voice.esl._wire import encode_command, event_frame, serialize_plain
from tests.support.freeswitch_captures import esl_files, fixture, transcript

pytestmark = pytest.mark.unit

ESL_FILES = esl_files()
STREAMS = {path.name: path.read_bytes() for path in ESL_FILES}


def frame_bytes(frame) -> bytes:
    head = "".join(f"{name}: {value}\n" for name, value in frame.headers)
    return (head + "\n").encode() + frame.body


@pytest.mark.parametrize("path", ESL_FILES, ids=lambda p: p.name)
def test_every_captured_frame_parses_and_matches_the_transcript(path):
    data = path.read_bytes()
    parser = FrameParser()
    frames = parser.feed(data)
    assert parser.buffered == 0
    received = [record for record in transcript(path) if record["dir"] == "recv"]
    assert len(frames) == len(received)
    for frame, record in zip(frames, received, strict=True):
        assert frame.content_type == record["content_type"]
        assert frame_bytes(frame) == record["data"].encode()
        message = decode_frame(frame)
        kind = record["content_type"]
        if kind.startswith("text/event-"):
            assert isinstance(message, Event) and message.name
        elif kind == "command/reply":
            assert isinstance(message, CommandReply)
        elif kind == "api/response":
            assert isinstance(message, ApiResponse)
        elif kind == "text/disconnect-notice":
            assert isinstance(message, DisconnectNotice)
        elif kind == "log/data":
            assert isinstance(message, LogLine)
        elif kind == "text/rude-rejection":
            assert isinstance(message, RudeRejection)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(STREAMS)), cuts=st.lists(st.integers(min_value=0), max_size=200))
def test_fragmented_and_coalesced_reads_give_the_same_frames(name, cuts):
    data = STREAMS[name]
    expected = FrameParser().feed(data)
    parser = FrameParser()
    frames = []
    for piece in _chunks(data, cuts):
        frames.extend(parser.feed(piece))
    assert frames == expected
    assert parser.buffered == 0


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=50))
def test_byte_by_byte_and_tiny_reads(sizes):
    data = STREAMS["a07_bgapi_event_plain.esl"] + STREAMS["a12_misc_command_replies.esl"]
    expected = FrameParser().feed(data)
    parser = FrameParser()
    frames, position, index = [], 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        frames.extend(parser.feed(data[position : position + size]))
        position += size
        index += 1
    assert frames == expected


def test_json_and_plain_captures_of_the_same_call_decode_to_the_same_events():
    def events(name):
        frames = FrameParser().feed(fixture(f"inbound_esl/{name}").read_bytes())
        return [m for m in map(decode_frame, frames) if isinstance(m, Event)]

    as_json = events("a08_event_json_all_scenario_call.esl")
    as_plain = events("a09_event_plain_all_scenario_call.esl")
    assert [e.name for e in as_json] == [e.name for e in as_plain]
    for j, p in zip(as_json, as_plain, strict=True):
        assert j.headers.names() == p.headers.names()
        assert j.body == p.body
        # Both connections saw the same event objects; values that were URL-encoded decode back equal.
        if j.name not in ("CHANNEL_STATE", "HEARTBEAT", "RE_SCHEDULE") and j.get("Event-Sequence") == p.get(
            "Event-Sequence"
        ):
            assert dict(j.headers) == dict(p.headers)


def test_url_encoding_and_plain_serialisation_reproduce_freeswitch_bytes():
    data = fixture("inbound_esl/a09_event_plain_all_scenario_call.esl").read_bytes()
    data += fixture("outbound_esl/b01_outbound_socket_linger.esl").read_bytes()
    checked = 0
    for frame in FrameParser().feed(data):
        if frame.content_type != "text/event-plain":
            continue
        event = decode_frame(frame)
        assert isinstance(event, Event)
        assert serialize_plain(list(event.headers.pairs), event.body) == frame.body
        assert event_frame("plain", list(event.headers.pairs), event.body) == frame_bytes(frame)
        checked += 1
    assert checked > 150


def test_json_serialisation_reproduces_freeswitch_bytes():
    from backend.channels.voice.esl._wire import serialize_json

    for frame in FrameParser().feed(fixture("inbound_esl/a08_event_json_all_scenario_call.esl").read_bytes()):
        if frame.content_type == "text/event-json":
            event = decode_frame(frame)
            assert serialize_json(list(event.headers.pairs), event.body) == frame.body


def test_connect_reply_is_a_url_encoded_channel_data_event():
    frames = FrameParser().feed(fixture("outbound_esl/b01_outbound_socket_linger.esl").read_bytes())
    reply = decode_frame(frames[0])
    assert isinstance(reply, CommandReply)
    assert reply.text == "+OK\n"
    assert reply.headers["Event-Name"] == "CHANNEL_DATA"
    assert reply.headers["Socket-Mode"] == "async" and reply.headers["Control"] == "full"
    assert reply.headers["Channel-Name"] == "sofia/internal/1000@127.0.0.1"
    assert reply.headers["variable_current_application_data"] == "127.0.0.1:8084 async full"


def test_linger_disconnect_notice():
    frames = FrameParser().feed(fixture("outbound_esl/b01_outbound_socket_linger.esl").read_bytes())
    notice = decode_frame(frames[-1])
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition == "linger" and notice.linger_time == -1 and notice.body == ""
    frames = FrameParser().feed(fixture("outbound_esl/b02_outbound_socket_nolinger.esl").read_bytes())
    notice = decode_frame(frames[-1])
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition == "disconnect" and len(notice.body.encode()) == 67


def test_bgapi_body_and_job_headers():
    for name, fmt in (("a06_bgapi_event_json.esl", "json"), ("a07_bgapi_event_plain.esl", "plain")):
        frames = FrameParser().feed(fixture(f"inbound_esl/{name}").read_bytes())
        jobs = [m for m in map(decode_frame, frames) if isinstance(m, Event)]
        assert [j.format for j in jobs] == [fmt] * 3
        assert jobs[1].job_uuid == f"6f1c3e2a-0000-4000-8000-00000000000{1 if fmt == 'json' else 2}"
        assert jobs[0].body and jobs[0].body.startswith("UP 0 years")
        assert jobs[2].body == "-ERR no_such_command Command not found!\n"
        assert "Content-Length" not in jobs[0].headers


@pytest.mark.parametrize("path", ESL_FILES, ids=lambda p: p.name)
def test_commands_the_clients_sent_parse_as_the_switch_reads_them(path):
    sent = [record["data"] for record in transcript(path) if record["dir"] == "send"]
    parser = CommandParser()
    commands = parser.feed("".join(sent).encode())
    assert [c.line for c in commands] == [s.split("\n", 1)[0] for s in sent]


def test_command_encoding_refuses_injected_line_breaks():
    assert encode_command("api status") == b"api status\n\n"
    assert encode_command("bgapi status", [("Job-UUID", "x")]) == b"bgapi status\nJob-UUID: x\n\n"
    with pytest.raises(ValueError, match="line break"):
        encode_command("api originate x\n\nexit")
    with pytest.raises(ValueError, match="line break"):
        encode_command("sendmsg", [("execute-app-arg", "a\nb")])


def test_oversized_and_garbage_frames_are_protocol_errors():
    with pytest.raises(ProtocolError):
        FrameParser(max_body_bytes=10).feed(b"Content-Type: api/response\nContent-Length: 11\n\n")
    with pytest.raises(ProtocolError):
        FrameParser().feed(b"Content-Type: api/response\nContent-Length: -1\n\n")
    with pytest.raises(ProtocolError):
        FrameParser(max_header_bytes=100).feed(b"X-A: " + b"a" * 200)
    with pytest.raises(ProtocolError):
        FrameParser().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\n\n")
    parser = FrameParser()
    assert parser.feed(b"Content-Type: api/response\nContent-Length: 10\n\nabc") == []
    assert parser.buffered == 3  # truncated: the client logs it at EOF


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(data):
    parser = FrameParser(max_header_bytes=1000, max_body_bytes=1000)
    with contextlib.suppress(ProtocolError):
        for frame in parser.feed(data):
            with contextlib.suppress(ProtocolError):
                decode_frame(frame)


@given(value=st.text(max_size=60))
def test_url_encode_is_undone_by_percent_decoding(value):
    from urllib.parse import unquote

    encoded = url_encode(value)
    assert "\n" not in encoded and " " not in encoded
    if "%" not in value:
        assert unquote(encoded) == value


def test_json_event_lists_become_freeswitch_array_strings():
    frames = FrameParser().feed(fixture("inbound_esl/a08_event_json_all_scenario_call.esl").read_bytes())
    events = [m for m in map(decode_frame, frames) if isinstance(m, Event) and m.variable("DP_MATCH")]
    assert events[0].variable("DP_MATCH") == "ARRAY::DELAYED NEGOTIATION|:DELAYED NEGOTIATION"
