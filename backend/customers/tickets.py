"""Tickets (work orders): created from an interaction or by hand, assigned, moved through their statuses
against a per-priority SLA, commented, and every change kept in the ticket's history.

Assignees are told through the agent hub once the change has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import Integer, Select, String, cast, func, literal, null, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import get_settings
from backend.customers.access import Viewer, check_version, expected_version
from backend.customers.models import TICKET_PRIORITIES, Customer, Ticket, TicketEvent, TicketSla
from backend.customers.schemas import (
    CommentCreate,
    SlaOut,
    SlaUpdate,
    TicketCreate,
    TicketEventOut,
    TicketOut,
    TicketSummary,
    TicketUpdate,
)
from backend.db.base import utcnow
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.lib.validation import clean_text
from backend.routing import service as routing_service
from backend.tenants import audit
from backend.tenants import service as tenants_service

ERASED = "[erased]"
CLOSED_STATUSES = ("resolved", "closed")
TRANSITIONS: dict[str, frozenset[str]] = {
    "new": frozenset({"open", "pending", "resolved", "closed"}),
    "open": frozenset({"pending", "resolved", "closed"}),
    "pending": frozenset({"open", "resolved", "closed"}),
    "resolved": frozenset({"open", "closed"}),
    "closed": frozenset(),
}
"""Where a ticket may go from each status: resolved tickets can be reopened, closed ones are final."""

Notify = Callable[[uuid.UUID, dict[str, Any]], None]
"""Tell one user something through the real-time channel (the caller sends it once the change commits)."""


def _default_sla() -> dict[str, int]:
    settings = get_settings()
    return {
        "urgent": settings.ticket_sla_minutes_urgent,
        "high": settings.ticket_sla_minutes_high,
        "normal": settings.ticket_sla_minutes_normal,
        "low": settings.ticket_sla_minutes_low,
    }


async def sla_minutes(session: AsyncSession) -> dict[str, int]:
    """Minutes to resolve a ticket, per priority: the tenant's own or the defaults."""
    minutes = _default_sla()
    for row in (await session.scalars(select(TicketSla))).all():
        minutes[row.priority] = row.resolve_minutes
    return minutes


async def get_sla(session: AsyncSession) -> SlaOut:
    """The tenant's ticket SLA."""
    return SlaOut(**await sla_minutes(session))


