"""The switch simulator as a process and as a peer: control API, scenarios, load, recordings, API commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import wave

import httpx
import pytest

from backend.channels.voice.esl import ClientConfig, InboundClient
from backend.channels.voice.simulator import Endpoint, SwitchSimulator, load_scenario_file, run_scenario
from tests.channels.voice.support import until
from tests.channels.voice.test_conformance_inbound import simulator_config
from tests.support.freeswitch_captures import REPO_ROOT

pytestmark = pytest.mark.integration


async def test_switch_sim_runs_as_a_separate_process_with_a_control_api(tmp_path):
    environment = {
        **os.environ,
        "CC_SIM_ESL_PORT": "0",
        "CC_SIM_CONTROL_PORT": "0",
        "CC_SIM_TIME_SCALE": "0.01",
        "CC_SIM_HEARTBEAT": "0.2",
        "CC_SIM_RECORDINGS": str(tmp_path),
        "CC_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backend.cli",
        "switch-sim",
        "--password",
        "s3cret",
        "--hostname",
        "fs-sim-test",
        cwd=REPO_ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            ready = json.loads(await process.stdout.readline())
        assert ready["ready"] and ready["hostname"] == "fs-sim-test"
        control = f"http://127.0.0.1:{ready['control_port']}"
        client = InboundClient("127.0.0.1", ready["esl_port"], "s3cret", config=ClientConfig(command_timeout=5))
        await client.start(timeout=10)
        await client.subscribe("HEARTBEAT", "CHANNEL_HANGUP_COMPLETE", "CUSTOM", "sofia::register")
        async with httpx.AsyncClient(base_url=control, timeout=5) as http:
            assert (await http.get("/health")).json()["status"] == "ok"
            registered = await http.post("/registrations", json={"user": "1001", "transport": "wss"})
            assert registered.json() == {"registered": True}
            call = await http.post("/calls", json={"destination": "7499", "caller_number": "15550100"})
            uuid = call.json()["uuid"]
            names: set[str] = set()
            async with asyncio.timeout(10):
                async for event in client.events():
                    names.add(event.subclass or event.name)
                    if event.name == "CHANNEL_HANGUP_COMPLETE" and event.unique_id == uuid:
                        names.add(uuid)
                    if {"HEARTBEAT", "sofia::register", uuid} <= names:
                        break
            registrations = (await client.api("show registrations as json")).json()
            assert registrations["rows"][0]["reg_user"] == "1001"
            assert "transport=wss" in registrations["rows"][0]["url"]
            asked = (await http.get("/requests", params={"kind": "esl"})).json()["requests"]
            assert any(item["command"] == "api show registrations as json" for item in asked)
            assert (await http.post("/calls/nope/dtmf", json={"digits": "1"})).status_code == 404
        await client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0


SCENARIO = """
registrations:
  - {user: "1001", domain: "127.0.0.1", behaviour: answer, answer_delay: 0.5}
  - {user: "1002", domain: "127.0.0.1", behaviour: busy}
calls:
  - destination: "7400"
    caller_number: "4930123456"
    caller_name: Alice
    steps:
      - {after: 3, press: "0"}
      - {after: 2, press: "5", via: info}
      - {after: 1, hangup: true}
  - destination: "7498"
    caller_number: "4930999999"
    at: 0.5
    steps:
      - {after: 1, hangup: true}
