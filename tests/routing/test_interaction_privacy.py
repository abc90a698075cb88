"""Interactions as each viewer may see them: the customer's number and e-mail masked without
`customers:read_sensitive`, in offers, acceptances and every route that returns an interaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from backend.routing.interactions import as_seen_by
from backend.routing.schemas import InteractionEventOut, InteractionOut
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration

CALLER = "+8613800138000"
SHOWN = "+86 138****8000"


def _interaction(**changes) -> InteractionOut:
    now = datetime.now(UTC)
    values = {
        "id": "00000000-0000-0000-0000-000000000001",
        "channel": "voice",
        "queue_id": None,
        "customer_ref": CALLER,
        "priority": 0,
        "attributes": {"caller_number": CALLER, "caller_name": "Wang Li", "did": "+33184880100"},
        "state": "queued",
        "agent_id": None,
        "outcome": None,
        "created_at": now,
        "queued_at": now,
        "connected_at": None,
        "ended_at": None,
        "timeline": [InteractionEventOut(1, "callback_requested", now, None, {"number": CALLER, "at": None})],
    }
    values.update(changes)
    return InteractionOut(**values)


def test_addresses_are_masked_for_viewers_without_the_permission():
    masked = as_seen_by(_interaction(), frozenset({"agent:workspace"}))
    assert masked.customer_ref == SHOWN
    assert masked.attributes == {"caller_number": SHOWN, "caller_name": "Wang Li", "did": "+33184880100"}
    assert masked.timeline is not None and masked.timeline[0].data["number"] == SHOWN
    shown = as_seen_by(_interaction(), frozenset({"customers:read_sensitive"}))
    assert shown.customer_ref == CALLER and shown.attributes["caller_number"] == CALLER


def test_a_customer_id_and_an_email_reference():
    customer_id = "7f9c1a52-0d0e-4e43-9a55-0b7c9c2d6a10"
    assert as_seen_by(_interaction(customer_ref=customer_id), ()).customer_ref == customer_id
    assert as_seen_by(_interaction(customer_ref="wang.li@example.com"), ()).customer_ref == "w***@example.com"


async def test_an_agent_without_the_permission_is_offered_and_handles_it_masked(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=0)
    agent = await factory.seated_agent(ctx)
    assert (
        await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    ).status_code == 200
    ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()  # hello
        created = await client.post(
            "/api/v1/interactions",
            json={
                "channel": "webchat",  # voice would wait for a registered softphone
                "queue_id": str(queue),
                "customer_ref": CALLER,
                "attributes": {"caller_number": CALLER, "caller_name": "Wang Li"},
            },
            headers=ctx.headers,
        )
        assert created.status_code == 201, created.text
        assert created.json()["customer_ref"] == CALLER  # the owner sees numbers
        offer = await socket.receive_json()
        assert offer["type"] == "offer"
        assert offer["interaction"]["customer_ref"] == SHOWN
        assert offer["interaction"]["attributes"] == {"caller_number": SHOWN, "caller_name": "Wang Li"}
        assert "13800138000" not in json.dumps(offer)
        await socket.send_json({"type": "accept", "interaction_id": created.json()["id"]})
        accepted = await socket.receive_json()
        assert accepted["type"] == "accepted"
        assert accepted["interaction"]["customer_ref"] == SHOWN
    ended = await client.post(
        f"/api/v1/interactions/{created.json()['id']}/end", json={"outcome": "handled"}, headers=agent["headers"]
    )
    assert ended.status_code == 200, ended.text
    assert "13800138000" not in ended.text
    as_owner = await client.get(f"/api/v1/interactions/{created.json()['id']}", headers=ctx.headers)
    assert as_owner.json()["customer_ref"] == CALLER
