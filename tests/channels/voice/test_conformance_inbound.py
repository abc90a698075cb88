"""The simulator against the captures: the a08/a09 call over inbound ESL, command replies and framing quirks."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from backend.channels.voice.esl import (
    AccessDenied,
    AuthenticationError,
    ClientConfig,
    Event,
    FrameParser,
    InboundClient,
    decode_frame,
)
from backend.channels.voice.simulator import Endpoint, SimulatorConfig, SwitchSimulator
from tests.channels.voice.conformance import call_window, captured_events, header_names, shape, variable_names
from tests.channels.voice.support import A08_DIALPLAN, BackendStandIn, fixture_responder
from tests.support.freeswitch_captures import fixture, transcript

pytestmark = pytest.mark.integration

# Variables the backend reads from channel events; wherever the capture carries one, the simulator must too.
KEY_VARIABLES = frozenset(
    {
        "uuid",
        "call_uuid",
        "direction",
        "sip_from_user",
        "sip_to_user",
        "sip_req_user",
        "sip_call_id",
        "presence_id",
        "domain_name",
        "user_name",
        "user_context",
        "xml_curl_served",
        "dialed_user",
        "dialed_domain",
        "current_application",
        "current_application_data",
        "read_result",
        "fixture_digit",
        "playback_seconds",
        "playback_ms",
        "record_seconds",
        "record_ms",
        "record_completion_cause",
        "originate_disposition",
        "DIALSTATUS",
        "last_bridge_to",
        "bridge_uuid",
        "hangup_cause",
        "hangup_cause_q850",
        "start_epoch",
        "answer_epoch",
        "bridge_epoch",
        "end_epoch",
        "start_uepoch",
        "answer_uepoch",
        "end_uepoch",
        "duration",
        "billsec",
        "billmsec",
        "waitsec",
        "last_app",
        "last_arg",
        "originator",
        "originating_leg_uuid",
        "RFC2822_DATE",
        "export_vars",
    }
)


def simulator_config(**overrides) -> SimulatorConfig:
    values = {
        "esl_port": 0,
        "control_port": 0,
        "time_scale": 0.05,
        "heartbeat_interval": 0,
        "hostname": "fs-node-1",
        "answer_delay": 0.0,
    }
    values.update(overrides)
    return SimulatorConfig(**values)


async def run_a08_call(event_format: str) -> list[Event]:
    """Replay the a08 scenario against the simulator through our client; return the events received."""
    backend = BackendStandIn(fixture_responder(A08_DIALPLAN))
    await backend.start()
    config = simulator_config(xml_curl_url=f"{backend.url}/fsapi")
    async with SwitchSimulator(config) as simulator:
        switch = simulator.switch
        client = InboundClient(
            "127.0.0.1", simulator.esl_port, "ClueCon", config=ClientConfig(event_format=event_format)
        )
        await client.start(timeout=5)
        await client.subscribe("ALL")
        assert await switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        received: list[Event] = []
        uuid = await switch.place_call("7400", from_user="1000", caller_name="sipp")
        playbacks = 0
        async with asyncio.timeout(20):
            async for event in client.events():
                received.append(event)
                if event.name == "PLAYBACK_STOP" and event.unique_id == uuid:
                    playbacks += 1
                    if playbacks == 2:  # after play_and_get_digits' prompt the caller presses 0 (RFC 2833)
                        switch.press(uuid, "0", "RTP")
                if event.name == "CALL_UPDATE" and event.unique_id != uuid:
                    switch.press(uuid, "5", "INFO")  # SIP INFO during the bridge
                if event.name == "DTMF" and event.get("DTMF-Digit") == "5":
                    await switch.caller_hangup(uuid)  # the caller's BYE
                if (
                    event.name == "CHANNEL_STATE"
                    and event.unique_id == uuid
                    and event.get("Channel-State") == "CS_DESTROY"
                ):
                    break
        await client.close()
    await backend.close()
    return received


@pytest.mark.parametrize(
    ("capture", "event_format"),
    [
        ("inbound_esl/a08_event_json_all_scenario_call.esl", "json"),
        ("inbound_esl/a09_event_plain_all_scenario_call.esl", "plain"),
    ],
)
async def test_scenario_call_has_the_captured_event_order_and_header_names(capture, event_format):
    expected, expected_roles = call_window(captured_events(capture))
    actual, actual_roles = call_window(await run_a08_call(event_format))
    assert [shape(e, actual_roles) for e in actual] == [shape(e, expected_roles) for e in expected]
    for mine, theirs in zip(actual, expected, strict=True):
        assert mine.format == theirs.format == event_format
        assert header_names(mine) == header_names(theirs), f"{mine.name} ({shape(mine, actual_roles)})"
        wanted = variable_names(theirs) & KEY_VARIABLES
        missing = wanted - variable_names(mine)
        assert not missing, f"{mine.name}: variables missing {sorted(missing)}"


def _replies(data: bytes) -> list:
    return [decode_frame(frame) for frame in FrameParser().feed(data)]


async def _raw_session(port: int, sends: list[str]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    task = asyncio.create_task(read_all())
    await asyncio.sleep(0.05)
    for data in sends:
        writer.write(data.encode())
        await writer.drain()
        await asyncio.sleep(0.05)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, 2)
    writer.close()
    return bytes(received)


@pytest.mark.parametrize(
    "name", ["a01_auth_ok_exit", "a02_auth_fail", "a12_misc_command_replies", "a04_api_unknown_command"]
)
async def test_command_replies_match_the_capture_byte_for_byte(name):
    """Same commands, same replies: greeting, auth, exit's goodbye, event/filter/linger replies, unknown commands."""
    path = fixture(f"inbound_esl/{name}.esl")
    records = transcript(path)
    sends = [r["data"] for r in records if r["dir"] == "send"]
    async with SwitchSimulator(simulator_config()) as simulator:
        data = await _raw_session(simulator.esl_port, sends)
    expected = [r["data"] for r in records if r["dir"] == "recv"]
    actual = list(FrameParser().feed(data))
    actual_bytes = ["".join(f"{k}: {v}\n" for k, v in f.headers) + "\n" + f.body.decode() for f in actual]
    assert len(actual_bytes) == len(expected)
    for mine, theirs in zip(actual_bytes, expected, strict=True):
        if "sendevent" in theirs or "+OK a463" in theirs:
            assert mine.startswith("Content-Type: command/reply\nReply-Text: +OK ")
        else:
            assert mine == theirs


