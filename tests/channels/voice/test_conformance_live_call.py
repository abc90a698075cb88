"""The simulator against e01-e04: API commands on a live bridged call, filters, and a supervisor's eavesdrop."""

from __future__ import annotations

import asyncio
import difflib
import json

import pytest

from backend.channels.voice.esl import ClientConfig, Event, InboundClient
from backend.channels.voice.simulator import Endpoint, SwitchSimulator
from tests.channels.voice.conformance import captured_events, header_names
from tests.channels.voice.support import until
from tests.channels.voice.test_conformance_inbound import simulator_config
from tests.support.freeswitch_captures import fixture, transcript

pytestmark = pytest.mark.integration

EAVESDROPPER = "2e05184c-b0af-47ad-a1cc-08a34ec0c439"


async def collect_until_destroyed(client: InboundClient, uuid: str, into: list[Event]) -> None:
    async for event in client.events():
        into.append(event)
        if event.unique_id == uuid and event.name == "CHANNEL_STATE" and event.get("Channel-State") == "CS_DESTROY":
            return


async def test_live_call_commands_filters_and_eavesdrop_match_e01_to_e04():
    plain = ClientConfig(event_format="plain")
    async with SwitchSimulator(simulator_config(time_scale=1.0)) as simulator:
        switch = simulator.switch
        assert await switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        a_leg = await switch.place_call("7403", from_user="1000", caller_name="sipp")
        await until(lambda: (leg := switch.find(a_leg)) is not None and leg.channel.partner is not None)

        commands = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon")
        on_target = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=plain)
        on_eavesdropper = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon", config=plain)
        for client in (commands, on_target, on_eavesdropper):
            await client.start(timeout=5)
        await on_target.add_filter("Unique-ID", a_leg)  # e02: filter first, then event plain ALL
        await on_target.subscribe("ALL")
        await on_eavesdropper.add_filter("Unique-ID", EAVESDROPPER)
        await on_eavesdropper.subscribe("ALL")
        target_events: list[Event] = []
        eavesdropper_events: list[Event] = []
        watchers = [
            asyncio.create_task(collect_until_destroyed(on_target, a_leg, target_events)),
            asyncio.create_task(collect_until_destroyed(on_eavesdropper, EAVESDROPPER, eavesdropper_events)),
        ]

        # e01: the same commands get answers of the same shape.
        channels = (await commands.api("show channels as json")).json()
        captured = transcript(fixture("api_and_live_call/e01_api_show_dump_eavesdrop_kill.esl"))
        captured_rows = next(r for r in captured if r["seq"] == 4)["data"].split("\n\n", 1)[1]
        assert channels["row_count"] == 2
        assert list(channels["rows"][0]) == list(json.loads(captured_rows)["rows"][0])
        registrations = (await commands.api("show registrations as json")).json()
        captured_regs = json.loads(next(r for r in captured if r["seq"] == 8)["data"].split("\n\n", 1)[1])
        assert list(registrations["rows"][0]) == list(captured_regs["rows"][0])
        dump = (await commands.api(f"uuid_dump {a_leg} json")).json()
        assert dump["Event-Name"] == "CHANNEL_DATA" and dump["Unique-ID"] == a_leg
        originated = await commands.api(
            f"originate {{origination_uuid={EAVESDROPPER}}}loopback/7498/default &eavesdrop({a_leg})"
        )
        assert originated.text == f"+OK {EAVESDROPPER}"
        await until(lambda: any(e.get("Application") == "eavesdrop" for e in eavesdropper_events))
        assert (await commands.api("show channels as json")).json()["row_count"] == 3
        assert (await commands.api(f"uuid_kill {EAVESDROPPER}")).text == "+OK"
        assert (await commands.api("uuid_kill 00000000-0000-4000-8000-000000000000")).text == "-ERR No such channel!"
        no_channel = await commands.api("sched_hangup +2 00000000-0000-4000-8000-000000000000 NORMAL_CLEARING")
        assert no_channel.text == "-ERR No such channel!"
        await until(lambda: any(e.name == "MEDIA_BUG_STOP" for e in target_events))
        assert (await commands.api(f"sched_hangup +0 {a_leg} NORMAL_CLEARING")).text == "+OK"
        async with asyncio.timeout(10):
            await asyncio.gather(*watchers)
        for client in (commands, on_target, on_eavesdropper):
            await client.close()

    for mine, capture in (
        (target_events, "e02_filter_unique_id.esl"),
        (eavesdropper_events, "e04_eavesdrop_events.esl"),
    ):
        expected = captured_events(f"api_and_live_call/{capture}")
        assert [e.name for e in mine] == [e.name for e in expected], capture
        problems = []
        for ours, theirs in zip(mine, expected, strict=True):
            if header_names(ours) != header_names(theirs):
                diff = difflib.unified_diff(header_names(theirs), header_names(ours), lineterm="", n=0)
                problems.append((ours.name, [d for d in diff if d[:1] in "+-" and d[:3] not in ("---", "+++")]))
        assert not problems, problems
