"""The routing engine under concurrent random use: every interaction ends exactly once, nothing leaks.

Several tasks drive two tenants through the engine's service API at once (the same calls the REST
routes and the agent WebSocket make): interactions arrive, agents accept, reject, end them, go away
and come back, customers abandon, and timers fire with offers past their time. Refusals (an offer
already taken, timed out or someone else's) are expected and must be clean problems. Afterwards
every interaction is ended once, with one terminal event; the timeline is consistent (nothing
offered after its end, every connection preceded by an offer to that agent); and routing holds
nothing: no waiting interaction, no load on any agent.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest
from sqlalchemy import select

from backend.auth.principal import Principal
from backend.db.engine import tenant_transaction
from backend.lib.problems import Problem
from backend.routing.engine import now_ms
from backend.routing.models import Interaction, InteractionEvent
from backend.routing.schemas import InteractionCreate

pytestmark = pytest.mark.integration

OPERATIONS_PER_TASK = 120
TASKS = 6


async def _world(client, factory, ctx):
    queues = [await factory.queue(ctx, offer_timeout_seconds=5, wrap_up_seconds=0) for _ in range(2)]
    agents = []
    for _ in range(4):
        agent = await factory.seated_agent(ctx)
        response = await client.put(
            f"/api/v1/routing/agents/{agent['id']}", json={"capacity": {"webchat": 2}}, headers=ctx.headers
        )
        assert response.status_code == 200, response.text
        agents.append(agent)
    return queues, agents


async def test_random_concurrent_use_ends_every_interaction_exactly_once(client, factory, app, sessionmaker):
    engine = app.state.routing
    tenants = [await factory.tenant() for _ in range(2)]
    worlds = {ctx.tenant_id: (ctx, *await _world(client, factory, ctx)) for ctx in tenants}
    created: dict[uuid.UUID, uuid.UUID] = {}  # interaction -> tenant
    refusals: list[int] = []  # an offer already taken, timed out, someone else's, an end already done

    def principal(ctx, agent) -> Principal:
        return Principal(
            kind="user",
            tenant_id=ctx.tenant_id,
            user_id=uuid.UUID(str(agent["id"])),
            permissions=frozenset({"agent:workspace"}),
        )

    async def offers_of(tenant_id: uuid.UUID, state: str) -> list[Interaction]:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            return list((await session.scalars(select(Interaction).where(Interaction.state == state))).all())

    async def drive(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(OPERATIONS_PER_TASK):
            ctx, queues, agents = worlds[rng.choice(list(worlds))]
            action = rng.random()
            try:
                if action < 0.30:
                    made = await engine.create(
                        ctx.tenant_id, InteractionCreate(channel="webchat", queue_id=rng.choice(queues))
                    )
                    created[made.id] = ctx.tenant_id
                elif action < 0.50:
                    offered = await offers_of(ctx.tenant_id, "offered")
                    if offered:
                        target = rng.choice(offered)
                        holder = next((a for a in agents if str(a["id"]) == str(target.agent_id)), rng.choice(agents))
                        await engine.accept(principal(ctx, holder), target.id)
                elif action < 0.60:
                    offered = await offers_of(ctx.tenant_id, "offered")
                    if offered:
                        target = rng.choice(offered)
                        holder = next((a for a in agents if str(a["id"]) == str(target.agent_id)), rng.choice(agents))
                        await engine.reject(principal(ctx, holder), target.id)
                elif action < 0.75:
                    talking = await offers_of(ctx.tenant_id, "connected")
                    if talking:
                        await engine.end(ctx.system(), rng.choice(talking).id)
                elif action < 0.82:
                    waiting = await offers_of(ctx.tenant_id, "queued")
                    if waiting:
                        await engine.end(ctx.system(), rng.choice(waiting).id, "abandoned")
                elif action < 0.90:
                    await engine.tick(ctx.tenant_id, now_ms() + rng.choice([0, 2_000, 6_000]))
                else:
                    agent = rng.choice(agents)
                    state = rng.choice(["available", "available", "away"])
                    body = {"state": state, **({"reason": "break"} if state == "away" else {})}
                    response = await client.put("/api/v1/routing/me/state", json=body, headers=agent["headers"])
                    assert response.status_code in (200, 409, 422), response.text
            except Problem as problem:
                refusals.append(problem.status)

    await asyncio.gather(*(drive(seed) for seed in range(TASKS)))
    assert len(created) > OPERATIONS_PER_TASK * TASKS // 5

    # Close what is still open, as the end of the day would: every open interaction ends now.
    for iid, tenant_id in created.items():
        ctx = worlds[tenant_id][0]
        try:
            await engine.end(ctx.system(), iid, "cancelled")
        except Problem as problem:
            refusals.append(problem.status)  # already ended

    for tenant_id, (ctx, _, agents) in worlds.items():
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            rows = {r.id: r for r in (await session.scalars(select(Interaction))).all()}
            events = (
                await session.scalars(
                    select(InteractionEvent).order_by(InteractionEvent.interaction_id, InteractionEvent.seq)
                )
            ).all()
        mine = {iid for iid, t in created.items() if t == tenant_id}
        assert set(rows) == mine  # nothing of the other tenant, nothing lost
        timelines: dict[uuid.UUID, list[InteractionEvent]] = {}
        for event in events:
            timelines.setdefault(event.interaction_id, []).append(event)
        for iid, timeline in timelines.items():
            names = [e.name for e in timeline]
            assert rows[iid].state == "ended", (iid, names)
            assert rows[iid].outcome in ("handled", "abandoned", "cancelled"), (iid, rows[iid].outcome)
            assert names.count("ended") == 1, [(e.name, str(e.agent_id)[:4]) for e in timeline]
            assert [e.seq for e in timeline] == list(range(1, len(timeline) + 1)), names
            ended_at = names.index("ended")
            assert "offered" not in names[ended_at:], names
            assert "connected" not in names[ended_at:], names
            offered_to = set()
            for event in timeline:
                if event.name == "offered":
                    offered_to.add(event.agent_id)
                if event.name == "connected":
                    assert event.agent_id in offered_to, names
        matcher = engine.matcher
        for agent in agents:
            load = await matcher.load(tenant_id, uuid.UUID(str(agent["id"])))
            assert set(load.values()) <= {0}, load
        for queue in worlds[tenant_id][1]:
            assert await matcher.waiting(tenant_id, queue) == []
    assert set(refusals) <= {403, 404, 409}, refusals
