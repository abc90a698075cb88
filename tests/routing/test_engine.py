"""The routing engine end to end: create, offer, accept, reject, time out, end, capacity, hours, rebuild."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest

from backend.db.engine import tenant_transaction
from backend.routing import service
from backend.routing.engine import now_ms
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration


async def _available(client, factory, ctx, *, capacity=None):
    agent = await factory.seated_agent(ctx)
    if capacity is not None:
        response = await client.put(
            f"/api/v1/routing/agents/{agent['id']}", json={"capacity": capacity}, headers=ctx.headers
        )
        assert response.status_code == 200, response.text
    response = await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    assert response.status_code == 200, response.text
    return agent


async def _create(client, ctx, queue, channel="webchat", **extra):
    response = await client.post(
        "/api/v1/interactions", json={"channel": channel, "queue_id": str(queue), **extra}, headers=ctx.headers
    )
    assert response.status_code == 201, response.text
    return response.json()


async def _timeline(client, ctx, interaction_id):
    return [
        e["name"]
        for e in (await client.get(f"/api/v1/interactions/{interaction_id}", headers=ctx.headers)).json()["timeline"]
    ]


async def test_chat_is_offered_accepted_and_ended(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=0)
    agent = await _available(client, factory, ctx)
    ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()  # hello
        created = await _create(client, ctx, queue)
        assert created["state"] == "offered"
        assert created["agent_id"] == str(agent["id"])
        offer = await socket.receive_json()
        assert offer["type"] == "offer"
        assert offer["interaction"]["id"] == created["id"]
        await socket.send_json({"type": "accept", "interaction_id": created["id"]})
        accepted = await socket.receive_json()
        assert accepted["type"] == "accepted"
        assert accepted["interaction"]["state"] == "connected"
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "busy"
    ended = await client.post(
        f"/api/v1/interactions/{created['id']}/end", json={"outcome": "handled"}, headers=agent["headers"]
    )
    assert ended.status_code == 200, ended.text
    assert ended.json()["outcome"] == "handled"
    assert await _timeline(client, ctx, created["id"]) == [
        "created",
        "queued",
        "offered",
        "offer_accepted",
        "connected",
        "ended",
    ]
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "available"


async def test_capacity_limits_offers_and_the_rest_wait_in_order(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    await _available(client, factory, ctx, capacity={"webchat": 2})
    first, second, third, fourth = [await _create(client, ctx, queue) for _ in range(4)]
    assert [first["state"], second["state"], third["state"], fourth["state"]] == [
        "offered",
        "offered",
        "queued",
        "queued",
    ]
    assert third["position"] == 1
    assert fourth["position"] == 2
    detail = (await client.get(f"/api/v1/interactions/{fourth['id']}", headers=ctx.headers)).json()
    assert detail["position"] == 2


async def test_voice_waits_for_a_registered_softphone(client, factory, app, sessionmaker):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await _available(client, factory, ctx)
    call = await _create(client, ctx, queue, channel="voice")
    assert call["state"] == "queued"
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_voice_registration(session, ctx.tenant_id, agent["id"], registered=True)
    await app.state.routing.sync_agent(ctx.tenant_id, agent["id"])
    detail = (await client.get(f"/api/v1/interactions/{call['id']}", headers=ctx.headers)).json()
    assert detail["state"] == "offered"
    assert detail["agent_id"] == str(agent["id"])


async def test_reject_and_timeout_return_the_interaction_to_its_place(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, offer_timeout_seconds=5)
    first_agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    older = await _create(client, ctx, queue)
    newer = await _create(client, ctx, queue)
    assert older["agent_id"] == str(first_agent["id"])
    assert newer["state"] == "queued"
    # Someone else cannot take it, and the offer cannot be taken twice.
    intruder = await _available(client, factory, ctx, capacity={"webchat": 1})
    # The newer one went to the second agent as soon as they came in.
    assert (await client.get(f"/api/v1/interactions/{newer['id']}", headers=ctx.headers)).json()["agent_id"] == str(
        intruder["id"]
    )
    stolen = await client.post(f"/api/v1/interactions/{older['id']}/accept", headers=intruder["headers"])
    assert stolen.status_code == 403
    # Decline: back to its old place, offered again.
    assert (
        await client.post(f"/api/v1/interactions/{older['id']}/reject", headers=first_agent["headers"])
    ).status_code == 204
    again = (await client.get(f"/api/v1/interactions/{older['id']}", headers=ctx.headers)).json()
    assert again["state"] == "offered"
    holder = again["agent_id"]
    # Nobody answers: the offer times out, the agent goes away, the interaction waits again.
    expired = await app.state.routing.tick(ctx.tenant_id, now_ms() + 6_000)
    assert expired >= 1
    holder_headers = first_agent["headers"] if holder == str(first_agent["id"]) else intruder["headers"]
    state = (await client.get("/api/v1/routing/me/state", headers=holder_headers)).json()
    assert state["state"] == "away"
    assert state["reason"] == "offer_timeout"
    late = await client.post(f"/api/v1/interactions/{older['id']}/accept", headers=holder_headers)
    assert late.status_code in (403, 409)
    names = await _timeline(client, ctx, older["id"])
    assert names[:5] == ["created", "queued", "offered", "offer_rejected", "offered"]
    assert "offer_timed_out" in names


async def test_closed_queue_applies_its_closed_action(client, factory):
    ctx = await factory.tenant()
    hours = await client.post(
        "/api/v1/routing/business-hours",
        json={"name": "never", "weekly": [], "exceptions": []},
        headers=ctx.headers,
    )
    queue = await factory.queue(ctx, business_hours_id=hours.json()["id"], closed_action={"type": "voicemail"})
    created = await _create(client, ctx, queue)
    assert created["state"] == "ended"
    assert created["outcome"] == "closed"


async def test_customer_abandons_while_waiting(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    waiting = await _create(client, ctx, queue)
    assert waiting["state"] == "queued"
    ended = await client.post(
        f"/api/v1/interactions/{waiting['id']}/end", json={"outcome": "abandoned"}, headers=ctx.headers
    )
    assert ended.json()["outcome"] == "abandoned"
    detail = (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()
    abandoned = next(e for e in detail["timeline"] if e["name"] == "abandoned")
    assert float(abandoned["data"]["waited_seconds"]) >= 0
    assert detail["position"] is None


async def test_rebuild_after_redis_loses_routing_state(client, factory, app, redis):
    """Routing state is rebuilt from PostgreSQL: same order, no interaction lost or offered twice, loads kept."""
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    connected = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{connected['id']}/accept", headers=agent["headers"])
    waiting = [await _create(client, ctx, queue) for _ in range(3)]
    matcher = app.state.routing.matcher
    before = await matcher.waiting(ctx.tenant_id, uuid.UUID(queue_id := str(queue)))
    assert before == [uuid.UUID(w["id"]) for w in waiting]
    keys = [k async for k in redis.scan_iter(match=matcher.prefix(ctx.tenant_id) + "*")]
    await redis.delete(*keys)
    assert await matcher.waiting(ctx.tenant_id, uuid.UUID(queue_id)) == []
    restored = await app.state.routing.rebuild(ctx.tenant_id)
    assert restored == 4
    assert await matcher.waiting(ctx.tenant_id, uuid.UUID(queue_id)) == before
    assert await matcher.load(ctx.tenant_id, agent["id"]) == {"webchat": 1}
    # The agent is full: nothing was offered to them twice.
    for w in waiting:
        assert (await client.get(f"/api/v1/interactions/{w['id']}", headers=ctx.headers)).json()["state"] == "queued"


async def test_many_agents_many_chats_no_double_offers(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agents = [await _available(client, factory, ctx, capacity={"webchat": 2}) for _ in range(4)]
    created = await asyncio.gather(*(_create(client, ctx, queue) for _ in range(12)))
    # (A create's answer may predate the offer another request's matching made of it: read them again.)
    now = [(await client.get(f"/api/v1/interactions/{c['id']}", headers=ctx.headers)).json() for c in created]
    offered = [c for c in now if c["state"] == "offered"]
    assert len(offered) == 8
    waiting = sorted((c for c in now if c["state"] == "queued"), key=lambda c: c["position"])
    assert [c["position"] for c in waiting] == [1, 2, 3, 4]
    per_agent = {str(a["id"]): 0 for a in agents}
    for c in offered:
        per_agent[c["agent_id"]] += 1
    assert set(per_agent.values()) == {2}


async def test_ring_all_voice_queue_rings_every_registered_agent_and_withdraws_the_rest(
    client, factory, app, sessionmaker
):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, strategy="ring_all", wrap_up_seconds=0)
    agents = [await _available(client, factory, ctx) for _ in range(3)]
    for agent in agents[:2]:  # the third has no softphone registered: it never rings
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            await service.set_voice_registration(session, ctx.tenant_id, agent["id"], registered=True)
        await app.state.routing.sync_agent(ctx.tenant_id, agent["id"])
    sockets = []
    async with contextlib.AsyncExitStack() as stack:
        for agent in agents[:2]:
            ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
            socket = await stack.enter_async_context(
                websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}")
            )
            assert (await socket.receive_message())["type"] == "websocket.accept"
            await socket.receive_json()  # hello
            sockets.append(socket)
        call = await _create(client, ctx, queue, channel="voice")
        assert call["state"] == "offered"
        assert call["agent_id"] is None  # ringing at several phones: nobody has it yet
        for socket in sockets:
            offer = await _next_of_type(socket, "offer")
            assert offer["interaction"]["id"] == call["id"]
            assert offer["ringing_agents"] == 2
        taken = await client.post(f"/api/v1/interactions/{call['id']}/accept", headers=agents[1]["headers"])
        assert taken.status_code == 200, taken.text
        assert taken.json()["agent_id"] == str(agents[1]["id"])
        withdrawn = await _next_of_type(sockets[0], "offer_withdrawn")
        assert withdrawn["interaction_id"] == call["id"]
        late = await client.post(f"/api/v1/interactions/{call['id']}/accept", headers=agents[0]["headers"])
        assert late.status_code == 409
    names = await _timeline(client, ctx, call["id"])
    assert names.count("offered") == 2
    assert names[-2:] == ["offer_accepted", "connected"]


async def _next_of_type(socket, kind: str) -> dict:
    for _ in range(20):
        message = await asyncio.wait_for(socket.receive_json(), 5)
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} message")


async def test_an_agent_who_ends_a_chat_is_offered_the_next_at_once(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=0)
    agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    first = await _create(client, ctx, queue)
    second = await _create(client, ctx, queue)
    assert (first["state"], second["state"]) == ("offered", "queued")
    accepted = await client.post(f"/api/v1/interactions/{first['id']}/accept", headers=agent["headers"])
    assert accepted.status_code == 200, accepted.text
    ended = await client.post(
        f"/api/v1/interactions/{first['id']}/end", json={"outcome": "handled"}, headers=agent["headers"]
    )
    assert ended.status_code == 200, ended.text
    detail = (await client.get(f"/api/v1/interactions/{second['id']}", headers=ctx.headers)).json()
    assert detail["state"] == "offered"
    assert detail["agent_id"] == str(agent["id"])
    assert [e["name"] for e in detail["timeline"]] == ["created", "queued", "offered"]
    # Free again (an offer is not work in hand) until they accept it.
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "available"
    accepted = await client.post(f"/api/v1/interactions/{second['id']}/accept", headers=agent["headers"])
    assert accepted.status_code == 200, accepted.text


async def test_an_agent_going_to_wrap_up_is_offered_the_next_only_after_it(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=15)
    agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    first = await _create(client, ctx, queue)
    second = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{first['id']}/accept", headers=agent["headers"])
    await client.post(f"/api/v1/interactions/{first['id']}/end", json={"outcome": "handled"}, headers=agent["headers"])
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "wrap_up"
    detail = (await client.get(f"/api/v1/interactions/{second['id']}", headers=ctx.headers)).json()
    assert detail["state"] == "queued"
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 16_000)
    detail = (await client.get(f"/api/v1/interactions/{second['id']}", headers=ctx.headers)).json()
    assert detail["state"] == "offered"
    assert detail["agent_id"] == str(agent["id"])
