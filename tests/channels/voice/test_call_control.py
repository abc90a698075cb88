"""Call control end to end: calls from a simulated node through the IVR, the queue and agents' phones."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from tests.channels.voice.call_rig import CallRig, call_rig
from tests.channels.voice.rig import eventually
from tests.factories import Factory

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
