"""Queue behaviour driven by timers: maximum wait and overflow, relaxing skills, wrap-up, no agents, estimates."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from backend.routing.engine import now_ms
from tests.routing.test_engine import _available, _create, _timeline

pytestmark = pytest.mark.integration


async def test_max_wait_overflows_to_another_queue(client, factory, app):
    ctx = await factory.tenant()
    spill = await factory.queue(ctx)
    queue = await factory.queue(ctx, max_wait_seconds=30, overflow_action={"type": "queue", "queue_id": str(spill)})
    waiting = await _create(client, ctx, queue)
    assert waiting["state"] == "queued"
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 31_000)
    moved = (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()
    assert moved["queue_id"] == str(spill)
    assert moved["state"] == "queued"
    assert moved["position"] == 1
    assert await _timeline(client, ctx, waiting["id"]) == ["created", "queued", "overflowed", "queued"]
    matcher = app.state.routing.matcher
    assert await matcher.waiting(ctx.tenant_id, uuid.UUID(str(queue))) == []


async def test_max_wait_to_voicemail_ends_it(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, max_wait_seconds=10, overflow_action={"type": "voicemail"})
    waiting = await _create(client, ctx, queue)
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 5_000)
    assert (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()["state"] == "queued"
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 11_000)
    ended = (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()
    assert ended["state"] == "ended"
    assert ended["outcome"] == "overflowed"
    assert ended["timeline"][-1]["data"]["action"]["type"] == "voicemail"


async def test_relaxed_skill_requirement_reaches_a_junior_agent(client, factory, app):
    ctx = await factory.tenant()
    skill = await factory.skill(ctx)
    queue = await factory.queue(
        ctx,
        skills=[
            {
                "skill_id": str(skill),
                "steps": [{"after_seconds": 0, "min_level": 8}, {"after_seconds": 20, "min_level": 2}],
            }
        ],
    )
    junior = await factory.seated_agent(ctx)
    await client.put(
        f"/api/v1/routing/agents/{junior['id']}",
        json={"skills": [{"skill_id": str(skill), "level": 3}]},
        headers=ctx.headers,
    )
    await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=junior["headers"])
    waiting = await _create(client, ctx, queue)
    assert waiting["state"] == "queued"
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 21_000)
    offered = (await client.get(f"/api/v1/interactions/{waiting['id']}", headers=ctx.headers)).json()
    assert offered["state"] == "offered"
    assert offered["agent_id"] == str(junior["id"])


async def test_wrap_up_ends_by_the_queue_timer(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=15)
    agent = await _available(client, factory, ctx)
    chat = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{chat['id']}/accept", headers=agent["headers"])
    await client.post(f"/api/v1/interactions/{chat['id']}/end", json={"outcome": "handled"}, headers=agent["headers"])
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "wrap_up"
    await app.state.routing.tick(ctx.tenant_id, now_ms() + 16_000)
    state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
    assert state["state"] == "available"


async def test_agent_ends_wrap_up_early(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, wrap_up_seconds=300)
    agent = await _available(client, factory, ctx)
    chat = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{chat['id']}/accept", headers=agent["headers"])
    await client.post(f"/api/v1/interactions/{chat['id']}/end", json={"outcome": "handled"}, headers=agent["headers"])
    back = await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    assert back.json()["state"] == "available"


async def test_no_agents_logged_in_applies_its_action(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, no_agents_action={"type": "callback"})
    created = await _create(client, ctx, queue)
    assert created["state"] == "ended"
    assert created["outcome"] == "no_agents"


async def test_estimated_wait_grows_with_position(client, factory):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    first = await _create(client, ctx, queue)
    second = await _create(client, ctx, queue)
    assert first["estimated_wait_seconds"] > 0
    assert second["estimated_wait_seconds"] == 2 * first["estimated_wait_seconds"]


async def test_timer_loop_expires_offers_without_being_called(client, factory, app):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx, offer_timeout_seconds=5)
    agent = await _available(client, factory, ctx)
    chat = await _create(client, ctx, queue)
    assert chat["state"] == "offered"
    # Pull the offer's deadline into the past, as if five seconds had gone by.
    matcher = app.state.routing.matcher
    await app.state.redis.zadd(matcher.prefix(ctx.tenant_id) + "offers", {chat["id"]: now_ms() - 1})
    await matcher.wake(ctx.tenant_id, now_ms() - 1)
    stop = asyncio.Event()
    loop = asyncio.create_task(app.state.routing.run_timers(stop, max_sleep_seconds=0.05))
    try:
        for _ in range(60):
            state = (await client.get("/api/v1/routing/me/state", headers=agent["headers"])).json()
            if state["state"] == "away":
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await loop
    assert state["reason"] == "offer_timeout"
    assert "offer_timed_out" in await _timeline(client, ctx, chat["id"])
