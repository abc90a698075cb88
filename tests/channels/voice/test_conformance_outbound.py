"""The simulator's outbound `socket` connections against b01/b02, driven by our OutboundServer."""

from __future__ import annotations

import asyncio
import uuid as uuidlib

import pytest

from backend.channels.voice.esl import ClientConfig, DisconnectNotice, Event, OutboundServer, OutboundSession
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from tests.channels.voice.conformance import captured_events, header_names, variable_names
from tests.channels.voice.support import BackendStandIn, fixture_responder, socket_dialplan, until
from tests.channels.voice.test_conformance_inbound import simulator_config
from tests.support.freeswitch_captures import fixture

pytestmark = pytest.mark.integration

PAGD = "1 1 1 5000 # tone_stream://%(200,0,600) silence_stream://250 fixture_digit \\d"
# Our execute() adds its own Event-UUID to each sendmsg (to match CHANNEL_EXECUTE_COMPLETE by Application-UUID);
# FreeSWITCH echoes sendmsg headers in PRIVATE_COMMAND, so that one header is ours, not the switch's.
OUR_HEADERS = frozenset({"Event-UUID"})


def roles_of(events: list[Event], a_leg: str, b_leg: str | None) -> list[tuple[str, str]]:
    roles = {a_leg: "a", b_leg: "b"}
    return [(e.name, roles.get(e.unique_id or "", "-")) for e in events]


def canonical(events: list[Event], a_leg: str) -> list[Event]:
    """Each leg's CALL_UPDATE comes from its own thread: a08 shows a then b, b01 b then a. Order them a, b."""
    result = list(events)
    for index in range(len(result) - 1):
        first, second = result[index], result[index + 1]
        if first.name == second.name == "CALL_UPDATE" and second.unique_id == a_leg:
            result[index], result[index + 1] = second, first
    return result


async def run_outbound(handler, destination: str = "7401"):
    """Place a call whose dialplan says `socket` to our OutboundServer; return what the session saw."""
    seen: dict[str, object] = {}

    async def wrapped(session: OutboundSession) -> None:
        events: list[Event] = SEEN.setdefault(id(session), [])
        seen["session"] = session
        seen["events"] = events

        async def collect() -> None:
            async for event in session.events():
                events.append(event)

        collector = asyncio.create_task(collect())
        await handler(session, simulator.switch)
        await session.wait_closed()
        await collector

    server = OutboundServer(
        wrapped, "127.0.0.1", 0, config=ClientConfig(event_format="plain"), myevents=False, linger=False
    )
    await server.start()
    backend = BackendStandIn(fixture_responder(socket_dialplan(server.port, destination)))
    await backend.start()
    async with SwitchSimulator(simulator_config(xml_curl_url=f"{backend.url}/fsapi")) as simulator:
        assert await simulator.switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        uuid = await simulator.switch.place_call(destination, from_user="1000", caller_name="sipp")
        await until(lambda: "events" in seen and seen["session"].closed, timeout=20)  # type: ignore[union-attr]
        await asyncio.sleep(0.1)
    await server.close()
    await backend.close()
    seen["uuid"] = uuid
    return seen


