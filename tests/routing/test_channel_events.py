"""A channel's own timeline events (`RoutingEngine.note`): one statement, numbered after the rest, never across
tenants, never on an interaction that has ended, and no tenant left on the pooled connection."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.db.engine import driver_connection, tenant_transaction
from backend.lib.problems import NotFound
from backend.routing.models import InteractionEvent
from tests.factories import Factory


async def _timeline(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, interaction_id: uuid.UUID
) -> list[tuple[int, str, dict[str, object]]]:
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        rows = await session.scalars(
            select(InteractionEvent)
            .where(InteractionEvent.interaction_id == interaction_id)
            .order_by(InteractionEvent.seq)
        )
        return [(row.seq, row.name, row.data) for row in rows]


async def test_notes_are_numbered_after_the_timeline_and_stop_once_it_ended(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession]
):
    routing = app.state.routing
    ctx = await factory.tenant()
    opened = await routing.open(ctx.tenant_id, channel="voice", attributes={"did": "+15550100"})
    node = uuid.uuid4()
    assert await routing.note(ctx.tenant_id, opened.id, "ivr_step", node="welcome", flow_id=node, version=3)
    assert await routing.note(ctx.tenant_id, opened.id, "held", agent_id=None)
    timeline = await _timeline(sessionmaker, ctx.tenant_id, opened.id)
    assert timeline == [
        (1, "created", {"channel": "voice"}),
        (2, "ivr_step", {"node": "welcome", "flow_id": str(node), "version": 3}),
        (3, "held", {}),
    ]
    await routing.end_from_channel(ctx.tenant_id, opened.id)
    ended = await _timeline(sessionmaker, ctx.tenant_id, opened.id)
    assert not await routing.note(ctx.tenant_id, opened.id, "ivr_step", node="too-late")
    assert await _timeline(sessionmaker, ctx.tenant_id, opened.id) == ended


async def test_a_note_never_reaches_another_tenants_interaction_nor_leaves_a_tenant_behind(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    routing = app.state.routing
    a = await factory.tenant()
    b = await factory.tenant()
    theirs = await routing.open(b.tenant_id, channel="voice")
    assert not await routing.note(a.tenant_id, theirs.id, "ivr_step", node="intruder")
    assert await _timeline(sessionmaker, b.tenant_id, theirs.id) == [(1, "created", {"channel": "voice"})]
    assert await routing.note(b.tenant_id, theirs.id, "ivr_step", node="menu")
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
        assert await connection.fetchval("SELECT count(*) FROM interaction_events") == 0  # no tenant: nothing


async def test_an_end_reported_again_is_answered_without_a_transaction_and_only_for_the_tenant(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    """Call control and both CDR paths report each call's end: the first ends it; the repeats read its state in
    one statement (`interaction_state`), which never sees another tenant's interaction or leaves a tenant set."""
    from sqlalchemy import event

    routing = app.state.routing
    a = await factory.tenant()
    b = await factory.tenant()
    theirs = await routing.open(b.tenant_id, channel="voice")
    ended = await routing.end_from_channel(b.tenant_id, theirs.id)
    assert ended is not None and ended.outcome == "abandoned"
    timeline = await _timeline(sessionmaker, b.tenant_id, theirs.id)

    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    event.listen(engine.sync_engine, "begin", began)
    try:
        assert await routing.end_from_channel(b.tenant_id, theirs.id) is None
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert await _timeline(sessionmaker, b.tenant_id, theirs.id) == timeline

    async with driver_connection(engine) as connection:
        assert await connection.fetchval("SELECT interaction_state($1, $2)", b.tenant_id, theirs.id) == "ended"
        assert await connection.fetchval("SELECT interaction_state($1, $2)", a.tenant_id, theirs.id) is None
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")


async def test_a_channel_opens_its_contact_in_one_statement_for_its_tenant_only(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    """`open` (`open_interaction`): the row in state new and its `created` event, written without a transaction of
    the ORM's, visible to its tenant only, and no tenant left on the pooled connection."""
    from sqlalchemy import event

    from backend.routing import interactions

    routing = app.state.routing
    a = await factory.tenant()
    b = await factory.tenant()
    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    event.listen(engine.sync_engine, "begin", began)
    try:
        opened = await routing.open(b.tenant_id, channel="voice", customer_ref="+15550100", attributes={"did": "+1"})
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert (opened.state, opened.channel, opened.customer_ref, opened.attributes) == (
        "new",
        "voice",
        "+15550100",
        {"did": "+1"},
    )
    async with tenant_transaction(sessionmaker, b.tenant_id) as session:
        stored, _ = await interactions.get(session, opened.id)
        assert interactions.out(stored) == opened
    assert await _timeline(sessionmaker, b.tenant_id, opened.id) == [(1, "created", {"channel": "voice"})]
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        with pytest.raises(NotFound):
            await interactions.get(session, opened.id)
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
    assert await routing.note(b.tenant_id, opened.id, "ivr_step", node="menu")  # numbered after `created`
    assert [seq for seq, *_ in await _timeline(sessionmaker, b.tenant_id, opened.id)] == [1, 2]
