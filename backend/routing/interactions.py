"""Interactions in PostgreSQL: created durably before they are queued, with an append-only timeline."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.db.base import utcnow
from backend.lib.masking import READ_SENSITIVE, mask_address
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import NotFound
from backend.routing.models import Interaction, InteractionEvent
from backend.routing.schemas import InteractionEventOut, InteractionOut
from backend.tenants import audit


async def record(
    session: AsyncSession,
    interaction: Interaction,
    name: str,
    *,
    agent_id: uuid.UUID | None = None,
    at: datetime | None = None,
    **data: Any,
) -> None:
    """Append one event to the interaction's timeline (numbered, in the caller's transaction)."""
    interaction.last_seq += 1
    session.add(
        InteractionEvent(
            tenant_id=interaction.tenant_id,
            interaction_id=interaction.id,
            seq=interaction.last_seq,
            name=name,
            at=at or utcnow(),
            agent_id=agent_id,
            data={k: str(v) if isinstance(v, uuid.UUID) else v for k, v in data.items()},
        )
    )


async def lock(session: AsyncSession, interaction_id: uuid.UUID) -> Interaction:
    """The interaction, locked for an update of its state."""
    found = await session.scalar(select(Interaction).where(Interaction.id == interaction_id).with_for_update())
    if found is None:
        raise NotFound("No such interaction")
    return found


_OPEN = "SELECT open_interaction($1, $2, $3, $4, $5::jsonb, $6, $7, $8::jsonb)"


async def open_new(driver: Any, interaction: Interaction) -> None:
    """Write a new interaction (state `new`) and its `created` event in one statement (`open_interaction`,
    migration 0017), its own transaction."""
    await driver.execute(
        _OPEN,
        interaction.tenant_id,
        interaction.id,
        interaction.channel,
        interaction.customer_ref,
        msgspec.json.encode(interaction.attributes).decode(),
        interaction.priority,
        interaction.created_at,
        msgspec.json.encode({"channel": interaction.channel}).decode(),
    )


_CONNECT = (
    "SELECT c.r_outcome, c.r_agent_moved, (c.r_interaction).* FROM connect_interaction($1, $2, $3, $4, $5, $6, $7) AS c"
)
_COLUMNS = tuple(column.key for column in Interaction.__table__.columns)


def _from_row(row: Any) -> Interaction:
    """The interaction a SQL function returned (its columns expanded, `(r).*`), as the ORM type `out` reads."""
    return Interaction(**{name: row[name] for name in _COLUMNS})


async def connect(
    driver: Any, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID, *, forced: bool
) -> tuple[str, Interaction]:
    """Connect the interaction to the agent who took it, in one statement (`connect_interaction`, migration 0020):
    its state, the `offer_accepted` and `connected` events, and the agent busy if they were available or away
    (audited as the system). Returns `connected`, `already` (with this agent before) or `ended` (nothing written),
    and the interaction as it now is. `driver` is a pooled asyncpg connection, or a transaction's (`session_driver`)
    whose row locks it shares."""
    ip, request_id = audit.origin()
    row = await driver.fetchrow(_CONNECT, tenant_id, interaction_id, agent_id, forced, utcnow(), ip, request_id)
    if row is None:
        raise NotFound("No such interaction")
    if row["r_agent_moved"]:
        audit.written(tenant_id=tenant_id, action="agent_state.change", target_type="user", target_id=str(agent_id))
    return row["r_outcome"], _from_row(row)


_ROW = "SELECT * FROM interaction_row($1, $2)"
_END = (
    "SELECT e.r_result, e.r_wrap_up_seconds, (e.r_interaction).* "
    "FROM end_interaction($1, $2, $3, $4, $5, $6, $7::jsonb) AS e"
)


async def row(driver: Any, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> Interaction | None:
    """The interaction as it is, unlocked, in one statement of its own (`interaction_row`, migration 0021); None
    when the tenant has no such one."""
    found = await driver.fetchrow(_ROW, tenant_id, interaction_id)
    return _from_row(found) if found is not None else None


_QUEUE = "SELECT q.r_result, (q.r_interaction).* FROM queue_interaction($1, $2, $3, $4, $5::jsonb, $6) AS q"


async def queue(
    driver: Any,
    tenant_id: uuid.UUID,
    interaction_id: uuid.UUID,
    queue_id: uuid.UUID,
    *,
    priority: int,
    attributes: dict[str, str],
    at: datetime,
) -> tuple[str, Interaction]:
    """Put a contact that is still `new` in its queue, in one statement (`queue_interaction`, migration 0023): its
    queue, state, queue time, priority, `attributes` merged into its own, and its `queued` event. Returns `queued`,
    or `not_new` (nothing written), and the interaction as it now is."""
    found = await driver.fetchrow(
        _QUEUE, tenant_id, interaction_id, queue_id, priority, msgspec.json.encode(attributes).decode(), at
    )
    if found is None:
        raise NotFound("No such interaction")
    return found["r_result"], _from_row(found)


async def end(
    driver: Any,
    interaction: Interaction,
    outcome: str,
    *,
    at: datetime,
    wrap_up_lookup: bool,
    data: dict[str, Any],
) -> tuple[bool, int, Interaction]:
    """End the interaction with `outcome` in one statement (`end_interaction`, migration 0021), if it is still in
    the state it was read in: its `abandoned` (for that outcome) and `ended` events are appended. Returns whether
    it was ended (False: its state changed meanwhile, nothing written), its queue's wrap-up seconds (asked for
    with `wrap_up_lookup`), and the interaction as it now is."""
    found = await driver.fetchrow(
        _END,
        interaction.tenant_id,
        interaction.id,
        interaction.state,
        outcome,
        wrap_up_lookup,
        at,
        msgspec.json.encode(data).decode(),
    )
    if found is None:
        raise NotFound("No such interaction")
    now = _from_row(found)
    return found["r_result"] == "ended", found["r_wrap_up_seconds"], now


def out(
    interaction: Interaction,
    *,
    position: int | None = None,
    estimated_wait: int | None = None,
    timeline: list[InteractionEvent] | None = None,
) -> InteractionOut:
    """The API's view of an interaction."""
    return InteractionOut(
        id=interaction.id,
        channel=interaction.channel,
        queue_id=interaction.queue_id,
        customer_ref=interaction.customer_ref,
        priority=interaction.priority,
        attributes=interaction.attributes,
        state=interaction.state,
        agent_id=interaction.agent_id,
        outcome=interaction.outcome,
        created_at=interaction.created_at,
        queued_at=interaction.queued_at,
        connected_at=interaction.connected_at,
        ended_at=interaction.ended_at,
        position=position,
        estimated_wait_seconds=estimated_wait,
        timeline=None
        if timeline is None
        else [InteractionEventOut(e.seq, e.name, e.at, e.agent_id, e.data) for e in timeline],
    )