"""


async def test_a_scenario_file_registers_phones_places_calls_presses_digits_and_abandons(tmp_path):
    path = tmp_path / "scenario.yaml"
    path.write_text(SCENARIO)
    scenario = load_scenario_file(path)
    async with SwitchSimulator(simulator_config(time_scale=0.05, recordings_dir=str(tmp_path))) as simulator:
        client = InboundClient("127.0.0.1", simulator.esl_port, "ClueCon")
        await client.start(timeout=5)
        await client.subscribe("DTMF", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_BRIDGE")
        uuids = await run_scenario(simulator.switch, scenario)
        seen = []
        async with asyncio.timeout(10):
            async for event in client.events():
                seen.append(event)
                if sum(1 for e in seen if e.name == "CHANNEL_HANGUP_COMPLETE" and e.unique_id in uuids) == 2:
                    break
        await client.close()
    digits = [e.get("DTMF-Digit") for e in seen if e.name == "DTMF" and e.unique_id == uuids[0]]
    assert digits == ["0", "5"]
    assert any(e.name == "CHANNEL_BRIDGE" and e.unique_id == uuids[0] for e in seen)
    first = next(e for e in seen if e.name == "CHANNEL_HANGUP_COMPLETE" and e.unique_id == uuids[0])
    assert first.variable("fixture_digit") == "0" and first.variable("read_result") == "success"
    recording = tmp_path / f"fixture_{uuids[0]}.wav"
    with wave.open(str(recording)) as audio:  # record_session wrote a real WAV file
        assert audio.getframerate() == 8000 and audio.getnframes() > 0
    assert first.variable("record_completion_cause") == "success-silence"


async def test_originate_outcomes_and_uuid_commands():
    config = simulator_config(ring_timeout=0.2, time_scale=1.0)
    async with SwitchSimulator(config) as simulator:
        switch = simulator.switch
        for user, behaviour in (("1001", "answer"), ("1002", "busy"), ("1003", "no_answer"), ("1004", "reject")):
            assert await switch.register(Endpoint(user, "127.0.0.1", behaviour=behaviour, answer_delay=0))
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as client:
            assert (await client.api("originate user/1002@127.0.0.1 &park()")).text == "-ERR USER_BUSY"
            assert (await client.api("originate user/1003@127.0.0.1 &park()")).text == "-ERR NO_ANSWER"
            assert (await client.api("originate user/1004@127.0.0.1 &park()")).text == "-ERR CALL_REJECTED"
            job = await client.bgapi(
                "originate {origination_uuid=5e1f0000-0000-4000-8000-000000000001}user/1001 &park()"
            )
            assert (await job).text == "+OK 5e1f0000-0000-4000-8000-000000000001"
            uuid = "5e1f0000-0000-4000-8000-000000000001"
            assert (await client.api(f"uuid_setvar {uuid} cc_interaction 42")).text == "+OK"
            assert (await client.api(f"uuid_getvar {uuid} cc_interaction")).text == "42"
            assert (await client.api(f"uuid_getvar {uuid} nothing")).text == "_undef_"
            dump = (await client.api(f"uuid_dump {uuid} json")).json()
            assert dump["Event-Name"] == "CHANNEL_DATA" and dump["variable_cc_interaction"] == "42"
            assert (await client.api(f"uuid_record {uuid} start /tmp/cc-sim-test.wav")).text == "+OK Success"
            assert (await client.api(f"uuid_hold {uuid}")).ok
            assert (await client.api(f"uuid_hold off {uuid}")).ok
            assert (await client.api(f"uuid_broadcast {uuid} silence_stream://10")).ok
            channels = (await client.api("show channels as json")).json()
            assert channels["row_count"] == 1 and channels["rows"][0]["uuid"] == uuid
            assert "internal" in (await client.api("sofia status")).body
            assert (await client.api("reloadxml")).text == "+OK [Success]"
            assert (await client.api("uuid_kill 00000000-0000-4000-8000-000000000000")).text == "-ERR No such channel!"
            assert (await client.api(f"sched_hangup +0 {uuid} ALLOTTED_TIMEOUT")).text == "+OK"
            await until(lambda: not switch.legs)


async def test_load_mode_places_calls_at_the_asked_rate():
    from backend.channels.voice.simulator import LoadPlan, Scenario

    async with SwitchSimulator(simulator_config(time_scale=0.01)) as simulator:
        plan = Scenario(load=LoadPlan(destination="7499", calls_per_second=40, duration=0.5, hold=1))
        await run_scenario(simulator.switch, plan)
        await until(lambda: not simulator.switch.legs)
        placed = simulator.switch.sessions_since_startup
    assert 15 <= placed <= 25


async def test_outside_parties_behind_a_gateway_and_the_caller_id_they_see():
    """sofia/gateway/<gw>/<number>: the far end answers, is busy, or does not exist (the carrier's 404); the
    bridging leg's effective_caller_id_number is what it sees unless origination_caller_id_number is given
    (switch_core_session_outgoing_channel, SOF_NO_EFFECTIVE_CID_NUM)."""
    config = simulator_config(ring_timeout=0.2, time_scale=1.0)
    async with SwitchSimulator(config) as simulator:
        switch = simulator.switch
        assert await switch.register(Endpoint("1001", "127.0.0.1", answer_delay=0))
        switch.far_end("+33142685301", "busy")
        switch.far_end("+33142685302", "unallocated")
        switch.far_end("+33142685303", "answer", answer_delay=0)
        switch.far_end("+33142685304", "answer", answer_delay=0)
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as client:
            busy = await client.api("originate sofia/gateway/carrier/+33142685301 &park()")
            assert busy.text == "-ERR USER_BUSY"
            missing = await client.api("originate sofia/gateway/carrier/+33142685302 &park()")
            assert missing.text == "-ERR UNALLOCATED_NUMBER"
            shown = await client.api(
                "originate {effective_caller_id_number=+33100000001}user/1001 "
                "&bridge(sofia/gateway/carrier/+33142685303)"
            )
            assert shown.ok, shown.text
            named = await client.api(
                "originate {effective_caller_id_number=+33100000001}user/1001 "
                "&bridge({origination_caller_id_number=+33100000002}sofia/gateway/carrier/+33142685304)"
            )
            assert named.ok, named.text

            def outside(number: str) -> str | None:
                for leg in switch.legs.values():
                    if leg.channel.name == f"sofia/external/{number}" and leg.channel.answered:
                        return str(leg.channel.profile.caller_id_number)
                return None

            await until(lambda: outside("+33142685303") and outside("+33142685304"))
            assert outside("+33142685303") == "+33100000001"
            assert outside("+33142685304") == "+33100000002"
            await client.api("hupall NORMAL_CLEARING")
            await until(lambda: not switch.legs)


async def test_eavesdrop_follows_its_flags_and_dtmf_commands_and_ends_with_its_target():
    """mod_dptools eavesdrop (switch_ivr_eavesdrop_session): the eavesdropper's whisper variables set the first
    mode; keys received on its channel (uuid_recv_dtmf) switch it (1 caller-side, 2 target, 3 both, 0 none, *
    leaves); keys sent out to its phone (uuid_send_dtmf) do not; it ends when its target does."""
    target = "5e1f0000-0000-4000-8000-0000000000a1"
    spy = "5e1f0000-0000-4000-8000-0000000000a2"
    second = "5e1f0000-0000-4000-8000-0000000000a3"
    async with SwitchSimulator(simulator_config(time_scale=1.0)) as simulator:
        switch = simulator.switch
        for user in ("1001", "1002", "1003"):
            assert await switch.register(Endpoint(user, "127.0.0.1", behaviour="answer", answer_delay=0))
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as client:
            job = await client.bgapi(f"originate {{origination_uuid={target}}}user/1001 &park()")
            assert (await job).ok
            job = await client.bgapi(
                f"originate {{origination_uuid={spy},eavesdrop_whisper_bleg=true}}user/1002 &eavesdrop({target})"
            )
            assert (await job).ok
            await until(lambda: spy in switch.eavesdrops())
            state = switch.eavesdrops()[spy]
            assert state["target"] == target and (state["mux_read"], state["mux_write"]) == (False, True)

            sent = await client.api(f"uuid_send_dtmf {spy} 3")
            assert sent.text == f"+OK {spy} sent DTMF 3."
            assert switch.eavesdrops()[spy]["mux_read"] is False  # the phone heard a tone; eavesdrop saw nothing
            for key, expected in (
                ("1", (True, False)),
                ("3", (True, True)),
                ("0", (False, False)),
                ("2", (False, True)),
            ):
                received = await client.api(f"uuid_recv_dtmf {spy} {key}")
                assert received.text == f"+OK {spy} received DTMF {key}."
                await until(lambda expected=expected: _flags(switch, spy) == expected)
            assert (await client.api(f"uuid_recv_dtmf {spy} 9")).ok  # not a command: ignored
            assert (await client.api("uuid_recv_dtmf 00000000-0000-4000-8000-000000000000 1")).text.startswith("-ERR")
            assert (await client.api(f"uuid_recv_dtmf {spy} *")).ok  # leaves: the inline application ends
            await until(lambda: spy not in switch.legs)

            job = await client.bgapi(f"originate {{origination_uuid={second}}}user/1003 &eavesdrop({target})")
            assert (await job).ok
            await until(lambda: second in switch.eavesdrops())
            assert _flags(switch, second) == (False, False)
            assert (await client.api(f"uuid_kill {target}")).ok
            await until(lambda: second not in switch.legs)  # the target ended: eavesdrop returned, the leg hung up
            assert not switch.eavesdrops()


def _flags(switch, leg: str) -> tuple[bool, bool] | None:
    state = switch.eavesdrops().get(leg)
    return (state["mux_read"], state["mux_write"]) if state else None


async def test_a_long_running_node_keeps_only_its_latest_requests():
    """The request log (ESL commands, xml_curl, CDR deliveries) is bounded by CC_SIM_REQUEST_LOG: the demo's node
    runs for days, and a benchmark's sends tens of thousands of commands."""
    config = simulator_config(time_scale=1.0, request_log_size=3)
    async with SwitchSimulator(config) as simulator:
        async with InboundClient("127.0.0.1", simulator.esl_port, "ClueCon") as client:
            for command in ("status", "sofia status", "reloadxml", "show channels as json"):
                await client.api(command)
        commands = [item.get("command") for item in simulator.switch.requests]
    assert len(commands) == 3 and commands[-1] == "exit"
    assert "api status" not in commands and not any(str(c).startswith("auth") for c in commands)  # the oldest went
