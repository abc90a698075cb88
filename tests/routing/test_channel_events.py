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
    """Call control and both CDR paths report each call's end: the first ends it; the repeats read it in one
    statement (`interaction_row`), which never sees another tenant's interaction or leaves a tenant set."""
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
        assert (await connection.fetchrow("SELECT * FROM interaction_row($1, $2)", b.tenant_id, theirs.id))[
            "state"
        ] == "ended"
        assert await connection.fetchrow("SELECT * FROM interaction_row($1, $2)", a.tenant_id, theirs.id) is None
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


async def test_a_channel_connects_its_contact_in_one_statement_for_its_tenant_only(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    """`connect_from_channel` (`connect_interaction`): an offered contact is connected, its two events written and
    its agent busy (audited as the system) without a transaction of the ORM's; a repeat writes nothing; another
    tenant's id finds nothing; no tenant is left on the pooled connection."""
    from sqlalchemy import event

    from backend.routing import service
    from backend.tenants.models import AuditEntry

    routing = app.state.routing
    a = await factory.tenant()
    b = await factory.tenant()
    offered = await factory.offered_interaction(b)
    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    with pytest.raises(NotFound):
        await routing.connect_from_channel(a.tenant_id, offered, b.owner_id)
    event.listen(engine.sync_engine, "begin", began)
    try:
        connected = await routing.connect_from_channel(b.tenant_id, offered, b.owner_id)
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert connected is not None
    assert (connected.state, connected.agent_id) == ("connected", b.owner_id)
    assert connected.connected_at is not None
    timeline = await _timeline(sessionmaker, b.tenant_id, offered)
    assert [(name, data) for _, name, data in timeline[-2:]] == [
        ("offer_accepted", {"forced": False}),
        ("connected", {}),
    ]
    async with tenant_transaction(sessionmaker, b.tenant_id) as session:
        assert (await service.get_agent_state(session, b.tenant_id, b.owner_id)).state == "busy"
        audited = (
            await session.scalars(
                select(AuditEntry).where(AuditEntry.actor_type == "system", AuditEntry.target_id == str(b.owner_id))
            )
        ).all()
        assert [(row.before, row.after) for row in audited] == [
            ({"state": "available", "reason": None}, {"state": "busy", "reason": None})
        ]
    again = await routing.connect_from_channel(b.tenant_id, offered, b.owner_id)
    assert again is not None and again.state == "connected"
    assert await _timeline(sessionmaker, b.tenant_id, offered) == timeline
    await routing.end_from_channel(b.tenant_id, offered)
    assert await routing.connect_from_channel(b.tenant_id, offered, b.owner_id) is None
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")


async def test_a_contact_the_matcher_never_offered_is_connected_to_the_agent_the_switch_bridged(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession]
):
    """Forced: the switch is the truth. A contact waiting in its queue, answered by an agent it was not offered to,
    is connected to them, recorded as forced, and the matcher holds it as connected (its queue no longer has it)."""
    routing = app.state.routing
    ctx = await factory.tenant()
    waiting = await factory.waiting_interaction(ctx)
    agent = await factory.seated_agent(ctx)
    connected = await routing.connect_from_channel(ctx.tenant_id, waiting, agent["id"])
    assert connected is not None
    assert (connected.state, connected.agent_id) == ("connected", agent["id"])
    timeline = await _timeline(sessionmaker, ctx.tenant_id, waiting)
    assert [(name, data) for _, name, data in timeline[-2:]] == [
        ("offer_accepted", {"forced": True}),
        ("connected", {}),
    ]
    assert await routing.matcher.state(ctx.tenant_id, waiting) == "connected"
    assert connected.queue_id is not None
    assert waiting not in await routing.matcher.waiting(ctx.tenant_id, connected.queue_id)


