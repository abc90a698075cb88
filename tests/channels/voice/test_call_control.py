"""Call control end to end: calls from a simulated node through the IVR, the queue and agents' phones."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

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
    assert await rig.agent_state(agent) == "wrap_up"

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
    assert await rig.agent_state(busy) == "away"
    # A phone the switch lost without an unregister: routing still thinks it registered; the bridge fails.
    ghost = await rig.agent(ctx, available=False)
    rig.switch.endpoints.pop(ghost.username)
    await rig.set_state(ghost, "available")
    await eventually(lambda: _declined_twice(rig, ctx, iid))
    assert await rig.agent_state(ghost) == "away"
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
    assert await rig.agent_state(slow) == "available"
    await rig.switch.caller_hangup(leg)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_the_agent_hanging_up_ends_the_call_and_the_agent_wraps_up(rig: CallRig, factory: Factory):
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
    assert await rig.agent_state(agent) == "wrap_up"