async def put_sla(session: AsyncSession, viewer: Viewer, data: SlaUpdate) -> SlaOut:
    """Change resolution times; tickets already open keep their due time."""
    before = await sla_minutes(session)
    for priority in TICKET_PRIORITIES:
        minutes = getattr(data, priority)
        if minutes is msgspec.UNSET:
            continue
        row = await session.get(TicketSla, (viewer.tenant_id, priority), with_for_update=True)
        if row is None:
            session.add(TicketSla(tenant_id=viewer.tenant_id, priority=priority, resolve_minutes=minutes))
        else:
            row.resolve_minutes = minutes
    await session.flush()
    after = await sla_minutes(session)
    await audit.record(
        session,
        action="tickets.sla",
        target_type="ticket_sla",
        target_id=viewer.tenant_id,
        before=before,
        after=after,
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    return SlaOut(**after)


def _overdue(ticket: Ticket, now: datetime) -> bool:
    return ticket.status not in CLOSED_STATUSES and ticket.due_at < now


def ticket_out(ticket: Ticket, events: Sequence[TicketEvent] | None = None) -> TicketOut:
    """The API's view of a ticket (with its history when given)."""
    return TicketOut(
        id=ticket.id,
        number=ticket.number,
        subject=ticket.subject,
        description=ticket.description,
        priority=ticket.priority,
        category=ticket.category,
        status=ticket.status,
        customer_id=ticket.customer_id,
        interaction_id=ticket.interaction_id,
        assignee_user_id=ticket.assignee_user_id,
        assignee_team_id=ticket.assignee_team_id,
        due_at=ticket.due_at,
        overdue=_overdue(ticket, utcnow()),
        resolved_at=ticket.resolved_at,
        closed_at=ticket.closed_at,
        created_by=ticket.created_by,
        version=ticket.version,
        created_at=ticket.created_at,
        updated_at=ticket.updated_at,
        history=None
        if events is None
        else [TicketEventOut(e.id, e.kind, e.author_id, e.body, e.changes, e.created_at) for e in events],
    )


def _summary(ticket: Ticket, now: datetime) -> TicketSummary:
    return TicketSummary(
        ticket.id,
        ticket.number,
        ticket.subject,
        ticket.status,
        ticket.priority,
        ticket.due_at,
        _overdue(ticket, now),
        ticket.assignee_user_id,
        ticket.assignee_team_id,
    )


async def open_for_customers(session: AsyncSession, customer_ids: Sequence[uuid.UUID]) -> list[TicketSummary]:
    """Tickets not yet resolved of these customers, the most urgent due first."""
    if not customer_ids:
        return []
    rows = await session.scalars(
        select(Ticket)
        .where(Ticket.customer_id.in_(list(customer_ids)), Ticket.status.not_in(CLOSED_STATUSES))
        .order_by(Ticket.due_at)
        .limit(50)
    )
    now = utcnow()
    return [_summary(t, now) for t in rows.all()]


def summaries(rows: Sequence[Sequence[Any]]) -> list[TicketSummary]:
    """Ticket summaries from [id, number, subject, status, priority, due_at, user, team] rows (screen pop)."""
    now = utcnow()
    out = []
    for ticket_id, number, subject, status, priority, due_at, user, team in sorted(rows, key=lambda r: r[5]):
        due = datetime.fromisoformat(due_at)
        out.append(
            TicketSummary(
                uuid.UUID(ticket_id),
                number,
                subject,
                status,
                priority,
                due,
                status not in CLOSED_STATUSES and due < now,
                uuid.UUID(user) if user else None,
                uuid.UUID(team) if team else None,
            )
        )
    return out


def history_select(customer_id: uuid.UUID) -> Select[*tuple[Any, ...]]:
    """A customer's tickets as history entries (same columns as the interactions' and notes')."""
    return select(
        Ticket.created_at.label("at"),
        literal("ticket").label("kind"),
        Ticket.id.label("id"),
        cast(null(), String).label("channel"),
        Ticket.status.label("state"),
        cast(null(), String).label("outcome"),
        Ticket.created_by.label("actor_id"),
        Ticket.subject.label("text"),
        cast(Ticket.number, Integer).label("number"),
    ).where(Ticket.customer_id == customer_id)


async def move_to_customer(session: AsyncSession, source_id: uuid.UUID, target_id: uuid.UUID) -> int:
    """A merge: the source customer's tickets now belong to the target."""
    result = await session.execute(update(Ticket).where(Ticket.customer_id == source_id).values(customer_id=target_id))
    return int(result.rowcount)  # type: ignore[attr-defined]


def _scrub(value: str | None, secrets: Sequence[str]) -> str | None:
    if value is None:
        return None
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            value = value.replace(secret, ERASED)
    return value


async def anonymise_for_customer(session: AsyncSession, customer_id: uuid.UUID, secrets: Sequence[str]) -> int:
    """Erasure: the customer's numbers, addresses and names leave their tickets' texts and comments."""
    changed = 0
    rows = (await session.scalars(select(Ticket).where(Ticket.customer_id == customer_id).with_for_update())).all()
    for ticket in rows:
        subject, description = _scrub(ticket.subject, secrets), _scrub(ticket.description, secrets)
        if (subject, description) != (ticket.subject, ticket.description):
            ticket.subject, ticket.description = subject or ERASED, description or ""
            changed += 1
        for event in (await session.scalars(select(TicketEvent).where(TicketEvent.ticket_id == ticket.id))).all():
            body = _scrub(event.body, secrets)
            changes = {
                k: [_scrub(v, secrets) if isinstance(v, str) else v for v in pair] for k, pair in event.changes.items()
            }
            if body != event.body or changes != event.changes:
                event.body, event.changes = body, changes
                changed += 1
    return changed


async def _recipients(session: AsyncSession, ticket: Ticket, actor: uuid.UUID | None) -> set[uuid.UUID]:
    users: set[uuid.UUID] = set()
    if ticket.assignee_user_id is not None:
        users.add(ticket.assignee_user_id)
    elif ticket.assignee_team_id is not None:
        users.update((await tenants_service.get_team(session, ticket.assignee_team_id)).member_ids)
    if actor is not None:
        users.discard(actor)
    return users


async def _notify(
    session: AsyncSession, notify: Notify | None, ticket: Ticket, actor: uuid.UUID | None, event: str
) -> None:
    if notify is None:
        return
    payload = {"type": "ticket", "event": event, "ticket": msgspec.to_builtins(ticket_out(ticket))}
    for user_id in await _recipients(session, ticket, actor):
        notify(user_id, payload)


async def _check_assignees(session: AsyncSession, user_id: uuid.UUID | None, team_id: uuid.UUID | None) -> None:
    if user_id is not None and team_id is not None:
        raise InvalidInput.field("assignee_team_id", "assign to a user or to a team, not both")
    if user_id is not None:
        try:
            await tenants_service.get_user(session, user_id)
        except NotFound as exc:
            raise InvalidInput.field("assignee_user_id", "is not a user of this tenant") from exc
    if team_id is not None:
        try:
            await tenants_service.get_team(session, team_id)
        except NotFound as exc:
            raise InvalidInput.field("assignee_team_id", "is not a team of this tenant") from exc


async def _check_customer(session: AsyncSession, customer_id: uuid.UUID | None) -> None:
    if customer_id is not None and await session.scalar(select(Customer.id).where(Customer.id == customer_id)) is None:
        raise InvalidInput.field("customer_id", "is not a customer of this tenant")


async def create_ticket(
    session: AsyncSession, viewer: Viewer, data: TicketCreate, notify: Notify | None = None
) -> TicketOut:
    """A new ticket, due by the SLA of its priority; from an interaction it takes that interaction's customer."""
    subject = clean_text("subject", data.subject, max_length=300)
    description = data.description.strip()
    if len(description) > get_settings().customer_note_max:
        raise InvalidInput.field("description", f"must be at most {get_settings().customer_note_max} characters")
    category = clean_text("category", data.category, max_length=60) if data.category else None
    customer_id = data.customer_id
    if data.interaction_id is not None:
        try:
            interaction = await routing_service.interaction_for_customer_store(session, data.interaction_id)
        except NotFound as exc:
            raise InvalidInput.field("interaction_id", "is not an interaction of this tenant") from exc
        if customer_id is None and interaction.customer_ref:
            try:
                linked = uuid.UUID(interaction.customer_ref)
            except ValueError:
                linked = None
            if linked is not None and await session.scalar(select(Customer.id).where(Customer.id == linked)):
                customer_id = linked
    await _check_customer(session, customer_id)
    await _check_assignees(session, data.assignee_user_id, data.assignee_team_id)
    # One running number per tenant: numbering is serialised, the rest of the work is not.
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended('tickets:' || :t, 0))"), {"t": str(viewer.tenant_id)}
    )
    number = (await session.scalar(select(func.max(Ticket.number)))) or 0
    now = utcnow()
    minutes = (await sla_minutes(session))[data.priority]
    ticket = Ticket(
        tenant_id=viewer.tenant_id,
        id=uuid.uuid4(),
        number=number + 1,
        customer_id=customer_id,
        interaction_id=data.interaction_id,
        subject=subject,
        description=description,
        priority=data.priority,
        category=category,
        status="new",
        assignee_user_id=data.assignee_user_id,
        assignee_team_id=data.assignee_team_id,
        due_at=now + timedelta(minutes=minutes),
        created_by=viewer.actor_id,
        version=1,
        created_at=now,
        updated_at=now,
    )
    session.add(ticket)
    await session.flush()
    out = ticket_out(ticket)
    snapshot = {k: v for k, v in msgspec.to_builtins(out).items() if k not in ("history", "overdue")}
    session.add(
        TicketEvent(
            tenant_id=viewer.tenant_id,
            ticket_id=ticket.id,
            kind="created",
            author_id=viewer.actor_id,
            changes={},
            created_at=now,
        )
    )
    await audit.record(
        session,
        action="ticket.create",
        target_type="ticket",
        target_id=ticket.id,
        after=snapshot,
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    await session.flush()
    await _notify(session, notify, ticket, viewer.actor_id, "assigned")
    return out


async def _ticket(session: AsyncSession, ticket_id: uuid.UUID, *, lock: bool = False) -> Ticket:
    statement = select(Ticket).where(Ticket.id == ticket_id)
    ticket = await session.scalar(statement.with_for_update() if lock else statement)
    if ticket is None:
        raise NotFound("No such ticket")
    return ticket


async def _events(session: AsyncSession, ticket_id: uuid.UUID) -> list[TicketEvent]:
    rows = await session.scalars(
        select(TicketEvent).where(TicketEvent.ticket_id == ticket_id).order_by(TicketEvent.created_at, TicketEvent.id)
    )
    return list(rows.all())


async def get_ticket(session: AsyncSession, ticket_id: uuid.UUID) -> TicketOut:
    """One ticket with its full history and comments."""
    ticket = await _ticket(session, ticket_id)
    return ticket_out(ticket, await _events(session, ticket.id))


async def list_tickets(
    session: AsyncSession,
    page: PageRequest,
    *,
    status: Sequence[str] = (),
    priority: str | None = None,
    category: str | None = None,
    customer_id: uuid.UUID | None = None,
    assignee_user_id: uuid.UUID | None = None,
    assignee_team_id: uuid.UUID | None = None,
    overdue: bool | None = None,
) -> tuple[list[TicketOut], str | None]:
    """Tickets, filtered; sort by created_at, due_at, updated_at or number."""
    statement = select(Ticket)
    if status:
        statement = statement.where(Ticket.status.in_(list(status)))
    if priority:
        statement = statement.where(Ticket.priority == priority)
    if category:
        statement = statement.where(Ticket.category == category)
    if customer_id:
        statement = statement.where(Ticket.customer_id == customer_id)
    if assignee_user_id:
        statement = statement.where(Ticket.assignee_user_id == assignee_user_id)
    if assignee_team_id:
        statement = statement.where(Ticket.assignee_team_id == assignee_team_id)
    if overdue is not None:
        late = (Ticket.status.not_in(CLOSED_STATUSES)) & (Ticket.due_at < utcnow())
        statement = statement.where(late if overdue else ~late)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={
            "created_at": Ticket.created_at,
            "due_at": Ticket.due_at,
            "updated_at": Ticket.updated_at,
            "number": Ticket.number,
        },
        default_sort="-created_at",
        id_column=Ticket.id,
    )
    return [ticket_out(t) for t in rows], cursor


