"""Attended transfers end to end: the agent consults another agent while the caller waits, then completes or cancels."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.channels.voice.call_rig import Agent, CallRig, call_rig
from tests.channels.voice.rig import eventually
from tests.factories import Factory, TenantCtx

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
async def rig(app, client, factory, tmp_path_factory) -> AsyncIterator[CallRig]:
    async with call_rig(app, client, factory, tmp_path_factory.mktemp("cc-att")) as made:
        yield made


async def _connected(rig: CallRig, ctx: TenantCtx, queue: uuid.UUID, agent: Agent) -> tuple[str, str, str]:
    """A call answered by `agent`: the caller's leg, the interaction, the agent's leg."""
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    live = await eventually(lambda: _live_when(rig, iid, agent, lambda body: body["phase"] == "bridged"))
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    assert record is not None and record.agent_leg is not None
    assert live["agent_id"] == str(agent.user_id)
    return leg, iid, str(record.agent_leg)


async def _live_when(rig: CallRig, iid: str, agent: Agent, check: Any) -> dict[str, Any] | None:
    response = await rig.client.get(f"/api/v1/voice/calls/{iid}", headers=agent.headers)
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body if check(body) else None


async def _consult(rig: CallRig, iid: str, agent: Agent, target: Agent) -> dict[str, Any]:
    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/transfer",
        json={"target": "agent", "agent_id": str(target.user_id), "mode": "attended"},
        headers=agent.headers,
    )
    assert started.status_code == 202, started.text
    body: dict[str, Any] = started.json()
    assert body["transfer_pending"] is True and body["consult_agent_id"] == str(target.user_id)
    return body


def _partner(rig: CallRig, leg: str) -> str | None:
    found = rig.switch.find(leg)
    return found.channel.partner if found is not None else None


async def _in_state(rig: CallRig, agent: Agent, state: str) -> bool:
    return await rig.agent_state(agent) == state


async def _talking(rig: CallRig, iid: str, agent: Agent) -> dict[str, Any] | None:
    return await _live_when(rig, iid, agent, lambda body: body["consult_state"] == "talking")


async def _consult_leg(rig: CallRig, ctx: TenantCtx, iid: str) -> str:
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    assert record is not None and record.pending is not None and record.pending.consult_leg is not None
    return str(record.pending.consult_leg)


async def _music_while_consulting(rig: CallRig, caller: str) -> bool:
    """After leaving the agent's bridge, call control plays the queue's music to the caller."""
    log = rig.app_log(caller)
    bridges = [i for i, (app, _) in enumerate(log) if app == "bridge"]
    return bool(bridges) and any(app == "playback" for app, _ in log[bridges[-1] + 1 :])


async def test_an_attended_transfer_to_an_agent_completes_after_the_consultation(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    first = await rig.agent(ctx)
    second = await rig.agent(ctx, available=False)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    await rig.set_state(second, "available")

    await _consult(rig, iid, first, second)
    await eventually(lambda: _talking(rig, iid, first))
    consult_leg = await _consult_leg(rig, ctx, iid)
    # The two agents talk; the caller, out of their bridge, hears the queue's music from call control. The
    # record says "talking" just before the uuid_bridge (the caller's returning bridge must find it so).
    await eventually(lambda: _equal(_partner(rig, first_leg), consult_leg))
    assert _partner(rig, consult_leg) == first_leg
    assert _partner(rig, caller) is None
    await eventually(lambda: _music_while_consulting(rig, caller))
    originate = next(c for c in rig.api_commands("originate") if f"origination_uuid={consult_leg}" in c)
    assert f"cc_agent_id={second.user_id}" in originate and originate.endswith("&park()")
    assert f"{first_leg} {consult_leg}" in rig.api_commands("uuid_bridge")
    # Nothing else may happen to the call meanwhile.
    held = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=first.headers)
    assert held.status_code == 409

    done = await rig.client.post(f"/api/v1/voice/calls/{iid}/transfer/complete", headers=first.headers)
    assert done.status_code == 200, done.text
    assert done.json()["agent_id"] == str(second.user_id) and done.json()["transfer_pending"] is False
    assert f"{caller} {consult_leg}" in rig.api_commands("uuid_bridge")
    await eventually(lambda: _equal(_partner(rig, caller), consult_leg))
    await eventually(lambda: _equal(rig.gone(first_leg), True))
    connected = await rig.interaction(ctx, iid)
    assert connected["state"] == "connected" and connected["agent_id"] == str(second.user_id)
    names = [e["name"] for e in connected["timeline"]]
    assert names[-4:] == ["connected", "held", "transferred", "connected"], names
    transferred = next(e for e in connected["timeline"] if e["name"] == "transferred")
    assert transferred["data"]["to_agent"] == str(second.user_id) and transferred["data"]["mode"] == "attended"
    await eventually(lambda: _in_state(rig, first, "wrap_up"))
    assert await rig.agent_state(second) == "busy"

    # The call goes on with the second agent, still under control (hold works through the socket).
    held = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=second.headers)
    assert held.status_code == 200, held.text
    assert rig.switch.find(consult_leg).channel.callstate == "HELD"
    resumed = await rig.client.post(f"/api/v1/voice/calls/{iid}/unhold", headers=second.headers)
    assert resumed.status_code == 200, resumed.text

    await rig.switch.caller_hangup(caller)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled" and ended["agent_id"] == str(second.user_id)
    await eventually(lambda: _in_state(rig, second, "wrap_up"))
    legs = await eventually(lambda: _legs(rig, ctx, iid, 3))
    by_leg = {str(item.leg_uuid): item for item in legs}
    assert by_leg[first_leg].agent_id == first.user_id and by_leg[consult_leg].agent_id == second.user_id
    await eventually(lambda: _forgotten(rig, ctx, iid))


async def _equal(value: object, expected: object) -> bool:
    return value == expected


async def _legs(rig: CallRig, ctx: TenantCtx, iid: str, count: int) -> list[Any]:
    legs = await rig.legs(ctx, interaction_id=uuid.UUID(iid))
    return legs if len(legs) >= count else []


async def _forgotten(rig: CallRig, ctx: TenantCtx, iid: str) -> bool:
    return await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid)) is None


async def test_an_attended_transfer_to_a_queue_consults_its_longest_idle_free_agent(rig: CallRig, factory: Factory):
    """Consulting a queue rings one of its free agents now: available, phone registered, with the queue's skills
    (the longest idle first); an available agent without them is passed over."""
    ctx = await factory.tenant()
    skill = await factory.skill(ctx)
    sales = await factory.queue(ctx, skills=[{"skill_id": str(skill), "steps": [{"after_seconds": 0, "min_level": 5}]}])
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    first = await rig.agent(ctx)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    unskilled = await rig.agent(ctx, available=False)
    skilled = await rig.agent(ctx, available=False)
    await factory.agent_skills(ctx, skilled.user_id, {skill: 7})
    await factory.agent_skills(ctx, unskilled.user_id, {skill: 2})
    await rig.set_state(unskilled, "available")
    await rig.set_state(skilled, "available")

    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/transfer",
        json={"target": "queue", "queue_id": str(sales), "mode": "attended"},
        headers=first.headers,
    )
    assert started.status_code == 202, started.text
    assert started.json()["consult_agent_id"] == str(skilled.user_id)
    await eventually(lambda: _talking(rig, iid, first))
    consult_leg = await _consult_leg(rig, ctx, iid)
    cancelled = await rig.client.post(f"/api/v1/voice/calls/{iid}/transfer/cancel", headers=first.headers)
    assert cancelled.status_code == 200, cancelled.text
    await eventually(lambda: _equal(rig.gone(consult_leg), True))
    await rig.switch.caller_hangup(caller)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_a_cancelled_consultation_brings_the_caller_back_to_the_agent(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    first = await rig.agent(ctx)
    second = await rig.agent(ctx, available=False)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    await rig.set_state(second, "available")
    await _consult(rig, iid, first, second)
    await eventually(lambda: _talking(rig, iid, first))
    consult_leg = await _consult_leg(rig, ctx, iid)

    cancelled = await rig.client.post(f"/api/v1/voice/calls/{iid}/transfer/cancel", headers=first.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["transfer_pending"] is False and cancelled.json()["agent_id"] == str(first.user_id)
    await eventually(lambda: _equal(_partner(rig, caller), first_leg))
    await eventually(lambda: _equal(rig.gone(consult_leg), True))
    body = await rig.interaction(ctx, iid)
    assert [e["name"] for e in body["timeline"]][-2:] == ["held", "resumed"]
    assert body["timeline"][-1]["data"]["reason"] == "consult_cancelled"
    assert await rig.agent_state(second) == "available"
    again = await rig.client.post(f"/api/v1/voice/calls/{iid}/transfer/complete", headers=first.headers)
    assert again.status_code == 409

    await rig.switch.caller_hangup(caller)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled" and ended["agent_id"] == str(first.user_id)
    await eventually(lambda: _in_state(rig, first, "wrap_up"))
    await eventually(lambda: _equal(rig.gone(first_leg), True))


async def test_a_consulted_agent_who_does_not_answer_leaves_the_caller_with_the_agent(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    first = await rig.agent(ctx)
    second = await rig.agent(ctx, behaviour="no_answer", available=False)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    await _consult(rig, iid, first, second)
    # Meanwhile the caller is on hold: the agent's leg is held, its hold music played to the caller.
    back = await eventually(lambda: _live_when(rig, iid, first, lambda body: body["transfer_pending"] is False))
    assert back["held"] is False and back["agent_id"] == str(first.user_id)
    assert rig.switch.find(first_leg).channel.callstate != "HELD"
    assert _partner(rig, caller) == first_leg
    assert [c for c in rig.api_commands("uuid_hold") if first_leg in c] == [first_leg, f"off {first_leg}"]
    body = await eventually(lambda: _last_events(rig, ctx, iid, ["held", "resumed"]))
    resumed = body["timeline"][-1]["data"]
    assert resumed["reason"] == "consult_not_answered" and resumed["cause"] == "NO_ANSWER"
    await rig.switch.caller_hangup(caller)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["agent_id"] == str(first.user_id)


async def test_attended_transfer_refusals(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    first = await rig.agent(ctx)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    url = f"/api/v1/voice/calls/{iid}/transfer"
    before = len(rig.api_commands("originate"))

    other = await factory.tenant()
    stranger = await rig.agent(other, available=False)
    foreign = await rig.client.post(
        url, json={"target": "agent", "agent_id": str(stranger.user_id), "mode": "attended"}, headers=first.headers
    )
    assert foreign.status_code == 404, foreign.text
    # A queue with nobody free to consult (its only agent is on this call), and another tenant's queue.
    to_queue = await rig.client.post(
        url, json={"target": "queue", "queue_id": str(queue), "mode": "attended"}, headers=first.headers
    )
    assert to_queue.status_code == 409 and to_queue.json()["type"].endswith("no-free-agent"), to_queue.text
    foreign_queue = await factory.queue(other)
    elsewhere = await rig.client.post(
        url, json={"target": "queue", "queue_id": str(foreign_queue), "mode": "attended"}, headers=first.headers
    )
    assert elsewhere.status_code == 404, elsewhere.text
    unregistered = await factory.user(ctx)
    silent = await rig.client.post(
        url, json={"target": "agent", "agent_id": str(unregistered["id"]), "mode": "attended"}, headers=first.headers
    )
    assert silent.status_code == 409 and silent.json()["type"].endswith("agent-unreachable")
    nothing = await rig.client.post(f"{url}/complete", headers=first.headers)
    assert nothing.status_code == 409
    assert len(rig.api_commands("originate")) == before
    live = await rig.client.get(f"/api/v1/voice/calls/{iid}", headers=first.headers)
    assert live.json()["transfer_pending"] is False and _partner(rig, caller) == first_leg
    await rig.switch.caller_hangup(caller)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_an_adopted_call_is_transferred_attended_and_comes_back_through_the_next_socket(
    rig: CallRig, factory: Factory, tmp_path
):
    """The process controlling the call dies; the survivor that adopted it starts the consultation through the
    node; the caller leaves the agent's bridge, reaches the dialplan's second `socket` and is resumed there."""
    from backend.channels.voice.call_control import CallControlServer
    from backend.channels.voice.esl_config import client_config
    from tests.channels.voice.call_rig import services_for
    from tests.channels.voice.test_call_control_resilience import CallControlProcess, free_port

    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    first = await rig.agent(ctx)
    second = await rig.agent(ctx, available=False)
    did = await rig.number(ctx, queue_id=queue)
    port = free_port()
    doomed = CallControlProcess(rig, port, tmp_path / "call-control.log")
    await doomed.start()
    xml_curl = rig.app.state.xml_curl
    before = xml_curl.call_control
    xml_curl.call_control = f"127.0.0.1:{port}"
    survivor = CallControlServer(
        services_for(rig.app, rig.settings), "127.0.0.1", port, config=client_config(rig.settings), reuse_port=True
    )
    try:
        caller = await rig.call(did)
        iid = (await rig.interaction_of(ctx, caller))["id"]
        await eventually(lambda: rig.state_is(ctx, iid, "connected"))
        record = await eventually(lambda: _owned_by(rig, ctx, iid, doomed.owner))
        first_leg = str(record.agent_leg)
        await rig.set_state(second, "available")
        await survivor.start()
        await doomed.kill()
        await eventually(lambda: _owned_by(rig, ctx, iid, None, not_by=doomed.owner), timeout=15)

        await _consult(rig, iid, first, second)
        talking = await eventually(lambda: _talking(rig, iid, first), timeout=15)
        assert talking["agent_id"] == str(first.user_id)
        # The caller left the agent's bridge and reached the survivor through the dialplan's second socket.
        resumed = await eventually(lambda: _owned_by(rig, ctx, iid, survivor.services.store.owner), timeout=15)
        assert resumed.pending is not None and resumed.pending.consult_state == "talking"
        await eventually(lambda: _music_while_consulting(rig, caller))
        consult_leg = await _consult_leg(rig, ctx, iid)

        done = await rig.client.post(f"/api/v1/voice/calls/{iid}/transfer/complete", headers=first.headers)
        assert done.status_code == 200, done.text
        await eventually(lambda: _equal(_partner(rig, caller), consult_leg))
        await eventually(lambda: _equal(rig.gone(first_leg), True))
        await eventually(lambda: _in_state(rig, first, "wrap_up"))
        await rig.switch.caller_hangup(consult_leg)  # the second agent ends the call
        ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
        assert ended["outcome"] == "handled" and ended["agent_id"] == str(second.user_id)
        names = [e["name"] for e in ended["timeline"]]
        assert names[-5:] == ["connected", "held", "transferred", "connected", "ended"], names
        await eventually(lambda: _in_state(rig, second, "wrap_up"))
        await eventually(lambda: _forgotten(rig, ctx, iid))
    finally:
        xml_curl.call_control = before
        await survivor.close()
        await doomed.close()


async def _owned_by(rig: CallRig, ctx: TenantCtx, iid: str, owner: str | None, *, not_by: str | None = None) -> Any:
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    if record is None:
        return None
    if owner is not None:
        return record if record.owner == owner else None
    return record if record.owner and record.owner != not_by else None


async def test_the_caller_hanging_up_during_the_consultation_ends_both_agents_legs(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    first = await rig.agent(ctx)
    second = await rig.agent(ctx, available=False)
    caller, iid, first_leg = await _connected(rig, ctx, queue, first)
    await rig.set_state(second, "available")
    await _consult(rig, iid, first, second)
    await eventually(lambda: _talking(rig, iid, first))
    consult_leg = await _consult_leg(rig, ctx, iid)
    await rig.switch.caller_hangup(caller)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled" and ended["agent_id"] == str(first.user_id)
    await eventually(lambda: _equal(rig.gone(first_leg) and rig.gone(consult_leg), True))
    await eventually(lambda: _in_state(rig, first, "wrap_up"))
    assert await rig.agent_state(second) == "available"
    await eventually(lambda: _legs(rig, ctx, iid, 3))
    await eventually(lambda: _forgotten(rig, ctx, iid))


async def _last_events(rig: CallRig, ctx: TenantCtx, iid: str, names: list[str]) -> dict[str, Any] | None:
    body = await rig.interaction(ctx, iid)
    return body if [e["name"] for e in body["timeline"]][-len(names) :] == names else None
