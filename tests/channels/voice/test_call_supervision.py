"""Supervision end to end: a supervisor's softphone joins a live call through the simulated node's eavesdrop."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from backend.channels.voice.simulator import Endpoint
from backend.db.engine import tenant_transaction
from backend.tenants.models import AuditEntry
from tests.channels.voice.call_rig import Agent, CallRig, call_rig
from tests.channels.voice.rig import eventually
from tests.factories import Factory, TenantCtx, unique

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
async def rig(app, client, factory, tmp_path_factory) -> AsyncIterator[CallRig]:
    async with call_rig(app, client, factory, tmp_path_factory.mktemp("cc-sup")) as made:
        yield made


async def _supervisor(rig: CallRig, ctx: TenantCtx, *, role: str = "supervisor", register: bool = True) -> Agent:
    """A user of `role` with a seat; their softphone registered on the rig's node if asked (never available)."""
    user = await rig.factory.user(ctx, role=role, login=True)
    seat = await rig.client.post("/api/v1/seats", json={"user_id": str(user["id"])}, headers=ctx.headers)
    assert seat.status_code == 201, seat.text
    body = seat.json()
    person = Agent(user["id"], user["headers"], body["seat"]["sip_username"], body["seat"]["sip_domain"])
    if register:
        assert await rig.switch.register(Endpoint(person.username, person.domain, behaviour="answer", answer_delay=0))

        async def registered() -> bool:
            return await rig.app.state.voice.where_registered(ctx.tenant_id, person.user_id) is not None

        await eventually(registered)
    return person


async def _connected(rig: CallRig, ctx: TenantCtx, queue: uuid.UUID, agent: Agent) -> tuple[str, str, str]:
    """A call answered by `agent`: the caller's leg, the interaction, the agent's leg."""
    leg = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, leg))["id"]
    connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
    assert connected["agent_id"] == str(agent.user_id)
    record = await eventually(lambda: _bridged_record(rig, ctx, iid))
    return leg, iid, str(record.agent_leg)


async def _bridged_record(rig: CallRig, ctx: TenantCtx, iid: str) -> Any:
    record = await rig.control.services.store.for_interaction(ctx.tenant_id, uuid.UUID(iid))
    return record if record is not None and record.phase == "bridged" and record.agent_leg else None