def _plain(value: Any) -> Any:
    if isinstance(value, uuid.UUID | datetime):
        return str(value)
    return value


async def update_ticket(
    session: AsyncSession,
    viewer: Viewer,
    ticket_id: uuid.UUID,
    data: TicketUpdate,
    if_match: str | None,
    notify: Notify | None = None,
) -> TicketOut:
    """Change a ticket at the version read: fields, status (along the flow), priority (new due time), assignee."""
    expected = expected_version(if_match)
    ticket = await _ticket(session, ticket_id, lock=True)
    check_version(ticket.version, expected)
    changes: dict[str, list[Any]] = {}

    def change(field: str, value: Any) -> None:
        old = getattr(ticket, field)
        if old != value:
            changes[field] = [_plain(old), _plain(value)]
            setattr(ticket, field, value)

    if data.subject is not msgspec.UNSET:
        change("subject", clean_text("subject", data.subject, max_length=300))
    if data.description is not msgspec.UNSET:
        if len(data.description) > get_settings().customer_note_max:
            raise InvalidInput.field("description", f"must be at most {get_settings().customer_note_max} characters")
        change("description", data.description.strip())
    if data.category is not msgspec.UNSET:
        change("category", clean_text("category", data.category, max_length=60) if data.category else None)
    if data.customer_id is not msgspec.UNSET:
        await _check_customer(session, data.customer_id)
        change("customer_id", data.customer_id)
    if data.priority is not msgspec.UNSET and data.priority != ticket.priority:
        change("priority", data.priority)
        change("due_at", ticket.created_at + timedelta(minutes=(await sla_minutes(session))[data.priority]))
    user = ticket.assignee_user_id if data.assignee_user_id is msgspec.UNSET else data.assignee_user_id
    team = ticket.assignee_team_id if data.assignee_team_id is msgspec.UNSET else data.assignee_team_id
    if data.assignee_user_id is not msgspec.UNSET and data.assignee_team_id is msgspec.UNSET and user is not None:
        team = None  # assigning a person takes the ticket off the team's pile
    if data.assignee_team_id is not msgspec.UNSET and data.assignee_user_id is msgspec.UNSET and team is not None:
        user = None
    reassigned = (user, team) != (ticket.assignee_user_id, ticket.assignee_team_id)
    if reassigned:
        await _check_assignees(session, user, team)
        change("assignee_user_id", user)
        change("assignee_team_id", team)
    if data.status is not msgspec.UNSET and data.status != ticket.status:
        if data.status not in TRANSITIONS[ticket.status]:
            allowed = ", ".join(sorted(TRANSITIONS[ticket.status])) or "none (closed is final)"
            raise Conflict(
                f"A {ticket.status} ticket cannot become {data.status}; it can become: {allowed}",
                kind="ticket-transition",
                errors=[{"field": "status", "message": f"not allowed from {ticket.status}"}],
            )
        now = utcnow()
        change("status", data.status)
        if data.status == "resolved":
            change("resolved_at", now)
        elif data.status == "closed":
            change("closed_at", now)
        elif data.status == "open" and ticket.resolved_at is not None:
            change("resolved_at", None)
    if not changes:
        return ticket_out(ticket, await _events(session, ticket.id))
    ticket.version += 1
    ticket.updated_at = utcnow()
    session.add(
        TicketEvent(
            tenant_id=viewer.tenant_id,
            ticket_id=ticket.id,
            kind="changed",
            author_id=viewer.actor_id,
            changes=changes,
            created_at=ticket.updated_at,
        )
    )
    await audit.record(
        session,
        action="ticket.update",
        target_type="ticket",
        target_id=ticket.id,
        before={k: v[0] for k, v in changes.items()},
        after={k: v[1] for k, v in changes.items()},
        **viewer.audit_actor(),  # type: ignore[arg-type]
    )
    await session.flush()
    if reassigned:
        await _notify(session, notify, ticket, viewer.actor_id, "assigned")
    elif "status" in changes:
        await _notify(session, notify, ticket, viewer.actor_id, "status")
    return ticket_out(ticket, await _events(session, ticket.id))


