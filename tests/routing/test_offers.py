"""Offers are written in group-committed batches: numbered in order, per tenant, each caller answered apart."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from backend.db.engine import tenant_transaction
from backend.routing import interactions
from backend.routing.offers import OfferRecorder

pytestmark = pytest.mark.integration


async def test_concurrent_offers_share_commits_and_keep_each_timeline_in_order(factory, sessionmaker):
    tenants = [await factory.tenant() for _ in range(3)]
    agents = {ctx.tenant_id: [uuid.uuid4() for _ in range(3)] for ctx in tenants}
    waiting = [(ctx, await factory.waiting_interaction(ctx)) for ctx in tenants for _ in range(8)]
    recorder = OfferRecorder(sessionmaker)
    results = await asyncio.gather(
        *(
            recorder.record(ctx.tenant_id, iid, agents[ctx.tenant_id][: 1 + i % 3], 15_000)
            for i, (ctx, iid) in enumerate(waiting)
        )
    )
    assert recorder.batches_written < len(waiting)  # group commit: fewer commits than offers
    for i, ((ctx, iid), result) in enumerate(zip(waiting, results, strict=True)):
        rang = agents[ctx.tenant_id][: 1 + i % 3]
        assert result.id == iid
        assert result.state == "offered"
        assert result.agent_id == (rang[0] if len(rang) == 1 else None)  # ringing at several: nobody's yet
        async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
            row, timeline = await interactions.get(session, iid)
        assert [e.name for e in timeline] == ["created", "queued", *["offered"] * len(rang)]
        assert [e.seq for e in timeline] == list(range(1, len(timeline) + 1))
        assert [e.agent_id for e in timeline[2:]] == rang
        assert timeline[-1].data == {"timeout_ms": 15_000}
        assert row.last_seq == len(timeline)


async def test_an_offer_for_an_interaction_it_cannot_see_is_refused_alone(factory, sessionmaker):
    mine, theirs = await factory.tenant(), await factory.tenant()
    own = await factory.waiting_interaction(mine)
    foreign = await factory.waiting_interaction(theirs)
    recorder = OfferRecorder(sessionmaker)
    good, wrong_tenant, unknown = await asyncio.gather(
        recorder.record(mine.tenant_id, own, [uuid.uuid4()], 1_000),
        recorder.record(mine.tenant_id, foreign, [uuid.uuid4()], 1_000),
        recorder.record(mine.tenant_id, uuid.uuid4(), [uuid.uuid4()], 1_000),
        return_exceptions=True,
    )
    assert not isinstance(good, BaseException)
    assert good.state == "offered"
    assert wrong_tenant is None  # row-level security hides the other tenant's row
    assert unknown is None
    async with tenant_transaction(sessionmaker, theirs.tenant_id) as session:
        row, timeline = await interactions.get(session, foreign)
    assert row.state == "queued"
    assert [e.name for e in timeline] == ["created", "queued"]


async def test_the_same_interaction_twice_in_a_batch_is_written_in_order(factory, sessionmaker):
    ctx = await factory.tenant()
    iid = await factory.waiting_interaction(ctx)
    first, second = uuid.uuid4(), uuid.uuid4()
    recorder = OfferRecorder(sessionmaker)
    await asyncio.gather(
        recorder.record(ctx.tenant_id, iid, [first], 1_000), recorder.record(ctx.tenant_id, iid, [second], 1_000)
    )
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        row, timeline = await interactions.get(session, iid)
    assert [(e.name, e.agent_id) for e in timeline[2:]] == [("offered", first), ("offered", second)]
    assert row.agent_id == second


async def test_an_interaction_that_ended_meanwhile_is_not_offered(factory, sessionmaker, app):
    ctx = await factory.tenant()
    iid = await factory.waiting_interaction(ctx)
    await app.state.routing.end(ctx.system(), iid, "abandoned")
    assert await OfferRecorder(sessionmaker).record(ctx.tenant_id, iid, [uuid.uuid4()], 1_000) is None
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        row, timeline = await interactions.get(session, iid)
    assert row.state == "ended"
    assert "offered" not in [e.name for e in timeline]
