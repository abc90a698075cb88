"""Outbound calls end to end: click-to-call and accepted callbacks, agent leg first, through the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from backend.channels.voice.call_control import CallControlServer, CallStore
from backend.channels.voice.call_control.outbound_calls import agent_outcome, customer_outcome
from backend.channels.voice.esl_config import client_config
from backend.db.engine import tenant_transaction
from backend.routing.hub import DELIVERY_CHANNEL
from backend.tenants.models import AuditEntry
from tests.channels.voice.call_rig import Agent, CallRig, call_rig, services_for
from tests.channels.voice.rig import eventually
from tests.factories import Factory, MediaFactory, TenantCtx

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CUSTOMER = "+33142685300"


@pytest.fixture(scope="module")
async def rig(app, client, factory, tmp_path_factory) -> AsyncIterator[CallRig]:
    async with call_rig(app, client, factory, tmp_path_factory.mktemp("outbound")) as made:
        made.control.outbound.socket_address = f"127.0.0.1:{made.control.port}"
        yield made


@pytest.mark.unit
def test_causes_become_clear_outcomes():
    assert agent_outcome("NO_ANSWER") == "agent_no_answer"
    assert agent_outcome("USER_BUSY") == "agent_busy"
    assert agent_outcome("SUBSCRIBER_ABSENT") == "agent_unreachable"
    assert customer_outcome("USER_BUSY") == "customer_busy"
    assert customer_outcome("NO_ANSWER") == "customer_no_answer"
    assert customer_outcome("UNALLOCATED_NUMBER") == "customer_unreachable"
    assert customer_outcome("ORIGINATOR_CANCEL") == "cancelled"


async def _tenant(rig: CallRig, factory: Factory) -> tuple[TenantCtx, str, str]:
    """A tenant with a number of its own and a carrier route for French numbers: (ctx, its number, gateway)."""
    ctx = await factory.tenant()
    number = await factory.number(ctx)
    gateway = await MediaFactory(factory).outbound_route("+33")
    return ctx, str(number["number"]), gateway


async def _place(rig: CallRig, agent: Agent, **body: Any) -> Any:
    return await rig.client.post("/api/v1/voice/outbound-calls", json=body, headers=agent.headers)


def _legs_of(rig: CallRig, interaction_id: str) -> list[Any]:
    return [
        leg
        for leg in list(rig.switch.legs.values())
        if leg.channel.variables.get("cc_interaction_id") == interaction_id and not leg.channel.down
    ]


def _customer_leg(rig: CallRig, interaction_id: str) -> Any:
    for leg in _legs_of(rig, interaction_id):
        if leg.channel.name.startswith("sofia/external/"):
            return leg
    return None


@contextlib.asynccontextmanager
async def _hub_messages(rig: CallRig) -> AsyncIterator[list[dict[str, Any]]]:
    """What the hub delivers to agents meanwhile (every process's deliveries travel on one Redis channel)."""
    seen: list[dict[str, Any]] = []
    pubsub = rig.app.state.redis.pubsub()
    await pubsub.subscribe(DELIVERY_CHANNEL)

    async def read() -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                seen.append(json.loads(message["data"]))

    task = asyncio.create_task(read())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()


async def _told(seen: list[dict[str, Any]], agent: Agent, state: str) -> dict[str, Any] | None:
    for message in seen:
        payload = message["payload"]
        mine = message["user_id"] == str(agent.user_id) and payload.get("type") == "outbound_call"
        if mine and payload.get("state") == state:
            found: dict[str, Any] = payload
            return found
    return None


async def test_click_to_call_rings_the_agent_first_then_the_customer_with_the_tenants_caller_id(
    rig: CallRig, factory: Factory
):
    ctx, number, gateway = await _tenant(rig, factory)
    agent = await rig.agent(ctx)
    async with _hub_messages(rig) as seen:
        placed = await _place(rig, agent, destination="01 42 68 53 00")  # local to the tenant's region (FR)
        assert placed.status_code == 202, placed.text
        body = placed.json()
        assert (body["destination"], body["caller_id"], body["state"]) == (CUSTOMER, number, "dialling_agent")
        iid, agent_leg = body["interaction_id"], body["call_uuid"]
        connected = await eventually(lambda: rig.state_is(ctx, iid, "connected"))
        assert connected["agent_id"] == str(agent.user_id)
        assert connected["attributes"]["direction"] == "outbound"
        assert await rig.agent_state(agent) == "busy"
        await eventually(lambda: _told(seen, agent, "connected"))
    originate = [c for c in rig.api_commands("originate") if iid in c]
    assert len(originate) == 1
    assert f"user/{agent.username}@{agent.domain}" in originate[0]
    assert f"&socket(127.0.0.1:{rig.control.port} async full)" in originate[0]
    assert f"origination_uuid={agent_leg}" in originate[0]
    bridges = [data for app, data in rig.app_log(agent_leg) if app == "bridge"]
    assert len(bridges) == 1 and bridges[0].endswith(f"sofia/gateway/{gateway}/{CUSTOMER}")
    assert f"origination_caller_id_number={number}" in bridges[0]
    customer = _customer_leg(rig, iid)
    assert customer.channel.profile.caller_id_number == number  # what the customer's phone shows

    live = await rig.client.get(f"/api/v1/voice/calls/{iid}", headers=agent.headers)
    assert live.status_code == 200 and live.json()["phase"] == "bridged", live.text
    held = await rig.client.post(f"/api/v1/voice/calls/{iid}/hold", headers=agent.headers)
    assert held.status_code == 200 and held.json()["held"], held.text
    assert agent_leg in rig.api_commands("uuid_hold")
    await rig.client.post(f"/api/v1/voice/calls/{iid}/unhold", headers=agent.headers)
    for mode in ("blind", "attended"):
        refused = await rig.client.post(
            f"/api/v1/voice/calls/{iid}/transfer",
            json={"target": "agent", "agent_id": str(ctx.owner_id), "mode": mode},
            headers=agent.headers,
        )
        assert refused.status_code == 409, (mode, refused.text)

    await rig.switch.caller_hangup(customer.channel.uuid)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled"
    names = [e["name"] for e in ended["timeline"]]
    assert names == ["created", "connected", "held", "resumed", "ended"], names
    await eventually(lambda: _state(rig, agent, "available"))

    async def both_legs() -> list[Any]:
        legs = await rig.legs(ctx, interaction_id=uuid.UUID(iid))
        return legs if len(legs) == 2 else []

    legs = await eventually(both_legs)
    mine = next(leg for leg in legs if str(leg.leg_uuid) == agent_leg)
    theirs = next(leg for leg in legs if str(leg.leg_uuid) != agent_leg)
    assert mine.agent_id == agent.user_id and mine.call_uuid == uuid.UUID(agent_leg)
    assert mine.disposition == "answered" and mine.direction == "outbound"
    assert theirs.call_uuid == uuid.UUID(agent_leg) and theirs.agent_id == agent.user_id
    assert theirs.caller_number == number and theirs.disposition == "answered"
    await eventually(lambda: _no_slots(rig, ctx))


async def _no_slots(rig: CallRig, ctx: TenantCtx) -> bool:
    return await rig.app.state.outbound.active_calls(ctx.tenant_id) == 0


async def _state(rig: CallRig, agent: Agent, state: str) -> bool:
    return await rig.agent_state(agent) == state


async def _refusals(rig: CallRig, ctx: TenantCtx) -> list[dict[str, Any]]:
    async with tenant_transaction(rig.app.state.sessionmaker, ctx.tenant_id) as session:
        rows = await session.scalars(select(AuditEntry).where(AuditEntry.action == "outbound.refused"))
        return [dict(row.after or {}) for row in rows.all()]


async def test_refusals_are_clear_audited_and_dial_nothing(rig: CallRig, factory: Factory):
    ctx, number, _ = await _tenant(rig, factory)
    other, foreign, _ = await _tenant(rig, factory)
    agent = await rig.agent(ctx)
    before = len(rig.api_commands("originate"))
    cases = [
        ({"destination": "+33899123456"}, "premium_rate"),
        ({"destination": "+442079460000"}, "international"),
        ({"destination": CUSTOMER, "caller_id": foreign}, "caller_id_not_owned"),
    ]
    for body, reason in cases:
        refused = await _place(rig, agent, **body)
        assert refused.status_code == 403, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["reason"] == reason
        assert refused.json()["detail"]
    invalid = await _place(rig, agent, destination="12")
    assert invalid.status_code == 422, invalid.text
    assert invalid.json()["errors"][0]["field"] == "destination"
    reasons = sorted(entry["reason"] for entry in await _refusals(rig, ctx))
    assert reasons == sorted(["premium_rate", "international", "caller_id_not_owned", "invalid_destination"])
    listed = await rig.client.get("/api/v1/interactions", params={"limit": 50}, headers=ctx.headers)
    assert listed.json()["items"] == []  # nothing half-written
    assert await rig.agent_state(agent) == "available"

    # The cap: one call at a time for this tenant; the second is refused while the first rings.
    ops = await factory.provider_headers()
    policy = await rig.client.put(
        f"/api/v1/ops/tenants/{ctx.tenant_id}/outbound-policy", json={"max_concurrent_calls": 1}, headers=ops
    )
    assert policy.status_code == 200, policy.text
    colleague = await rig.agent(ctx)
    rig.switch.far_end("+33142685301", "no_answer")
    first = await _place(rig, agent, destination="+33142685301")
    assert first.status_code == 202, first.text
    second = await _place(rig, colleague, destination=CUSTOMER)
    assert second.status_code == 403 and second.json()["reason"] == "concurrency_limit", second.text
    assert "concurrency_limit" in [entry["reason"] for entry in await _refusals(rig, ctx)]
    assert not [c for c in rig.api_commands("originate")[before:] if str(colleague.user_id) in c]
    iid = first.json()["interaction_id"]
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"), timeout=15)
    assert ended["outcome"] == "customer_no_answer"
    await eventually(lambda: _no_slots(rig, ctx))
    del other, number


async def test_an_agent_who_does_not_answer_their_phone_frees_the_call_and_is_told(rig: CallRig, factory: Factory):
    ctx, _, _ = await _tenant(rig, factory)
    agent = await rig.agent(ctx, behaviour="no_answer")
    async with _hub_messages(rig) as seen:
        placed = await _place(rig, agent, destination=CUSTOMER)
        assert placed.status_code == 202, placed.text
        iid = placed.json()["interaction_id"]
        ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"), timeout=15)
        told = await eventually(lambda: _told(seen, agent, "failed"))
    assert ended["outcome"] == "agent_no_answer"
    assert told["outcome"] == "agent_no_answer" and "phone" in told["detail"]
    assert [e["name"] for e in ended["timeline"]] == ["created", "ended"]
    assert not [data for app, data in rig.app_log(placed.json()["call_uuid"]) if app == "bridge"]
    await eventually(lambda: _state(rig, agent, "available"))
    await eventually(lambda: _no_slots(rig, ctx))


async def test_an_unregistered_phone_is_refused_before_anything_happens(rig: CallRig, factory: Factory):
    ctx, _, _ = await _tenant(rig, factory)
    agent = await rig.agent(ctx)
    rig.switch.unregister(agent.username)

    async def gone() -> bool:
        return await rig.app.state.voice.where_registered(ctx.tenant_id, agent.user_id) is None

    await eventually(gone)
    refused = await _place(rig, agent, destination=CUSTOMER)
    assert refused.status_code == 409 and refused.json()["type"].endswith("phone-not-registered"), refused.text


async def test_a_busy_customer_ends_the_call_with_a_clear_outcome(rig: CallRig, factory: Factory):
    ctx, _, _ = await _tenant(rig, factory)
    agent = await rig.agent(ctx)
    rig.switch.far_end("+33142685302", "busy")
    async with _hub_messages(rig) as seen:
        placed = await _place(rig, agent, destination="+33142685302")
        iid, agent_leg = placed.json()["interaction_id"], placed.json()["call_uuid"]
        ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"), timeout=15)
        told = await eventually(lambda: _told(seen, agent, "failed"))
    assert ended["outcome"] == "customer_busy"
    assert ended["timeline"][-1]["data"]["cause"] == "USER_BUSY"
    assert told["detail"] == "The customer's line is busy"

    async def spoken() -> list[str]:  # the agent is told first, then hears it
        return [data for app, data in rig.app_log(agent_leg) if app == "playback"]

    assert "busy" in (await eventually(spoken))[0]
    await eventually(lambda: _state(rig, agent, "available"))
    legs = await eventually(lambda: _two_legs(rig, ctx, iid))
    assert {leg.disposition for leg in legs} == {"answered", "busy"}


async def _two_legs(rig: CallRig, ctx: TenantCtx, iid: str) -> list[Any]:
    legs = await rig.legs(ctx, interaction_id=uuid.UUID(iid))
    return legs if len(legs) == 2 else []


# --- callbacks -------------------------------------------------------------------------------------


async def _callback(rig: CallRig, ctx: TenantCtx, did: str, queue: uuid.UUID, number: str) -> str:
    """A callback waiting in the queue, as a caller who pressed 1 leaves it."""
    routing = rig.app.state.routing
    opened = await routing.open(ctx.tenant_id, channel="voice", customer_ref=number, attributes={"did": did})
    await routing.enqueue(ctx.tenant_id, opened.id, queue)
    await routing.request_callback(ctx.tenant_id, opened.id, number, None)
    return str(opened.id)


async def _accepted(rig: CallRig, agent: Agent, iid: str) -> bool:
    response = await rig.client.post(f"/api/v1/interactions/{iid}/accept", headers=agent.headers)
    return response.status_code == 200


async def test_an_accepted_callback_is_dialled_once_even_with_two_call_control_processes(
    rig: CallRig, factory: Factory
):
    ctx, did, gateway = await _tenant(rig, factory)
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx, available=False)
    iid = await _callback(rig, ctx, did, queue, "+33142685303")
    second = CallControlServer(
        services_for(rig.app, rig.settings, CallStore(rig.app.state.redis, rig.settings)),
        "127.0.0.1",
        0,
        config=client_config(rig.settings),
    )
    await second.start()
    second.outbound.socket_address = f"127.0.0.1:{second.port}"
    try:
        await rig.set_state(agent, "available")
        await eventually(lambda: _accepted(rig, agent, iid))
        body = await eventually(lambda: _customer_answered(rig, iid))
        assert body
        await asyncio.sleep(0.3)  # room for a second dial, were there one
        originates = [c for c in rig.api_commands("originate") if iid in c]
        assert len(originates) == 1, originates
        customer = _customer_leg(rig, iid)
        assert customer.channel.profile.caller_id_number == did  # the number the customer called
        bridges = [data for app, data in rig.app_log(_agent_leg(originates[0])) if app == "bridge"]
        assert bridges[0].endswith(f"sofia/gateway/{gateway}/+33142685303")
        await rig.switch.caller_hangup(customer.channel.uuid)
        ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
        assert (ended["channel"], ended["outcome"]) == ("callback", "handled")
        legs = await eventually(lambda: _two_legs(rig, ctx, iid))
        assert all(leg.agent_id == agent.user_id for leg in legs)
    finally:
        await second.close()