async def test_rude_rejection_for_a_host_outside_the_acl():
    async with SwitchSimulator(simulator_config(esl_allowed=("10.0.0.0/8",))) as simulator:
        data = await _raw_session(simulator.esl_port, [])
        assert data == fixture("inbound_esl/a13_rude_rejection_acl.esl").read_bytes()
        client = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon")
        with pytest.raises(AccessDenied):
            await client.connect()


async def test_wrong_password_is_an_authentication_error():
    async with SwitchSimulator(simulator_config()) as simulator:
        client = InboundClient("127.0.0.1", simulator.esl_port, "WrongPassword")
        with pytest.raises(AuthenticationError):
            await client.connect()
        assert not any(listener.authed for listener in simulator.switch.listeners)


async def test_api_and_bgapi_replies_match_the_captured_framing():
    async with SwitchSimulator(simulator_config()) as simulator:
        data = await _raw_session(
            simulator.esl_port,
            [
                "auth ClueCon\n\n",
                "event json BACKGROUND_JOB\n\n",
                "bgapi status\nJob-UUID: 6f1c3e2a-0000-4000-8000-000000000001\n\n",
                "api no_such_command arg1\n\n",
                "exit\n\n",
            ],
        )
    frames = FrameParser().feed(data)
    types = [f.content_type for f in frames]
    assert types == [
        "auth/request",
        "command/reply",
        "command/reply",
        "command/reply",
        "text/event-json",
        "api/response",
        "command/reply",
        "text/disconnect-notice",
    ]
    assert frames[3].get("Reply-Text") == "+OK Job-UUID: 6f1c3e2a-0000-4000-8000-000000000001"
    assert frames[3].get("Job-UUID") == "6f1c3e2a-0000-4000-8000-000000000001"
    job = decode_frame(frames[4])
    captured = captured_events("inbound_esl/a06_bgapi_event_json.esl")[1]
    assert header_names(job) == header_names(captured)
    assert frames[5].body == b"-ERR no_such_command Command not found!\n"
    # The event frame's outer Content-Length comes before its Content-Type, as FreeSWITCH writes it.
    assert [name for name, _ in frames[4].headers] == ["Content-Length", "Content-Type"]


async def test_heartbeat_and_registration_events_have_the_captured_headers():
    captured = captured_events("inbound_esl/a08_event_json_all_scenario_call.esl")
    wanted = {
        ("HEARTBEAT", ""): next(e for e in captured if e.name == "HEARTBEAT"),
        ("RE_SCHEDULE", ""): next(e for e in captured if e.name == "RE_SCHEDULE"),
        ("CUSTOM", "sofia::register"): next(e for e in captured if e.subclass == "sofia::register"),
        ("CUSTOM", "sofia::unregister"): next(e for e in captured if e.subclass == "sofia::unregister"),
    }
    backend = BackendStandIn(fixture_responder(A08_DIALPLAN))
    await backend.start()
    async with SwitchSimulator(simulator_config(heartbeat_interval=0.1, xml_curl_url=f"{backend.url}/fsapi")) as sim:
        client = InboundClient("127.0.0.1", sim.esl_port, "ClueCon")
        await client.start(timeout=5)
        await client.subscribe("HEARTBEAT", "RE_SCHEDULE", "CUSTOM", "sofia::register", "sofia::unregister")
        assert await sim.switch.register(Endpoint("1001", "127.0.0.1"))
        sim.switch.unregister("1001")
        seen: dict[tuple[str, str], Event] = {}
        async with asyncio.timeout(5):
            async for event in client.events():
                seen.setdefault((event.name, event.subclass or ""), event)
                if set(wanted) <= set(seen):
                    break
        await client.close()
    await backend.close()
    for key, theirs in wanted.items():
        assert header_names(seen[key]) == header_names(theirs), key
