"""The real-time queue view: figures on request, and pushed to supervisors' sockets as the queue changes."""

from __future__ import annotations

import pytest

from backend.routing.engine import now_ms
from tests.routing.test_engine import _available, _create
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration


async def test_queue_stats_count_waiting_answered_and_abandoned(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, service_level_seconds=20)
    agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    answered = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{answered['id']}/accept", headers=agent["headers"])
    left = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{left['id']}/end", json={"outcome": "abandoned"}, headers=ctx.headers)
    await _create(client, ctx, queue)
    stats = (await client.get(f"/api/v1/routing/queues/{queue}/stats", headers=ctx.headers)).json()
    assert stats["waiting"] == 1
    assert stats["offered_today"] == 3
    assert stats["answered_today"] == 1
    assert stats["abandoned_today"] == 1
    assert stats["service_level_percent"] == 50.0
    assert stats["abandonment_percent"] == 50.0
    assert stats["agents"]["busy"] == 1
    assert stats["longest_wait_seconds"] >= 0
    denied = await client.get(f"/api/v1/routing/queues/{queue}/stats", headers=agent["headers"])
    assert denied.status_code == 403


async def test_supervisors_get_figures_pushed_when_the_queue_changes(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    supervisor = await factory.user(ctx, role="supervisor", login=True)
    agent = await factory.user(ctx, role="agent", login=True)
    sup_ticket = (await client.post("/api/v1/auth/ws-ticket", headers=supervisor["headers"])).json()["ticket"]
    agent_ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with (
        websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={sup_ticket}") as wallboard,
        websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={agent_ticket}") as workspace,
    ):
        for socket in (wallboard, workspace):
            assert (await socket.receive_message())["type"] == "websocket.accept"
            await socket.receive_json()
        await _create(client, ctx, queue)
        await _create(client, ctx, queue)
        await app.state.routing.tick(ctx.tenant_id, now_ms() + 1_000)
        pushed = await wallboard.receive_json()
        assert pushed["type"] == "queue_stats"
        assert pushed["queue_id"] == str(queue)
        assert pushed["waiting"] == 2
        # One push for both changes (coalesced), and none to an agent without reports:read.
        await workspace.send_json({"type": "ping"})
        assert (await workspace.receive_json()) == {"type": "pong"}


async def test_service_level_counts_only_answers_within_the_target_and_nothing_of_yesterday(
    client, factory, sessionmaker
):
    """The day's figures are counted by the database (FILTER clauses): an answer after the queue's target is
    answered but not within it, and yesterday's contacts are not today's."""
    from datetime import timedelta

    from sqlalchemy import update

    from backend.db.engine import tenant_transaction
    from backend.routing.models import Interaction

    ctx = await factory.tenant()
    queue = await factory.queue(ctx, service_level_seconds=20)
    agent = await _available(client, factory, ctx, capacity={"webchat": 3})
    quick, late, old = [await _create(client, ctx, queue) for _ in range(3)]
    for made in (quick, late, old):
        await client.post(f"/api/v1/interactions/{made['id']}/accept", headers=agent["headers"])
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await session.execute(
            update(Interaction)
            .where(Interaction.id == late["id"])
            .values(connected_at=Interaction.queued_at + timedelta(seconds=25))
        )
        await session.execute(
            update(Interaction)
            .where(Interaction.id == old["id"])
            .values(queued_at=Interaction.queued_at - timedelta(days=2))
        )
    stats = (await client.get(f"/api/v1/routing/queues/{queue}/stats", headers=ctx.headers)).json()
    assert (stats["offered_today"], stats["answered_today"], stats["answered_within_target_today"]) == (2, 2, 1)
    assert stats["service_level_percent"] == 50.0 and stats["abandonment_percent"] == 0.0