CUSTOMER_ADDRESS_KEYS = frozenset(
    {"caller_number", "callback_number", "customer_address", "number", "to_number", "from_number", "email"}
)
"""Attribute and timeline keys whose values are a customer's phone number or e-mail address."""


def _masked(data: dict[str, Any]) -> dict[str, Any]:
    return {
        key: mask_address(value) if key in CUSTOMER_ADDRESS_KEYS and isinstance(value, str) else value
        for key, value in data.items()
    }


def as_seen_by(item: InteractionOut, permissions: Collection[str]) -> InteractionOut:
    """The interaction as someone may see it: without `customers:read_sensitive`, the customer's numbers and
    e-mail addresses (its reference while no record is attached, its attributes, its timeline) are masked."""
    if READ_SENSITIVE in permissions:
        return item
    return msgspec.structs.replace(
        item,
        customer_ref=mask_address(item.customer_ref) if item.customer_ref else None,
        attributes=_masked(item.attributes),
        timeline=None
        if item.timeline is None
        else [msgspec.structs.replace(event, data=_masked(event.data)) for event in item.timeline],
    )


async def get(session: AsyncSession, interaction_id: uuid.UUID) -> tuple[Interaction, list[InteractionEvent]]:
    """An interaction and its timeline."""
    found = await session.scalar(select(Interaction).where(Interaction.id == interaction_id))
    if found is None:
        raise NotFound("No such interaction")
    events = (
        await session.scalars(
            select(InteractionEvent)
            .where(InteractionEvent.interaction_id == interaction_id)
            .order_by(InteractionEvent.seq)
        )
    ).all()
    return found, list(events)


async def listing(
    session: AsyncSession,
    page: PageRequest,
    *,
    state: str | None = None,
    queue_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
) -> tuple[list[InteractionOut], str | None]:
    """Interactions, newest first by default."""
    statement = select(Interaction)
    if state:
        statement = statement.where(Interaction.state == state)
    if queue_id:
        statement = statement.where(Interaction.queue_id == queue_id)
    if agent_id:
        statement = statement.where(Interaction.agent_id == agent_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"created_at": Interaction.created_at},
        default_sort="-created_at",
        id_column=Interaction.id,
    )
    return [out(r) for r in rows], cursor


async def open_interactions(session: AsyncSession) -> list[Interaction]:
    """Every interaction of the tenant not yet ended: what routing rebuilds its state from."""
    return list(
        (
            await session.scalars(
                select(Interaction).where(Interaction.state.in_(("queued", "offered", "connected", "wrap_up")))
            )
        ).all()
    )
