"""Agent states: who may set what, time in state, and going away when the workspace drops."""

import asyncio

import pytest

from backend.db.engine import tenant_transaction
from backend.routing import service
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration


async def _set(client, agent, **body):
    return await client.put("/api/v1/routing/me/state", json=body, headers=agent["headers"])


async def test_agent_walks_through_states_and_time_is_recorded(client, factory):
    ctx = await factory.tenant()
    await factory.code(ctx, "pause-reasons")
    reason = (await client.get("/api/v1/routing/pause-reasons", headers=ctx.headers)).json()["items"][0]["code"]
    agent = await factory.seated_agent(ctx)
    assert (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()["state"] == "offline"
    for body in (
        {"state": "available"},
        {"state": "away", "reason": reason},
        {"state": "available"},
        {"state": "offline"},
    ):
        response = await _set(client, agent, **body)
        assert response.status_code == 200, response.text
        assert response.json()["state"] == body["state"]
    history = (await client.get(f"/api/v1/routing/agents/{agent['id']}/state-history", headers=ctx.headers)).json()
    states = [p["state"] for p in history["items"]]
    assert states == ["offline", "available", "away", "available"]
    assert history["items"][0]["ended_at"] is None
    assert all(p["seconds"] is not None and p["seconds"] >= 0 for p in history["items"][1:])
    assert history["items"][2]["reason"] == reason
    audit = (await client.get("/api/v1/audit", params={"action": "agent_state."}, headers=ctx.headers)).json()
    assert len([e for e in audit["items"] if e["target_id"] == str(agent["id"])]) == 4


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"state": "busy"}, 422, "state"),
        ({"state": "wrap_up"}, 422, "state"),
        ({"state": "away"}, 422, "reason"),
        ({"state": "away", "reason": "no-such-reason"}, 422, "reason"),
        ({"state": "available", "reason": "lunch"}, 422, "reason"),
        ({"state": "dancing"}, 400, "state"),
    ],
)
async def test_changes_that_are_not_allowed(client, factory, body, status, field):
    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    response = await _set(client, agent, **body)
    assert response.status_code == status, response.text
    assert field in str(response.json())
    assert (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()["state"] == "offline"


async def test_no_seat_no_work(client, factory):
    ctx = await factory.tenant()
    agent = await factory.user(ctx, login=True)
    response = await _set(client, agent, state="available")
    assert response.status_code == 409
    assert response.json()["type"].endswith("/no-seat")


async def test_busy_agent_cannot_log_off_by_hand(client, factory, sessionmaker):
    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    assert (await _set(client, agent, state="available")).status_code == 200
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_system_state(session, ctx.tenant_id, agent["id"], "busy")
    response = await _set(client, agent, state="offline")
    assert response.status_code == 409
    assert response.json()["type"].endswith("/state-transition")


async def test_voice_ready_needs_a_registered_softphone(client, factory, sessionmaker):
    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    state = (await _set(client, agent, state="available")).json()
    assert state["voice_ready"] is False
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_voice_registration(session, ctx.tenant_id, agent["id"], registered=True)
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["voice_ready"] is True


async def test_state_over_the_websocket_and_away_after_the_grace_period(client, factory, app):
    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()  # hello
        await socket.send_json({"type": "set_state", "state": "available"})
        reply = await socket.receive_json()
        assert reply["type"] == "state"
        assert reply["state"] == "available"
        await socket.send_json({"type": "set_state", "state": "busy"})
        error = await socket.receive_json()
        assert error["type"] == "error"
        assert error["status"] == 422
        await socket.send_json({"type": "no_such_thing"})
        assert (await socket.receive_json())["type"] == "error"
    # The connection dropped: after the (shortened) grace period the agent is away, reason disconnected.
    for _ in range(50):
        state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
        if state["state"] == "away":
            break
        await asyncio.sleep(0.1)
    assert state["state"] == "away"
    assert state["reason"] == "disconnected"


async def test_reconnecting_within_the_grace_period_keeps_the_agent_available(client, factory, app):
    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    assert (await _set(client, agent, state="available")).status_code == 200
    first = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    second = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={second}") as keeper:
        assert (await keeper.receive_message())["type"] == "websocket.accept"
        async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={first}") as dropped:
            assert (await dropped.receive_message())["type"] == "websocket.accept"
        await asyncio.sleep(1.0)  # longer than the 0.5 s grace
        state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
        assert state["state"] == "available"


async def test_a_busy_agent_is_released_to_wrap_up_or_available_and_nobody_else_moves(
    client, factory, sessionmaker, engine
):
    """`agent_facts` with `release` (`agent_released`): the end of an agent's last contact moves busy only (available
    and away stay), to wrap-up when the queue asks for it, audited as the system; one statement, no ORM
    transaction."""
    from sqlalchemy import event, select

    from backend.tenants.models import AuditEntry

    ctx = await factory.tenant()
    agent = await factory.seated_agent(ctx)
    assert (await _set(client, agent, state="available")).status_code == 200

    async def release(wrap_up: bool) -> tuple[bool, str | None]:
        transactions: list[object] = []

        def began(connection: object) -> None:
            transactions.append(connection)

        event.listen(engine.sync_engine, "begin", began)
        try:
            facts = await service.agent_facts(engine, ctx.tenant_id, agent["id"], release=True, wrap_up=wrap_up)
        finally:
            event.remove(engine.sync_engine, "begin", began)
        assert transactions == []
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            state = await service.get_agent_state(session, ctx.tenant_id, agent["id"])
        assert facts.state == state.state
        return facts.moved, state.state

    async def system_entries() -> list[tuple[object, object]]:
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            rows = await session.scalars(
                select(AuditEntry)
                .where(AuditEntry.actor_type == "system", AuditEntry.target_id == str(agent["id"]))
                .order_by(AuditEntry.created_at)
            )
            return [(row.before, row.after) for row in rows]

    assert await release(wrap_up=True) == (False, "available")  # not busy: nothing to release
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.mark_busy(session, ctx.tenant_id, agent["id"])
    assert await release(wrap_up=True) == (True, "wrap_up")
    assert (await system_entries())[-1] == ({"state": "busy", "reason": None}, {"state": "wrap_up", "reason": None})
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_system_state(session, ctx.tenant_id, agent["id"], "busy")
    assert await release(wrap_up=False) == (True, "available")
    assert (await system_entries())[-1][1] == {"state": "available", "reason": None}
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await service.set_system_state(session, ctx.tenant_id, agent["id"], "away", "offer_timeout")
    entries = len(await system_entries())
    assert await release(wrap_up=True) == (False, "away")
    assert len(await system_entries()) == entries


async def test_what_routing_reads_of_an_agent_is_their_own_tenants_and_leaves_no_tenant_behind(
    client, factory, sessionmaker, engine
):
    """`agent_facts` (`agent_released`): state, capacity and skills of the tenant's agent only; another tenant asking
    for them (or releasing them) sees and changes nothing, and the pooled connection keeps no tenant."""
    from backend.db.engine import driver_connection

    a = await factory.tenant()
    b = await factory.tenant()
    agent = await factory.seated_agent(b)
    skill = await factory.skill(b)
    await factory.agent_skills(b, agent["id"], {skill: 7})
    async with tenant_transaction(sessionmaker, b.tenant_id) as session:
        await service.set_system_state(session, b.tenant_id, agent["id"], "busy")

    facts = await service.agent_facts(engine, b.tenant_id, agent["id"])
    assert (facts.moved, facts.state, facts.skills) == (False, "busy", {str(skill): 7})
    assert facts.since is not None

    intruder = await service.agent_facts(engine, a.tenant_id, agent["id"], release=True)
    assert (intruder.moved, intruder.state, intruder.since, intruder.capacity, intruder.skills) == (
        False,
        None,
        None,
        None,
        {},
    )
    assert (await service.agent_facts(engine, b.tenant_id, agent["id"])).state == "busy"
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
