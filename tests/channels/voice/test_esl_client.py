"""Our ESL client and outbound server against the simulator and against misbehaving peers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from backend.channels.voice.esl import (
    Backoff,
    ChannelGone,
    ClientConfig,
    CommandError,
    ConnectionLost,
    InboundClient,
    OutboundServer,
    OutboundSession,
    ProtocolError,
    Timeout,
)
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from tests.channels.voice.support import BackendStandIn, fixture_responder, socket_dialplan, until
from tests.channels.voice.test_conformance_inbound import simulator_config

pytestmark = pytest.mark.integration

FAST = ClientConfig(
    connect_timeout=2,
    command_timeout=1,
    api_timeout=2,
    job_timeout=5,
    backoff=Backoff(initial=0.02, maximum=0.1, multiplier=2, jitter=0.2),
)


@pytest.mark.unit
def test_the_backends_settings_configure_the_client(monkeypatch):
    from backend.channels.voice.esl_config import client_config
    from backend.config import Settings

    monkeypatch.setenv("CC_ESL_COMMAND_TIMEOUT", "3")
    monkeypatch.setenv("CC_ESL_RECONNECT_MAX", "4")
    config = client_config(Settings())
    assert config.command_timeout == 3 and config.backoff.maximum == 4 and config.event_format == "json"


@pytest.mark.unit
def test_backoff_grows_exponentially_within_its_jitter_and_cap():
    backoff = Backoff(initial=0.5, maximum=30, multiplier=2, jitter=0.2)
    rng = random.Random(7)
    for attempt, base in enumerate([0.5, 1, 2, 4, 8, 16, 30, 30]):
        delay = backoff.delay(attempt, rng)
        assert base * 0.8 <= delay <= base * 1.2


async def test_api_bgapi_and_concurrent_jobs_are_matched_by_job_uuid():
    simulator = SwitchSimulator(simulator_config())
    await simulator.start()
    async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=FAST) as client:
        status = (await client.api("status")).raise_for_error()
        assert "is ready" in status.body
        unknown = await client.api("no_such_command arg1")
        assert not unknown.ok
        with pytest.raises(CommandError):
            unknown.raise_for_error()
        commands = [f"uuid_getvar 00000000-0000-4000-8000-{i:012d} x" for i in range(20)] + ["status"] * 5
        jobs = await asyncio.gather(*(client.bgapi(command) for command in commands))
        assert len({job.job_uuid for job in jobs}) == len(commands)
        results = await asyncio.gather(*(job.result() for job in jobs))
        assert all(r.body == "-ERR No such channel!\n" for r in results[:20])
        assert all("is ready" in r.body for r in results[20:])
        mine = await client.bgapi("status", job_uuid="6f1c3e2a-0000-4000-8000-000000000001")
        assert mine.job_uuid == "6f1c3e2a-0000-4000-8000-000000000001" and (await mine).ok
        # A filter would hide BACKGROUND_JOB; the client lets it through for its own jobs.
        await client.add_filter("Unique-ID", "00000000-0000-4000-8000-000000000000")
        assert (await (await client.bgapi("status")).result()).ok
        reply = await client.command("no_such_esl_command")
        assert reply.text == "-ERR command not found"
        with pytest.raises(CommandError):
            reply.raise_for_error()
    await simulator.stop()


async def test_reconnects_with_back_off_and_resubscribes_after_the_switch_restarts():
    connects: list[int] = []

    async def on_connect(client: InboundClient) -> None:
        connects.append(client.connections)
        # Where the switch-node manager re-reads the truth after (re)connecting.
        assert (await client.api("show channels as json")).json() == {"row_count": 0}

    simulator = SwitchSimulator(simulator_config())
    await simulator.start()
    port = simulator.esl_port
    client = InboundClient("127.0.0.1", port, "ClueCon", config=FAST, on_connect=on_connect)
    await client.start(timeout=5)
    await client.subscribe("HEARTBEAT")
    await simulator.stop()  # the node goes away
    await until(lambda: not client.connected)
    simulator = SwitchSimulator(simulator_config(esl_port=port))
    await simulator.start()  # and comes back on the same address
    await client.wait_connected(timeout=5)
    assert connects == [1, 2]
    simulator.switch.fire_heartbeat()
    async with asyncio.timeout(5):
        event = await anext(aiter(client.events()))
    assert event.name == "HEARTBEAT"
    await client.close()
    await simulator.stop()


async def test_a_slow_consumer_loses_events_but_never_blocks_the_reader():
    lost: list[int] = []
    config = ClientConfig(event_queue_size=5, command_timeout=2)
    async with SwitchSimulator(simulator_config()) as simulator:
        client = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=config, on_events_lost=lost.append)
        await client.start(timeout=5)
        await client.subscribe("HEARTBEAT")
        for _ in range(50):
            simulator.switch.fire_heartbeat()
        assert (await client.api("status")).ok  # replies still flow while nobody reads events
        await until(lambda: client.dropped_events >= 45)
        assert lost[-1] == client.dropped_events
        await client.close()


async def fake_switch(script) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_garbage_from_the_peer_is_a_protocol_error_with_a_log_line(caplog):
    async def script(reader, writer):
        writer.write(b"Content-Type: auth/request\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"HTTP/1.1 200 OK\r\nServer: not-freeswitch\r\n\r\n\n\n")
        await asyncio.sleep(1)

    server, port = await fake_switch(script)
    caplog.set_level(logging.ERROR, logger="backend.channels.voice.esl")
    client = InboundClient("127.0.0.1", port, "ClueCon", config=FAST)
    with pytest.raises((ProtocolError, ConnectionLost)):
        await client.connect()
    assert "not ESL" in caplog.text
    server.close()


async def test_an_unanswered_command_times_out_and_drops_the_connection():
    async def script(reader, writer):
        writer.write(b"Content-Type: auth/request\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled json\n\n")
        await asyncio.sleep(5)  # never answers the api command

    server, port = await fake_switch(script)
    client = InboundClient("127.0.0.1", port, "ClueCon", config=FAST)
    await client.connect()
    with pytest.raises(Timeout):
        await client.api("status", timeout=0.2)
    assert not client.connected
    server.close()


async def test_truncated_and_oversized_frames_close_the_connection():
    async def truncated(reader, writer):
        writer.write(b"Content-Type: auth/request\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled json\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: api/response\nContent-Length: 1000\n\npartial")

    server, port = await fake_switch(truncated)
    client = InboundClient("127.0.0.1", port, "ClueCon", config=FAST)
    await client.connect()
    with pytest.raises(ConnectionLost):
        await client.api("status")
    server.close()

    async def oversized(reader, writer):
        writer.write(b"Content-Type: auth/request\n\n")
        await reader.readuntil(b"\n\n")
        writer.write(b"Content-Type: command/reply\nContent-Length: 999999999999\n\n")
        await asyncio.sleep(1)

    server, port = await fake_switch(oversized)
    with pytest.raises((ProtocolError, ConnectionLost)):
        await InboundClient("127.0.0.1", port, "ClueCon", config=FAST).connect()
    server.close()


async def test_execute_on_a_parked_call_returns_its_execute_complete():
    async with SwitchSimulator(simulator_config()) as simulator:
        assert await simulator.switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=FAST) as client:
            await client.subscribe("CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE")
            reply = (await client.api("originate user/1001@127.0.0.1 &park()")).raise_for_error()
            uuid = reply.text.split()[1]
            done = await client.execute(uuid, "playback", "silence_stream://100", wait=True, timeout=5)
            assert done is not None and done.get("Application") == "playback" and done.unique_id == uuid
            assert done.get("Application-Response") == "FILE PLAYED"
            await client.hangup(uuid, "NORMAL_CLEARING")
            async with asyncio.timeout(5):
                async for event in client.events():
                    if event.name == "CHANNEL_HANGUP_COMPLETE" and event.unique_id == uuid:
                        assert event.get("Hangup-Cause") == "NORMAL_CLEARING"
                        break


async def test_outbound_execute_fails_with_channel_gone_when_the_node_dies():
    outcome: dict[str, object] = {}

    async def handler(session: OutboundSession) -> None:
        await session.answer()
        try:
            await session.execute("playback", "silence_stream://60000")
        except ChannelGone as error:
            outcome["error"] = error

    async with outbound_rig(handler, "7401", time_scale=1.0) as simulator:
        await simulator.switch.place_call("7401")
        await until(lambda: any(r.get("command") == "sendmsg" for r in simulator.switch.requests if r["kind"] == "esl"))
        await asyncio.sleep(0.1)
        await simulator.stop()
        await until(lambda: "error" in outcome)


@contextlib.asynccontextmanager
async def outbound_rig(
    handler: Callable[[OutboundSession], Awaitable[None]],
    number: str,
    *,
    time_scale: float,
    events: frozenset[str] | None = None,
) -> AsyncIterator[SwitchSimulator]:
    """Our outbound server running `handler`, a simulator whose dialplan sends `number` to it over `socket`."""
    server = OutboundServer(handler, "127.0.0.1", 0, config=FAST, events=events)
    await server.start()
    backend = BackendStandIn(fixture_responder(socket_dialplan(server.port, number)))
    await backend.start()
    simulator = SwitchSimulator(simulator_config(time_scale=time_scale, xml_curl_url=f"{backend.url}/fsapi"))
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()
        await server.close()
        await backend.close()


async def test_an_execute_the_peer_resets_fails_once_and_leaves_no_unretrieved_error():
    """After `hangup_after_bridge` the switch may reset the call's socket as we send our next command: the
    command fails with ConnectionLost (call control treats it as the caller gone), and the execution's own
    future, failed by the closing connection, is not left for asyncio to report at garbage collection."""
    import gc
    import socket
    import struct

    from backend.channels.voice.esl._connection import Connection

    async def reset_on_first_command(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset_on_first_command, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connection = Connection(reader, writer, FAST, name="reset-peer")
        with pytest.raises((ConnectionLost, ChannelGone)):
            await connection.execute("hangup", "NORMAL_CLEARING", uuid="3a5e5bd4-3f1c-4f8a-9d5e-2f1b6c7d8e9f")
        await connection.close()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous_handler)
        server.close()
    assert not [c for c in reported if "never retrieved" in str(c.get("message", ""))], reported


async def test_music_on_hold_from_a_local_stream_plays_until_it_is_broken():
    """mod_local_stream never ends a stream by itself: a `playback` of `local_stream://moh` lasts until
    `uuid_break` (or the hang-up), where a file of the same call ends on its own (2 s here, scaled)."""
    import time

    outcome: dict[str, object] = {}
    playing = asyncio.Event()

    async def handler(session: OutboundSession) -> None:
        await session.answer()
        outcome["uuid"] = session.uuid
        started = time.monotonic()
        await session.execute("playback", "silence_stream://500")
        outcome["file_seconds"] = time.monotonic() - started
        playing.set()
        started = time.monotonic()
        done = await session.execute("playback", "local_stream://moh")
        outcome["music_seconds"] = time.monotonic() - started
        outcome["response"] = done.get("Application-Response")

    async with outbound_rig(handler, "7402", time_scale=0.5) as simulator:
        await simulator.switch.place_call("7402")
        async with asyncio.timeout(5):
            await playing.wait()
        await asyncio.sleep(2.0)  # four times the 0.5 s file, twice the simulator's default file length
        assert "music_seconds" not in outcome
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=FAST) as client:
            (await client.api(f"uuid_break {outcome['uuid']}")).raise_for_error()
        await until(lambda: "music_seconds" in outcome)
    assert float(str(outcome["file_seconds"])) < 1.0
    assert float(str(outcome["music_seconds"])) >= 2.0 and outcome["response"] == "FILE PLAYED"


async def test_playback_timeout_sec_bounds_a_stream_as_freeswitch_does():
    """switch_ivr_play_file counts `playback_timeout_sec` (whole seconds, above 1) of media: a stream that never
    ends stops there, FILE PLAYED with `playback_timeout_as_success`, PLAYBACK ERROR (a timeout) without."""
    import time

    outcome: dict[str, object] = {}

    async def handler(session: OutboundSession) -> None:
        await session.answer()
        await session.execute("multiset", "^^|playback_timeout_sec=4|playback_timeout_as_success=true")
        started = time.monotonic()
        done = await session.execute("playback", "local_stream://moh")
        outcome["seconds"] = time.monotonic() - started
        outcome["as_success"] = done.get("Application-Response")
        await session.execute("set", "playback_timeout_as_success=false")
        done = await session.execute("playback", "local_stream://moh")
        outcome["plain"] = done.get("Application-Response")

    async with outbound_rig(handler, "7403", time_scale=0.25) as simulator:
        await simulator.switch.place_call("7403")
        await until(lambda: "plain" in outcome)
    assert 0.9 <= float(str(outcome["seconds"])) < 3.0  # 4 s of media at a quarter of real time
    assert outcome["as_success"] == "FILE PLAYED" and outcome["plain"] == "PLAYBACK ERROR"


async def test_a_session_keeps_only_the_events_its_handler_reads_and_execute_still_completes():
    """`events` nixes the rest of myevents' list after subscribing (one command, sent with linger and myevents
    before any answer): the handler's own applications still complete, no other event type arrives, and the
    hang-up still does."""
    wanted = frozenset({"CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP"})
    seen: list[str] = []
    outcome: dict[str, object] = {}

    async def handler(session: OutboundSession) -> None:
        async def watch() -> None:
            async for event in session.events():
                seen.append(event.name)

        watcher = asyncio.create_task(watch())
        await session.answer()
        done = await session.execute("playback", "silence_stream://200")
        outcome["played"] = done.get("Application-Response")
        await session.hangup("NORMAL_CLEARING")
        await session.wait_for_hangup(timeout=5)
        await asyncio.sleep(0.1)
        watcher.cancel()
        outcome["done"] = True

    async with outbound_rig(handler, "7404", time_scale=0.25, events=wanted) as simulator:
        await simulator.switch.place_call("7404")
        await until(lambda: "done" in outcome)
        commands = [r["command"] for r in simulator.switch.requests if r["kind"] == "esl"]
    assert outcome["played"] == "FILE PLAYED"
    assert set(seen) == wanted, seen
    nixed = next(command for command in commands if command.startswith("nixevent"))
    assert "CHANNEL_EXECUTE " in nixed + " " and "CHANNEL_STATE" in nixed and "CHANNEL_HANGUP " not in nixed + " "
    subscribed = next(i for i, command in enumerate(commands) if command.startswith("myevents"))
    assert commands.index(nixed) == subscribed + 1