def _agent_leg(originate: str) -> str:
    return originate.split("origination_uuid=", 1)[1].split(",", 1)[0].split("}", 1)[0]


async def _customer_answered(rig: CallRig, iid: str) -> bool:
    leg = _customer_leg(rig, iid)
    return leg is not None and leg.channel.answered


async def test_a_callback_whose_customer_does_not_answer_ends_as_callback_failed(rig: CallRig, factory: Factory):
    ctx, did, _ = await _tenant(rig, factory)
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx, available=False)
    rig.switch.far_end("+33142685304", "no_answer")
    iid = await _callback(rig, ctx, did, queue, "+33142685304")
    await rig.set_state(agent, "available")
    await eventually(lambda: _accepted(rig, agent, iid))
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"), timeout=15)
    assert ended["outcome"] == "callback_failed"
    last = ended["timeline"][-1]
    assert last["name"] == "ended" and last["data"]["reason"] == "customer_no_answer"
    assert last["data"]["destination"] == "+33142685304"
    await eventually(lambda: _no_slots(rig, ctx))


async def test_a_scheduled_callback_is_dialled_when_routing_offers_it_at_its_time(rig: CallRig, factory: Factory):
    from datetime import timedelta

    from backend.db.base import utcnow

    ctx, did, _ = await _tenant(rig, factory)
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx, available=False)
    routing = rig.app.state.routing
    opened = await routing.open(ctx.tenant_id, channel="voice", customer_ref="+33142685305", attributes={"did": did})
    await routing.enqueue(ctx.tenant_id, opened.id, queue)
    at = utcnow() + timedelta(seconds=1)
    await routing.request_callback(ctx.tenant_id, opened.id, "+33142685305", at)
    await rig.set_state(agent, "available")
    iid = str(opened.id)
    assert (await rig.interaction(ctx, iid))["state"] == "queued"  # not offered before its time
    await eventually(lambda: _accepted(rig, agent, iid), timeout=15)
    await eventually(lambda: _customer_answered(rig, iid))
    await rig.switch.caller_hangup(_customer_leg(rig, iid).channel.uuid)
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"))
    assert ended["outcome"] == "handled"
    assert "callback_requested" in [e["name"] for e in ended["timeline"]]