def _eavesdrop(rig: CallRig, leg: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = rig.switch.eavesdrops().get(leg)
    return found


async def _session(rig: CallRig, ctx: TenantCtx, session_id: str) -> dict[str, Any]:
    listed = await rig.client.get("/api/v1/voice/supervision-sessions", params={"limit": 100}, headers=ctx.headers)
    assert listed.status_code == 200, listed.text
    found: dict[str, Any] = next(s for s in listed.json()["items"] if s["id"] == session_id)
    return found


async def _ended(rig: CallRig, ctx: TenantCtx, session_id: str) -> dict[str, Any] | None:
    found = await _session(rig, ctx, session_id)
    return found if found["ended_at"] is not None else None


async def _mode(rig: CallRig, iid: str, session_id: str, mode: str, headers: dict[str, str]) -> Any:
    return await rig.client.put(
        f"/api/v1/voice/calls/{iid}/supervision/{session_id}", json={"mode": mode}, headers=headers
    )


async def test_a_supervisor_listens_whispers_barges_and_listens_again_then_leaves(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=30)
    agent = await rig.agent(ctx)
    boss = await _supervisor(rig, ctx)
    caller, iid, agent_leg = await _connected(rig, ctx, queue, agent)

    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/supervision", json={"mode": "listen"}, headers=boss.headers
    )
    assert started.status_code == 201, started.text
    session = started.json()
    sid = session["id"]
    assert session["mode"] == "listen" and session["agent_id"] == str(agent.user_id)
    assert session["call_uuid"] == caller and session["ended_at"] is None
    # The supervisor's phone was rung on the call's node, running eavesdrop on the agent's leg.
    [originate] = [c for c in rig.api_commands("originate") if f"origination_uuid={sid}" in c]
    assert f"user/{boss.username}@{boss.domain} &eavesdrop({agent_leg})" in originate
    assert "cc_leg_role=supervision" in originate and f"cc_interaction_id={iid}" in originate
    listening = _eavesdrop(rig, sid)
    assert listening is not None and listening["target"] == agent_leg
    assert (listening["mux_read"], listening["mux_write"]) == (False, False)  # nobody hears the supervisor

    whisper = await _mode(rig, iid, sid, "whisper", boss.headers)
    assert whisper.status_code == 200, whisper.text
    assert _eavesdrop(rig, sid) is not None
    assert (_eavesdrop(rig, sid)["mux_read"], _eavesdrop(rig, sid)["mux_write"]) == (False, True)  # the agent only
    barge = await _mode(rig, iid, sid, "barge", boss.headers)
    assert barge.status_code == 200, barge.text
    assert (_eavesdrop(rig, sid)["mux_read"], _eavesdrop(rig, sid)["mux_write"]) == (True, True)  # both
    back = await _mode(rig, iid, sid, "listen", boss.headers)
    assert back.status_code == 200, back.text
    assert (_eavesdrop(rig, sid)["mux_read"], _eavesdrop(rig, sid)["mux_write"]) == (False, False)
    assert [m["mode"] for m in back.json()["modes"]] == ["listen", "whisper", "barge", "listen"]
    assert _eavesdrop(rig, sid)["commands"] == "230"
    # Each change was one of eavesdrop's DTMF commands, queued on the supervisor's leg as received keys.
    assert [c for c in rig.api_commands("uuid_recv_dtmf") if c.startswith(sid)] == [
        f"{sid} 2",
        f"{sid} 3",
        f"{sid} 0",
    ]

    left = await rig.client.delete(f"/api/v1/voice/calls/{iid}/supervision/{sid}", headers=boss.headers)
    assert left.status_code == 200, left.text
    assert left.json()["ended_at"] is not None
    await eventually(lambda: _true(rig.gone(sid)))
    # The call goes on without the supervisor.
    assert rig.switch.find(caller) is not None and rig.switch.find(agent_leg) is not None
    again = await _mode(rig, iid, sid, "barge", boss.headers)
    assert again.status_code == 409

    await rig.switch.caller_hangup(caller)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled" and ended["agent_id"] == str(agent.user_id)
    assert [e["name"] for e in ended["timeline"]] == [
        "created",
        "queued",
        "offered",
        "offer_accepted",
        "connected",
        "ended",
    ]
    # The supervisor's leg is in the call's CDRs, with the interaction, but is nobody's agent leg.
    legs = await eventually(lambda: _legs(rig, ctx, iid, 3))
    mine = next(item for item in legs if str(item.leg_uuid) == sid)
    assert mine.agent_id is None and mine.call_uuid == uuid.UUID(caller)
    assert mine.details.get("cc_leg_role") == "supervision" and mine.details.get("cc_supervision_id") == sid
    handled = [item for item in legs if item.agent_id is not None]
    assert [str(item.agent_id) for item in handled] == [str(agent.user_id)]
    async with tenant_transaction(rig.app.state.sessionmaker, ctx.tenant_id) as session:
        actions = [
            e.action
            for e in (
                await session.scalars(
                    select(AuditEntry).where(AuditEntry.action.like("supervision.%")).order_by(AuditEntry.created_at)
                )
            ).all()
        ]
    assert actions == [
        "supervision.start",
        "supervision.mode",
        "supervision.mode",
        "supervision.mode",
        "supervision.end",
    ]


async def _true(value: bool) -> bool:
    return value


async def _legs(rig: CallRig, ctx: TenantCtx, iid: str, count: int) -> list[Any]:
    legs = await rig.legs(ctx, interaction_id=uuid.UUID(iid))
    return legs if len(legs) >= count else []


async def test_a_whisper_starts_heard_by_the_agent_only_and_ends_by_itself_with_the_call(
    rig: CallRig, factory: Factory
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx)
    boss = await _supervisor(rig, ctx)
    caller, iid, agent_leg = await _connected(rig, ctx, queue, agent)
    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/supervision", json={"mode": "whisper"}, headers=boss.headers
    )
    assert started.status_code == 201, started.text
    sid = started.json()["id"]
    whispering = _eavesdrop(rig, sid)
    assert whispering is not None and (whispering["mux_read"], whispering["mux_write"]) == (False, True)
    [originate] = [c for c in rig.api_commands("originate") if f"origination_uuid={sid}" in c]
    assert "eavesdrop_whisper_bleg=true" in originate and "eavesdrop_whisper_aleg" not in originate

    await rig.switch.caller_hangup(caller)  # the call ends: the agent's leg goes, and eavesdrop with it
    ended = await eventually(lambda: _ended(rig, ctx, sid))
    assert ended["mode"] == "whisper"
    assert rig.gone(sid)
    done = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert done["outcome"] == "handled"
    gone = await rig.client.delete(f"/api/v1/voice/calls/{iid}/supervision/{sid}", headers=boss.headers)
    assert gone.status_code == 409