async def add_comment(
    session: AsyncSession, viewer: Viewer, ticket_id: uuid.UUID, data: CommentCreate, notify: Notify | None = None
) -> TicketOut:
    """A comment on a ticket (kept in its history); the assignees hear of it."""
    ticket = await _ticket(session, ticket_id, lock=True)
    limit = get_settings().customer_note_max
    body = data.body.strip()
    if not body:
        raise InvalidInput.field("body", "must not be empty")
    if len(body) > limit:
        raise InvalidInput.field("body", f"must be at most {limit} characters")
    now = utcnow()
    session.add(
        TicketEvent(
            tenant_id=viewer.tenant_id,
            ticket_id=ticket.id,
            kind="comment",
            author_id=viewer.actor_id,
            body=body,
            changes={},
            created_at=now,
        )
    )
    ticket.updated_at = now
    await session.flush()
    await _notify(session, notify, ticket, viewer.actor_id, "comment")
    return ticket_out(ticket, await _events(session, ticket.id))


async def open_voicemail_ticket(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    *,
    interaction_id: uuid.UUID,
    caller_number: str,
    duration_ms: int | None,
    voicemail_id: uuid.UUID,
) -> TicketOut:
    """A ticket for a voicemail its queue wants followed up: made by the system, tied to the call's interaction
    (and so to the caller's record when the interaction has one)."""
    system = Viewer(tenant_id, None, "system", None, frozenset(), frozenset())
    seconds = f", {round(duration_ms / 1000)} s" if duration_ms else ""
    data = TicketCreate(
        subject=f"Voicemail from {caller_number or 'an unknown caller'}"[:300],
        description=f"A caller left a voicemail{seconds}. Message {voicemail_id}.",
        interaction_id=interaction_id,
    )
    return await create_ticket(session, system, data)
