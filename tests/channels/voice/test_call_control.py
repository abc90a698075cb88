"""Call control end to end: calls from a simulated node through the IVR, the queue and agents' phones."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.channels.voice.call_rig import CallRig, call_rig
from tests.channels.voice.rig import eventually
from tests.factories import Factory, MediaFactory

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
async def rig(app, client, factory, tmp_path_factory) -> AsyncIterator[CallRig]:
    async with call_rig(app, client, factory, tmp_path_factory.mktemp("cc")) as made:
        yield made


async def test_a_call_to_a_queue_number_reaches_an_agent_and_ends_in_wrap_up(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    did = await rig.number(ctx, queue_id=queue)
    agent = await rig.agent(ctx)
    leg = await rig.call(did)
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    assert connected["customer_ref"] == "+33612345678"
    await rig.switch.caller_hangup(leg)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled"
    names = [e["name"] for e in ended["timeline"]]
    assert names == ["created", "queued", "offered", "offer_accepted", "connected", "ended"], names
    await eventually(lambda: _in_state(rig, agent, "wrap_up"))

    async def both_legs() -> list:
        legs = await rig.legs(ctx, interaction_id=uuid.UUID(iid))
        return legs if len(legs) == 2 else []

    legs = await eventually(both_legs)
    caller = next(item for item in legs if str(item.leg_uuid) == leg)
    agent_leg = next(item for item in legs if str(item.leg_uuid) != leg)
    assert caller.disposition == "answered" and agent_leg.disposition == "answered"
    assert agent_leg.agent_id == agent.user_id and agent_leg.call_uuid == uuid.UUID(leg)


async def _voice_settings(rig: CallRig, ctx, queue: uuid.UUID, **values: object) -> None:
    response = await rig.client.put(f"/api/v1/voice/queues/{queue}/settings", json=values, headers=ctx.headers)
    assert response.status_code == 200, response.text


async def test_a_waiting_caller_hears_the_queues_music_and_announcements_until_an_agent_comes(
    rig: CallRig, factory: Factory
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    music = await media.prompt(ctx, kind="music")
    announcement = await media.prompt(ctx)
    queue = await factory.queue(ctx, announcements={"position": True, "estimated_wait": True, "interval_seconds": 10})
    await _voice_settings(rig, ctx, queue, music_on_hold_id=music["id"], announcement_id=announcement["id"])
    agent = await rig.agent(ctx, available=False)
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]

    async def heard_twice() -> bool:
        said = [data for app, data in rig.app_log(leg) if app == "playback" and "You are number 1 in line" in data]
        return len(said) >= 2

    await eventually(heard_twice)  # at once, then again after the (scaled) interval
    played = [data for app, data in rig.app_log(leg) if app == "playback"]
    assert any(music["sha256"] in data for data in played)
    first = next(data for data in played if "You are number 1" in data)
    assert first.startswith("file_string://http_cache://") and announcement["sha256"] in first
    assert "Your expected wait is about" in first and "press 1" in first
    assert any(r["kind"] == "http_cache" and music["sha256"] in str(r["url"]) for r in rig.switch.requests)
    await rig.set_state(agent, "available")
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_pressing_1_while_waiting_turns_the_call_into_a_callback_that_keeps_its_place(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    await rig.agent(ctx, available=False)
    first = await rig.call(await rig.number(ctx, queue_id=queue), caller_number="+33611111111")
    first_id = (await rig.interaction_of(ctx, first))["id"]
    second = await rig.call(await rig.number(ctx, queue_id=queue), caller_number="+33622222222")
    second_id = (await rig.interaction_of(ctx, second))["id"]
    await eventually(lambda: rig.state_is(ctx, second_id, "queued"))
    await eventually(lambda: _music(rig, first))
    assert rig.switch.press(first, "1")
    await eventually(lambda: _gone_and_reported(rig, ctx, first))
    body = await rig.interaction(ctx, first_id)
    assert (body["channel"], body["state"], body["position"]) == ("callback", "queued", 1)
    assert body["attributes"]["callback_number"] == "+33611111111"
    assert (await rig.interaction(ctx, second_id))["position"] == 2
    await rig.switch.caller_hangup(second)
    await eventually(lambda: rig.state_is(ctx, second_id, "ended"))


async def _music(rig: CallRig, leg: str) -> bool:
    found = rig.switch.find(leg)
    return found is not None and found.channel.variables.get("current_application") == "playback"


async def _gone_and_reported(rig: CallRig, ctx, leg: str) -> bool:
    return rig.gone(leg) and bool(await rig.legs(ctx, leg_uuid=uuid.UUID(leg)))


async def test_an_agent_who_does_not_answer_sends_the_call_back_to_its_place_for_the_next_agent(
    rig: CallRig, factory: Factory, caplog
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, offer_timeout_seconds=5)
    sleepy = await rig.agent(ctx, behaviour="no_answer")
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    await eventually(lambda: _timed_out(rig, ctx, iid))
    assert await rig.agent_state(sleepy) == "away"  # a missed call, like a missed offer
    await eventually(lambda: rig.state_is(ctx, iid, "queued"))
    await eventually(lambda: _music(rig, leg))  # back to the music
    awake = await rig.agent(ctx)
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(awake.user_id)
    names = [(e["name"], e["agent_id"]) for e in connected["timeline"] if e["name"].startswith("offer")]
    assert names[:2] == [("offered", str(sleepy.user_id)), ("offer_timed_out", str(sleepy.user_id))]
    assert ("offered", str(awake.user_id)) in names
    assert "agent_did_not_answer" in caplog.text
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    bridges = [data for app, data in rig.app_log(leg) if app == "bridge"]
    assert len(bridges) == 2 and "leg_timeout=5" in bridges[0]
    no_answer = await eventually(lambda: _agent_legs(rig, ctx, sleepy.user_id))
    assert no_answer[0].disposition == "no_answer"


async def _timed_out(rig: CallRig, ctx, iid: str) -> bool:
    return "offer_timed_out" in await rig.events(ctx, iid)


async def _agent_legs(rig: CallRig, ctx, agent_id: uuid.UUID) -> list:
    return await rig.legs(ctx, agent_id=agent_id)


async def test_a_busy_phone_and_an_unreachable_one_are_declined_and_their_agents_set_away(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    busy = await rig.agent(ctx, behaviour="busy")
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    await eventually(lambda: _has(rig, ctx, iid, "offer_rejected"))
    await eventually(lambda: _in_state(rig, busy, "away"))
    # A phone the switch lost without an unregister: routing still thinks it registered; the bridge fails.
    ghost = await rig.agent(ctx, available=False)
    rig.switch.endpoints.pop(ghost.username)
    await rig.set_state(ghost, "available")
    await eventually(lambda: _declined_twice(rig, ctx, iid))
    await eventually(lambda: _in_state(rig, ghost, "away"))
    assert (await rig.interaction(ctx, iid))["state"] == "queued"
    await rig.switch.caller_hangup(leg)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "abandoned"


async def _has(rig: CallRig, ctx, iid: str, name: str) -> bool:
    return name in await rig.events(ctx, iid)


async def _declined_twice(rig: CallRig, ctx, iid: str) -> bool:
    names = await rig.events(ctx, iid)
    return names.count("offer_rejected") + names.count("offer_timed_out") >= 2


async def test_a_ring_all_queue_rings_every_agent_at_once_and_the_first_to_answer_takes_the_call(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, strategy="ring_all")
    slow = await rig.agent(ctx, answer_delay=30.0)
    quick = await rig.agent(ctx, answer_delay=2.0)
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(quick.user_id)
    [bridge] = [data for app, data in rig.app_log(leg) if app == "bridge"]
    assert bridge.count("user/") == 2 and "," in bridge  # one dial string, both legs at once
    offered = next(e for e in connected["timeline"] if e["name"] == "offered")
    assert sorted(offered["data"].get("agents", [])) in ([], sorted([str(slow.user_id), str(quick.user_id)]))
    lost = await eventually(lambda: _agent_legs(rig, ctx, slow.user_id))
    assert lost[0].hangup_cause == "LOSE_RACE"
    await eventually(lambda: _in_state(rig, slow, "available"))
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_the_agent_hanging_up_ends_the_call_and_the_agent_wraps_up(rig: CallRig, factory: Factory, caplog):
    """The bridge ends, the switch hangs the caller up and closes the call's socket (possibly as call control
    sends its own hangup): an ordinary end, not a failure in the logs."""
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=60)
    agent = await rig.agent(ctx)
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    assert record is not None and record.agent_leg is not None
    assert rig.switch.find(str(record.agent_leg)) is not None
    await rig.switch.caller_hangup(str(record.agent_leg))  # the agent's phone hangs up
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled"
    await eventually(lambda: _gone_and_reported(rig, ctx, leg))  # hangup_after_bridge ended the caller's leg
    await eventually(lambda: _in_state(rig, agent, "wrap_up"))
    store = rig.control.services.store

    async def forgotten() -> bool:  # call control is done with the call
        return await store.for_interaction(ctx.tenant_id, uuid.UUID(iid)) is None

    await eventually(forgotten)
    assert "call_control_failed" not in caplog.text and "never retrieved" not in caplog.text


async def _connected_call(rig: CallRig, factory: Factory, ctx, queue: uuid.UUID, agent) -> tuple[str, str]:
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    return leg, iid


async def test_the_handling_agent_holds_and_resumes_the_caller_who_hears_the_queues_music(
    rig: CallRig, factory: Factory, caplog
):
    media = MediaFactory(factory)
    ctx = await factory.tenant()
    music = await media.prompt(ctx, kind="music")
    queue = await factory.queue(ctx)
    await _voice_settings(rig, ctx, queue, music_on_hold_id=music["id"])
    agent = await rig.agent(ctx)
    colleague = await rig.agent(ctx, available=False)
    leg, iid = await _connected_call(rig, factory, ctx, queue, agent)
    refused = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=colleague.headers)
    assert refused.status_code == 403, refused.text
    assert "call_request_forbidden" in caplog.text
    held = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=agent.headers)
    assert held.status_code == 200, held.text
    assert held.json()["held"] is True
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    assert record is not None and record.agent_leg is not None
    agent_leg = rig.switch.find(str(record.agent_leg))
    assert agent_leg is not None and agent_leg.channel.callstate == "HELD"
    await eventually(lambda: _hold_music(rig, leg, music["sha256"]))  # broadcast to the caller, the held party
    again = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=agent.headers)
    assert again.status_code == 409
    # A supervisor (queues:write) may resume someone else's call.
    resumed = await rig.client.post(f"/api/v1/voice/calls/{iid}/unhold", headers=ctx.headers)
    assert resumed.status_code == 200, resumed.text
    assert agent_leg.channel.callstate == "ACTIVE"
    names = await rig.events(ctx, iid)
    assert names[-2:] == ["held", "resumed"]
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    gone = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=agent.headers)
    assert gone.status_code == 409


async def _hold_music(rig: CallRig, leg: str, sha: str) -> bool:
    return any(app == "playback" and sha in data for app, data in rig.app_log(leg))


async def test_a_blind_transfer_to_another_queue_goes_to_its_agents_and_the_first_agent_wraps_up(
    rig: CallRig, factory: Factory, caplog
):
    ctx = await factory.tenant()
    sales = await factory.queue(ctx, wrap_up_seconds=60)
    support = await factory.queue(ctx)
    skill = await factory.skill(ctx)
    # Only the second agent qualifies for the support queue (a skill the first one lacks).
    response = await rig.client.put(
        f"/api/v1/routing/queues/{support}",
        json={
            "name": f"support-{uuid.uuid4().hex[:6]}",
            "skills": [{"skill_id": str(skill), "steps": [{"after_seconds": 0, "min_level": 5}]}],
        },
        headers=ctx.headers,
    )
    assert response.status_code == 200, response.text
    first = await rig.agent(ctx)
    leg, iid = await _connected_call(rig, factory, ctx, sales, first)
    second = await rig.agent(ctx, available=False)
    profile = await rig.client.put(
        f"/api/v1/routing/agents/{second.user_id}",
        json={"capacity": {"voice": 1}, "skills": [{"skill_id": str(skill), "level": 8}]},
        headers=ctx.headers,
    )
    assert profile.status_code == 200, profile.text
    await rig.set_state(second, "available")
    other = await factory.tenant()
    foreign = await factory.queue(other)
    refused = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/transfer", json={"target": "queue", "queue_id": str(foreign)}, headers=first.headers
    )
    assert refused.status_code == 404, refused.text
    assert "call_transfer_refused" in caplog.text
    assert (await rig.interaction(ctx, iid))["agent_id"] == str(first.user_id)  # nothing changed
    moved = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/transfer", json={"target": "queue", "queue_id": str(support)}, headers=first.headers
    )
    assert moved.status_code == 202, moved.text
    connected = await eventually(lambda: _with_agent(rig, ctx, iid, second.user_id))
    assert connected["queue_id"] == str(support)
    transferred = next(e for e in connected["timeline"] if e["name"] == "transferred")
    assert transferred["agent_id"] == str(first.user_id) and transferred["data"]["to_queue"] == str(support)
    await eventually(lambda: _in_state(rig, first, "wrap_up"))
    assert rig.switch.find(leg) is not None  # the caller never left
    await rig.switch.caller_hangup(leg)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["agent_id"] == str(second.user_id) and ended["outcome"] == "handled"


async def _with_agent(rig: CallRig, ctx, iid: str, agent_id: uuid.UUID) -> dict | None:
    body = await rig.interaction(ctx, iid)
    return body if body["state"] == "connected" and body["agent_id"] == str(agent_id) else None


async def test_a_blind_transfer_to_an_agent_rings_their_phone_and_connects_them(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    first = await rig.agent(ctx)
    leg, iid = await _connected_call(rig, factory, ctx, queue, first)
    expert = await rig.agent(ctx, available=False)
    await rig.set_state(expert, "available")
    moved = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/transfer",
        json={"target": "agent", "agent_id": str(expert.user_id)},
        headers=first.headers,
    )
    assert moved.status_code == 202, moved.text
    connected = await eventually(lambda: _with_agent(rig, ctx, iid, expert.user_id))
    transferred = next(e for e in connected["timeline"] if e["name"] == "transferred")
    assert transferred["data"]["to_agent"] == str(expert.user_id)
    await eventually(lambda: _in_state(rig, expert, "busy"))
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    await eventually(lambda: _in_state(rig, expert, "wrap_up"))


async def _stored_recording(rig: CallRig, ctx, iid: str) -> dict | None:
    listed = await rig.client.get("/api/v1/voice/recordings", params={"interaction_id": iid}, headers=ctx.headers)
    items = listed.json()["items"]
    return items[0] if items and items[0]["status"] == "stored" else None


async def test_a_queue_that_always_records_gets_a_real_wav_that_plays_back_through_the_api(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    await _voice_settings(rig, ctx, queue, recording_policy="always")
    agent = await rig.agent(ctx)
    leg, iid = await _connected_call(rig, factory, ctx, queue, agent)
    record = await eventually(lambda: _recording_record(rig, ctx, iid))
    path = str(record.recording_path)
    assert path.startswith(str(rig.recordings_dir)) and path.endswith(f"recording-{record.recording_id}.wav")
    assert any(str(record.call_uuid) in a and "start" in a for a in rig.api_commands("uuid_record"))
    await rig.switch.caller_hangup(leg)
    stored = await eventually(lambda: _stored_recording(rig, ctx, iid))
    assert stored["agent_id"] == str(agent.user_id) and stored["policy"] == "always"
    audio = await rig.client.get(f"/api/v1/voice/recordings/{stored['id']}/audio", headers=ctx.headers)
    assert audio.status_code == 200 and audio.content[:4] == b"RIFF" and audio.content[8:12] == b"WAVE"
    assert len(audio.content) == stored["size_bytes"] > 44


async def _recording_record(rig: CallRig, ctx, iid: str):
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    return record if record is not None and record.recording_id is not None else None


async def test_an_on_demand_recording_is_started_paused_and_resumed_by_the_agent(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    await _voice_settings(rig, ctx, queue, recording_policy="on_demand")
    agent = await rig.agent(ctx)
    leg, iid = await _connected_call(rig, factory, ctx, queue, agent)
    assert (await rig.client.get(f"/api/v1/voice/calls/{iid}", headers=agent.headers)).json()["recording_id"] is None
    paused_early = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/recording", json={"action": "pause"}, headers=agent.headers
    )
    assert paused_early.status_code == 409
    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/recording", json={"action": "start"}, headers=agent.headers
    )
    assert started.status_code == 200, started.text
    assert started.json()["recording_id"] is not None
    paused = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/recording", json={"action": "pause"}, headers=agent.headers
    )
    assert paused.status_code == 200 and paused.json()["recording_paused"] is True
    resumed = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/recording", json={"action": "resume"}, headers=agent.headers
    )
    assert resumed.status_code == 200 and resumed.json()["recording_paused"] is False
    commands = rig.api_commands("uuid_record")
    assert [c.split()[1] for c in commands if str(leg) in c] == ["start", "mask", "unmask"]
    await rig.switch.caller_hangup(leg)
    stored = await eventually(lambda: _stored_recording(rig, ctx, iid))
    assert stored["policy"] == "on_demand"
    [interval] = stored["paused_intervals"]
    assert interval["paused_at"] <= interval["resumed_at"]


async def test_a_queue_that_never_records_refuses_a_recording(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx)
    leg, iid = await _connected_call(rig, factory, ctx, queue, agent)
    refused = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/recording", json={"action": "start"}, headers=agent.headers
    )
    assert refused.status_code == 409 and refused.json()["type"].endswith("recording-not-allowed")
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def _in_state(rig: CallRig, agent: Any, state: str) -> bool:
    return await rig.agent_state(agent) == state


async def test_declining_in_the_workspace_stops_the_phone_ringing_and_the_call_goes_to_the_next_agent(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, offer_timeout_seconds=60)
    reluctant = await rig.agent(ctx, answer_delay=3000.0)
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    await eventually(lambda: _ringing(rig, leg))
    declined = await rig.client.post(f"/api/v1/interactions/{iid}/reject", headers=reluctant.headers)
    assert declined.status_code == 204, declined.text
    legs = await eventually(lambda: _agent_legs(rig, ctx, reluctant.user_id))
    assert legs[0].hangup_cause == "ORIGINATOR_CANCEL"  # the phone stopped ringing at once
    willing = await rig.agent(ctx)
    connected = await eventually(lambda: _with_agent(rig, ctx, iid, willing.user_id))
    assert [e["name"] for e in connected["timeline"]].count("offer_rejected") == 1
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def _ringing(rig: CallRig, leg: str) -> bool:
    found = rig.switch.find(leg)
    return found is not None and found.channel.callstate == "RING_WAIT"


async def test_a_queue_that_overflows_to_voicemail_takes_a_message_from_its_waiting_caller(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(
        ctx, max_wait_seconds=1, overflow_action={"type": "voicemail", "message": "All our agents are busy"}
    )
    await _voice_settings(rig, ctx, queue, voicemail_enabled=True, voicemail_max_seconds=60)
    await rig.agent(ctx, available=False)
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    overflowed = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert overflowed["outcome"] == "overflowed"

    async def recording_message() -> bool:
        found = rig.switch.find(leg)
        return found is not None and found.channel.variables.get("current_application") == "record"

    await eventually(recording_message)
    assert any("All our agents are busy" in data for _, data in rig.app_log(leg))
    await rig.switch.caller_hangup(leg)

    async def stored() -> list:
        listed = await rig.client.get("/api/v1/voice/voicemails", params={"queue_id": str(queue)}, headers=ctx.headers)
        return listed.json()["items"]

    [message] = await eventually(stored)
    assert message["caller_number"] == "+33612345678" and message["interaction_id"]


@pytest.mark.unit
async def test_hanging_up_a_call_whose_socket_the_switch_reset_is_not_an_error():
    """After `hangup_after_bridge` the switch closes the call's socket, with a reset at times, while call control
    sends its own `hangup`: the call is simply over."""
    from backend.channels.voice.call_control.switch import CallChannel
    from backend.channels.voice.esl import ConnectionLost

    class ResetSession:
        uuid = "0b8d2c55-5a47-4c0e-9a43-7f3b1c2d4e5f"
        channel_down = False
        closed = False

        async def execute(self, application: str, argument: str | None = None) -> None:
            raise ConnectionLost("connection error: [Errno 104] Connection reset by peer")

        async def hangup(self, cause: str) -> None:  # as OutboundSession.hangup: only ChannelGone is quiet
            await self.execute("hangup", cause)

    await CallChannel(ResetSession()).hangup()  # type: ignore[arg-type]