async def test_outbound_socket_with_linger_matches_b01():
    b_leg = str(uuidlib.uuid4())

    async def handler(session: OutboundSession, switch) -> None:
        assert session.socket_mode == "async" and session.control == "full"
        assert session.channel.name == "CHANNEL_DATA"
        assert session.variable("current_application") == "socket"
        await session.linger()
        await session.subscribe("ALL", event_format="plain")
        await session.add_filter("Unique-ID", session.uuid)
        await session.add_filter("Unique-ID", b_leg)
        await session.answer()
        await session.set_variable("fixture_var", "hello world")
        await session.execute("playback", "tone_stream://%(500,500,440);loops=2")
        await session.execute("speak", "flite|kal|Hello")

        async def press_after_prompt() -> None:
            await until(lambda: sum(1 for e in seen_events(session) if e.name == "PLAYBACK_STOP") >= 2)
            switch.press(session.uuid, "7", "INFO")

        presser = asyncio.create_task(press_after_prompt())
        done = await session.execute("play_and_get_digits", PAGD)
        await presser
        assert done.variable("fixture_digit") == "7"
        await session.execute("record_session", "$${recordings_dir}/fixture_outbound_${uuid}.wav")
        bridge = asyncio.create_task(session.execute("bridge", f"{{origination_uuid={b_leg}}}user/1001@127.0.0.1"))
        await until(lambda: any(e.name == "CALL_UPDATE" and e.unique_id == session.uuid for e in seen_events(session)))
        assert (await session.api(f"uuid_kill {b_leg}")).text == "+OK"
        completed = await bridge
        assert completed.get("Application") == "bridge"
        await session.hangup("NORMAL_CLEARING")

    seen = await run_outbound(handler)
    session: OutboundSession = seen["session"]  # type: ignore[assignment]
    events: list[Event] = seen["events"]  # type: ignore[assignment]
    expected = captured_events("outbound_esl/b01_outbound_socket_linger.esl")
    a_capture = expected[0].unique_id
    b_capture = next(e.unique_id for e in expected if e.name == "CHANNEL_CREATE")
    expected = canonical(expected, a_capture)
    events = canonical(events, session.uuid)
    assert roles_of(events, session.uuid, b_leg) == roles_of(expected, a_capture, b_capture)
    for mine, theirs in zip(events, expected, strict=True):
        assert header_names(mine, ignore=OUR_HEADERS) == header_names(theirs), mine.name
    # The connect reply carried the channel's data; fixture_var and the socket variables show in HANGUP_COMPLETE.
    hangup_complete = next(e for e in events if e.name == "CHANNEL_HANGUP_COMPLETE" and e.unique_id == session.uuid)
    assert {"fixture_var", "socket_host", "fixture_digit", "record_seconds"} <= variable_names(hangup_complete)
    # Linger: the notice came after HANGUP_COMPLETE, with an empty body, and the socket closed (no DESTROY).
    notice = session.disconnect_notice
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition == "linger" and notice.linger_time == -1 and notice.body == ""
    assert notice.controlled_session_uuid == session.uuid
    captured_notice = fixture("outbound_esl/b01_outbound_socket_linger.esl").read_bytes().rsplit(b"Content-Type:", 1)[1]
    assert [line.split(":")[0] for line in captured_notice.decode().splitlines()[1:] if line] == [
        name for name in notice.headers.names() if name != "Content-Type"
    ]


def seen_events(session: OutboundSession) -> list[Event]:
    return SEEN.setdefault(id(session), [])


SEEN: dict[int, list[Event]] = {}


async def test_outbound_socket_nolinger_matches_b02():
    async def handler(session: OutboundSession, switch) -> None:
        assert (await session.myevents("plain")).text == "+OK Events Enabled"
        assert (await session.linger(5)).text == "+OK will linger 5 seconds"
        assert (await session.nolinger()).text == "+OK will not linger"
        assert await session.getvar("sip_from_user") == "1000"
        await session.answer()
        await session.execute("playback", "tone_stream://%(300,200,440);loops=1")
        await session.hangup()

    seen = await run_outbound(handler, "7402")
    session: OutboundSession = seen["session"]  # type: ignore[assignment]
    events: list[Event] = seen["events"]  # type: ignore[assignment]
    expected = captured_events("outbound_esl/b02_outbound_socket_nolinger.esl")
    assert roles_of(events, session.uuid, None) == roles_of(expected, expected[0].unique_id, None)
    for mine, theirs in zip(events, expected, strict=True):
        assert header_names(mine) == header_names(theirs), mine.name
    notice = session.disconnect_notice
    assert isinstance(notice, DisconnectNotice)
    assert notice.disposition == "disconnect" and len(notice.body.encode()) == 67