async def test_a_channel_ends_its_contact_without_a_transaction_of_the_orms(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    """`end_from_channel` (`interaction_row`, then `end_interaction`): a caller who leaves while waiting is abandoned
    with the time waited, the end carries the channel's facts, and no ORM transaction is opened."""
    from sqlalchemy import event

    routing = app.state.routing
    ctx = await factory.tenant()
    waiting = await factory.waiting_interaction(ctx)
    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    event.listen(engine.sync_engine, "begin", began)
    try:
        ended = await routing.end_from_channel(ctx.tenant_id, waiting, leg_uuid="leg-1", billable_ms=0)
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert ended is not None
    assert (ended.state, ended.outcome) == ("ended", "abandoned")
    timeline = await _timeline(sessionmaker, ctx.tenant_id, waiting)
    (_, abandoned, waited), (last_seq, name, data) = timeline[-2], timeline[-1]
    assert abandoned == "abandoned" and 0 <= waited["waited_seconds"] < 60
    assert (name, data) == ("ended", {"outcome": "abandoned", "leg_uuid": "leg-1", "billable_ms": 0})
    assert last_seq == len(timeline)
    assert await routing.matcher.state(ctx.tenant_id, waiting) is None  # it left its queue


async def test_an_end_decided_on_a_state_that_changed_meanwhile_is_decided_again(
    app, factory: Factory, sessionmaker: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch
):
    """The end is decided on the row as read, and written only if the row is still in that state: a call connected
    to an agent between the read and the write ends as handled (not abandoned) and frees that agent."""
    from backend.routing import interactions, service

    routing = app.state.routing
    ctx = await factory.tenant()
    waiting = await factory.waiting_interaction(ctx)
    agent = await factory.seated_agent(ctx)
    read = interactions.row
    reads = 0

    async def read_then_connect(driver: object, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> object:
        nonlocal reads
        reads += 1
        found = await read(driver, tenant_id, interaction_id)
        if reads == 1:
            assert await routing.connect_from_channel(tenant_id, interaction_id, agent["id"]) is not None
        return found

    monkeypatch.setattr(interactions, "row", read_then_connect)
    ended = await routing.end_from_channel(ctx.tenant_id, waiting)
    assert reads == 2
    assert ended is not None
    assert (ended.outcome, ended.agent_id) == ("handled", agent["id"])
    names = [name for _, name, _ in await _timeline(sessionmaker, ctx.tenant_id, waiting)]
    assert "abandoned" not in names and names[-2:] == ["connected", "ended"]
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        assert (await service.get_agent_state(session, ctx.tenant_id, agent["id"])).state != "busy"


async def test_a_channel_queues_its_contact_in_two_statements_for_its_tenant_only(
    app, factory: Factory, client, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
):
    """`enqueue` (`queue_rules`, then `queue_interaction`): the contact is queued with its priority and merged
    attributes and its `queued` event, without a transaction of the ORM's; not twice; another tenant's queue is
    refused as input and another tenant's contact is not found; a closed queue or one with nobody logged in ends it
    by its action."""
    from sqlalchemy import event

    from backend.lib.problems import Conflict, InvalidInput

    routing = app.state.routing
    a = await factory.tenant()
    b = await factory.tenant()
    queue = await factory.queue(b, priority=70)
    opened = await routing.open(b.tenant_id, channel="voice", attributes={"did": "+1"})
    with pytest.raises(InvalidInput):
        await routing.enqueue(b.tenant_id, opened.id, await factory.queue(a))
    with pytest.raises(NotFound):
        await routing.enqueue(a.tenant_id, opened.id, await factory.queue(a))
    transactions: list[object] = []

    def began(connection: object) -> None:
        transactions.append(connection)

    event.listen(engine.sync_engine, "begin", began)
    try:
        queued = await routing.enqueue(b.tenant_id, opened.id, queue, attributes={"language": "fr"})
    finally:
        event.remove(engine.sync_engine, "begin", began)
    assert transactions == []
    assert (queued.state, queued.queue_id, queued.priority) == ("queued", queue, 70)
    assert queued.attributes == {"did": "+1", "language": "fr"}
    assert queued.queued_at is not None
    assert (await _timeline(sessionmaker, b.tenant_id, opened.id))[-1] == (2, "queued", {"queue_id": str(queue)})
    assert opened.id in await routing.matcher.waiting(b.tenant_id, queue)
    with pytest.raises(Conflict):
        await routing.enqueue(b.tenant_id, opened.id, queue)

    hours = await client.post(
        "/api/v1/routing/business-hours", json={"name": "never", "weekly": [], "exceptions": []}, headers=b.headers
    )
    closed = await factory.queue(b, business_hours_id=hours.json()["id"], closed_action={"type": "voicemail"})
    late = await routing.open(b.tenant_id, channel="voice")
    refused = await routing.enqueue(b.tenant_id, late.id, closed)
    assert (refused.state, refused.outcome) == ("ended", "closed")
    nobody = await factory.queue(b, no_agents_action={"type": "callback"})
    alone = await routing.open(b.tenant_id, channel="voice")
    refused = await routing.enqueue(b.tenant_id, alone.id, nobody)
    assert (refused.state, refused.outcome) == ("ended", "no_agents")
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