async def test_a_callback_whose_agent_does_not_answer_goes_back_to_its_queue(rig: CallRig, factory: Factory):
    ctx, did, _ = await _tenant(rig, factory)
    queue = await factory.queue(ctx)
    agent = await rig.agent(ctx, behaviour="no_answer", available=False)
    iid = await _callback(rig, ctx, did, queue, "+33142685306")
    await rig.set_state(agent, "available")
    await eventually(lambda: _accepted(rig, agent, iid))

    async def back() -> dict[str, Any] | None:
        body = await rig.interaction(ctx, iid)
        names = [e["name"] for e in body["timeline"]]
        return body if "transferred" in names and body["state"] in ("queued", "offered") else None

    body = await eventually(back, timeout=15)
    moved = next(e for e in body["timeline"] if e["name"] == "transferred")
    assert moved["data"]["reason"] == "agent_no_answer" and moved["data"]["mode"] == "callback_retry"
    assert (body["channel"], body["attributes"]["callback_number"]) == ("callback", "+33142685306")
    assert not [c for c in rig.api_commands("uuid_bridge") if iid in c]
    await eventually(lambda: _no_slots(rig, ctx))


async def test_a_number_the_carrier_does_not_know_ends_as_customer_unreachable(rig: CallRig, factory: Factory):
    ctx, _, _ = await _tenant(rig, factory)
    agent = await rig.agent(ctx)
    rig.switch.far_end("+33142685307", "unallocated")
    placed = await _place(rig, agent, destination="+33142685307")
    iid = placed.json()["interaction_id"]
    ended = await eventually(lambda: rig.state_is(ctx, iid, "ended"), timeout=15)
    assert ended["outcome"] == "customer_unreachable"
    assert ended["timeline"][-1]["data"]["cause"] == "UNALLOCATED_NUMBER"
    await eventually(lambda: _state(rig, agent, "available"))
    await eventually(lambda: _no_slots(rig, ctx))
