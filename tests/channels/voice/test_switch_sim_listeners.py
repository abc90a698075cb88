"""The simulator's event sockets under load: who is offered an event, and how frames reach the socket."""

from __future__ import annotations

import asyncio

from backend.channels.voice.esl import InboundClient
from backend.channels.voice.esl._models import Event
from backend.channels.voice.esl._wire import GOODBYE
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from backend.channels.voice.simulator._esl import MAX_MISSED, Listener
from backend.channels.voice.simulator._switch import Switch
from tests.channels.voice.support import until
from tests.channels.voice.test_conformance_inbound import simulator_config

FIRST = "5e1f0000-0000-4000-8000-00000000000a"
SECOND = "5e1f0000-0000-4000-8000-00000000000b"


async def _collect(client: InboundClient, into: list[Event]) -> None:
    async for event in client.events():
        into.append(event)


def _completed(events: list[Event]) -> set[str | None]:
    return {event.unique_id for event in events if event.name == "CHANNEL_HANGUP_COMPLETE"}


async def test_a_channels_myevents_socket_gets_only_its_channel_and_the_others_get_every_event():
    async with SwitchSimulator(simulator_config(time_scale=1.0)) as simulator:
        switch = simulator.switch
        assert await switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        everything: list[Event] = []
        mine: list[Event] = []
        async with (
            InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as watcher,
            InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as owner,
        ):
            await watcher.subscribe("CHANNEL_CREATE", "CHANNEL_PARK", "CHANNEL_HANGUP_COMPLETE")
            collectors = [
                asyncio.create_task(_collect(watcher, everything)),
                asyncio.create_task(_collect(owner, mine)),
            ]
            assert (await owner.api(f"originate {{origination_uuid={FIRST}}}user/1001 &park()")).ok
            assert (await owner.myevents(FIRST)).ok
            # `myevents` naming no channel there is binds to none: every event with a Unique-ID passes.
            reader, writer = await asyncio.open_connection("127.0.0.1", simulator.esl_port)
            writer.write(b"auth ClueCon\n\nmyevents 00000000-0000-4000-8000-0000000000ff\n\n")
            seen = b""
            async with asyncio.timeout(10):
                while b"+OK Events Enabled" not in seen:
                    seen += await reader.read(65536)
            assert (await owner.api(f"originate {{origination_uuid={SECOND}}}user/1001 &park()")).ok
            assert (await owner.api(f"uuid_kill {SECOND}")).ok
            assert (await owner.api(f"uuid_kill {FIRST}")).ok
            await until(lambda: _completed(everything) == {FIRST, SECOND})
            await until(lambda: _completed(mine) == {FIRST})
            async with asyncio.timeout(10):
                while not all(f"Unique-ID: {uuid}".encode() in seen for uuid in (FIRST, SECOND)):
                    seen += await reader.read(65536)
            writer.close()
            for task in collectors:
                task.cancel()
            await asyncio.gather(*collectors, return_exceptions=True)
        assert {event.unique_id for event in everything} == {FIRST, SECOND}
        assert {event.unique_id for event in mine} == {FIRST}
        await until(lambda: len(switch.listeners) == 0)
        # A listener gone is gone from the index too: the channel's events are offered to nobody.
        assert not switch.listeners._bound and not switch.listeners._unbound


class _Transport:
    def get_write_buffer_size(self) -> int:
        return 0


class _Writer:
    """What the listener does to its socket, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.transport = _Transport()

    def get_extra_info(self, name: str) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.calls.append(("close", b""))


async def test_frames_of_one_loop_iteration_go_out_in_one_write_in_order_and_before_a_close():
    switch = Switch(simulator_config())
    writer = _Writer()
    listener = Listener(switch, asyncio.StreamReader(), writer)  # type: ignore[arg-type]
    switch.listeners.add(listener)
    listener.subscribe(["plain", "HEARTBEAT"])
    switch.fire_heartbeat()
    listener.reply("+OK after")
    assert writer.calls == []
    await asyncio.sleep(0)
    [(kind, data)] = writer.calls
    assert kind == "write"
    assert data.startswith(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n")
    assert data.count(b"Content-Type: text/event-plain") == 1 and b"Event-Name: HEARTBEAT\n" in data
    assert data.endswith(b"Content-Type: command/reply\nReply-Text: +OK after\n\n")
    writer.calls.clear()
    listener.reply("+OK bye")
    listener.goodbye()
    listener.reply("+OK too late")
    switch.fire_heartbeat()
    await asyncio.sleep(0)
    notice = f"Content-Type: text/disconnect-notice\nContent-Length: {len(GOODBYE)}\n\n{GOODBYE}".encode()
    assert writer.calls == [
        ("write", b"Content-Type: command/reply\nReply-Text: +OK bye\n\n" + notice),
        ("close", b""),
    ]
    assert listener not in switch.listeners


async def test_a_listener_that_does_not_keep_up_loses_events_and_is_killed_past_max_missed():
    """Frames queued and not yet written count as FreeSWITCH's event queue, as the socket's own buffer does."""
    switch = Switch(simulator_config(event_queue_size=1))
    writer = _Writer()
    listener = Listener(switch, asyncio.StreamReader(), writer)  # type: ignore[arg-type]
    switch.listeners.add(listener)
    listener.subscribe(["plain", "HEARTBEAT"])
    for _ in range(MAX_MISSED + 10):
        switch.fire_heartbeat()
    assert listener.lost == MAX_MISSED + 1 and listener.closed.is_set()
    assert listener not in switch.listeners
    [(kind, data), closing] = writer.calls
    assert kind == "write" and data.count(b"Event-Name: HEARTBEAT\n") >= 1
    assert closing == ("close", b"")
