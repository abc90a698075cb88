"""Callbacks that keep the customer's place, and callbacks booked for later."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from backend.routing.engine import now_ms
from tests.routing.test_engine import _available, _create

pytestmark = pytest.mark.integration


async def test_callback_keeps_its_place_and_is_offered_as_voice(client, factory, app, sessionmaker):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    first, second, third = [await _create(client, ctx, queue, channel="voice") for _ in range(3)]
    response = await client.post(
        f"/api/v1/interactions/{second['id']}/callback", json={"number": "+86 138 0013 8000"}, headers=ctx.headers
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["channel"] == "callback"
    assert body["attributes"]["callback_number"] == "+8613800138000"
    assert body["position"] == 2  # the same place
    matcher = app.state.routing.matcher
    assert await matcher.waiting(ctx.tenant_id, queue) == [uuid.UUID(x["id"]) for x in (first, second, third)]
    # An agent with a softphone gets the line in order; the callback counts as a voice call.
    from backend.db.engine import tenant_transaction
    from backend.routing import service

    agent = await _available(client, factory, ctx)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_voice_registration(session, ctx.tenant_id, agent["id"], registered=True)
    await app.state.routing.sync_agent(ctx.tenant_id, agent["id"])
    assert (await client.get(f"/api/v1/interactions/{first['id']}", headers=ctx.headers)).json()["state"] == "offered"
    await client.post(f"/api/v1/interactions/{first['id']}/accept", headers=agent["headers"])
    await client.post(f"/api/v1/interactions/{first['id']}/end", json={}, headers=agent["headers"])
    await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    offered = (await client.get(f"/api/v1/interactions/{second['id']}", headers=ctx.headers)).json()
    assert offered["state"] == "offered"
    assert offered["channel"] == "callback"
    names = [e["name"] for e in offered["timeline"]]
    assert names == ["created", "queued", "callback_requested", "offered"]


async def test_scheduled_callback_joins_the_line_at_its_time(client, factory, app):
    ctx = await factory.tenant(time_zone="UTC")
    queue = await factory.queue(ctx)
    waiting = await _create(client, ctx, queue, channel="voice")
    at = datetime.now(UTC) + timedelta(hours=2)
    response = await client.post(
        f"/api/v1/interactions/{waiting['id']}/callback",
        json={"number": "+33142685300", "at": at.isoformat()},
        headers=ctx.headers,
    )
    assert response.status_code == 200, response.text
    assert response.json()["position"] is None  # parked until its time
    assert await app.state.routing.matcher.waiting(ctx.tenant_id, queue) == []
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 2 * 3600 * 1000 + 1000)
    back = (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()
    assert back["position"] == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"number": "not a number"}, "number"),
        ({"number": "+1 555"}, "number"),
        ({"number": "+33142685300", "at": "2001-01-01T10:00:00Z"}, "at"),
        ({"number": "+33142685300", "at": "2099-01-01T10:00:00Z"}, "at"),
    ],
)
async def test_bad_callback_requests(client, factory, body, field):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    waiting = await _create(client, ctx, queue, channel="voice")
    response = await client.post(f"/api/v1/interactions/{waiting['id']}/callback", json=body, headers=ctx.headers)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["field"] == field
    assert (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()["position"] == 1


async def test_callback_outside_business_hours_is_refused(client, factory):
    ctx = await factory.tenant(time_zone="UTC")
    hours = await client.post(
        "/api/v1/routing/business-hours",
        json={
            "name": "weekday mornings",
            "weekly": [{"day": d, "start": "00:00", "end": "24:00"} for d in range(7)],
            "holidays": [{"date": (datetime.now(UTC) + timedelta(days=2)).date().isoformat()}],
        },
        headers=ctx.headers,
    )
    queue = await factory.queue(ctx, business_hours_id=hours.json()["id"])
    waiting = await _create(client, ctx, queue, channel="voice")
    at = (datetime.now(UTC) + timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
    response = await client.post(
        f"/api/v1/interactions/{waiting['id']}/callback",
        json={"number": "+33142685300", "at": at.isoformat()},
        headers=ctx.headers,
    )
    assert response.status_code == 422
    assert "business hours" in response.json()["detail"]