async def test_the_session_ends_when_the_supervisor_hangs_up_and_the_call_goes_on(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx)
    boss = await _supervisor(rig, ctx)
    caller, iid, agent_leg = await _connected(rig, ctx, queue, agent)
    started = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/supervision", json={"mode": "barge"}, headers=boss.headers
    )
    assert started.status_code == 201, started.text
    sid = started.json()["id"]
    assert (_eavesdrop(rig, sid)["mux_read"], _eavesdrop(rig, sid)["mux_write"]) == (True, True)
    await rig.switch.caller_hangup(sid)  # the supervisor hangs up their phone
    await eventually(lambda: _ended(rig, ctx, sid))
    assert rig.switch.find(caller) is not None and rig.switch.find(agent_leg) is not None
    assert (await rig.interaction(ctx, iid))["state"] == "connected"
    await rig.switch.caller_hangup(caller)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))


async def test_supervision_refusals(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx)
    caller, iid, _ = await _connected(rig, ctx, queue, agent)
    url = f"/api/v1/voice/calls/{iid}/supervision"

    # An agent may not listen: 403, audited.
    colleague = await _supervisor(rig, ctx, role="agent", register=False)
    refused = await rig.client.post(url, json={"mode": "listen"}, headers=colleague.headers)
    assert refused.status_code == 403 and refused.json()["permission"] == "calls:listen"
    # The handling agent cannot supervise their own call either.
    own = await rig.client.post(url, json={"mode": "listen"}, headers=agent.headers)
    assert own.status_code == 403

    # A supervisor whose softphone is not registered: 409 saying so; nothing rang.
    unregistered = await _supervisor(rig, ctx, register=False)
    before = len(rig.api_commands("originate"))
    silent = await rig.client.post(url, json={"mode": "listen"}, headers=unregistered.headers)
    assert silent.status_code == 409, silent.text
    assert "softphone is not registered" in silent.json()["detail"]
    assert len(rig.api_commands("originate")) == before

    # Another tenant's supervisor: the call does not exist for them.
    other = await factory.tenant()
    stranger = await _supervisor(rig, other)
    foreign = await rig.client.post(url, json={"mode": "listen"}, headers=stranger.headers)
    assert foreign.status_code == 404

    # A listen-only supervisor may listen but not barge (403, audited); the session stays in its mode.
    name = unique("listener")
    role = await rig.client.post(
        "/api/v1/roles", json={"name": name, "permissions": ["calls:listen", "agent:workspace"]}, headers=ctx.headers
    )
    assert role.status_code == 201, role.text
    listener = await _supervisor(rig, ctx, role=name)
    headers = listener.headers
    started = await rig.client.post(url, json={"mode": "listen"}, headers=headers)
    assert started.status_code == 201, started.text
    sid = started.json()["id"]
    barge = await _mode(rig, iid, sid, "barge", headers)
    assert barge.status_code == 403 and barge.json()["permission"] == "calls:barge"
    assert _eavesdrop(rig, sid) is not None and _eavesdrop(rig, sid)["mux_write"] is False
    # Another supervisor cannot change or end someone else's session.
    boss = await _supervisor(rig, ctx)
    assert (await _mode(rig, iid, sid, "whisper", boss.headers)).status_code == 404
    gone = await rig.client.delete(f"{url}/{sid}", headers=boss.headers)
    assert gone.status_code == 404

    async with tenant_transaction(rig.app.state.sessionmaker, ctx.tenant_id) as session:
        refusals = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "supervision.refused"))).all()
    assert sorted(str(e.after["missing"]) for e in refusals) == ["calls:barge", "calls:listen", "calls:listen"]

    # Once the call is over there is nothing to supervise: 409.
    await rig.switch.caller_hangup(caller)
    await eventually(lambda: _ended(rig, ctx, sid))
    late = await rig.client.post(url, json={"mode": "listen"}, headers=boss.headers)
    assert late.status_code == 409


async def test_a_call_still_waiting_in_its_queue_cannot_be_supervised(rig: CallRig, factory: Factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    await rig.agent(ctx, available=False)
    boss = await _supervisor(rig, ctx)
    caller = await rig.call(await rig.number(ctx, queue_id=queue))
    iid = (await rig.interaction_of(ctx, caller))["id"]
    await eventually(lambda: rig.state_is(ctx, iid, "queued"))
    waiting = await rig.client.post(
        f"/api/v1/voice/calls/{iid}/supervision", json={"mode": "listen"}, headers=boss.headers
    )
    assert waiting.status_code == 409, waiting.text
    await rig.switch.caller_hangup(caller)
    await eventually(lambda: rig.state_is(ctx, iid, "ended"))
