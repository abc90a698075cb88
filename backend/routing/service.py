"""Routing configuration: skills, business hours, queues, agent profiles, wrap-up codes and pause reasons.

All writes are validated here (422 naming the field, 404 for ids of other
tenants, which row-level security makes invisible) and audited in the same
transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
from sqlalchemy import Integer, Select, String, any_, bindparam, cast, delete, literal, null, or_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from backend.auth.principal import Principal
from backend.db.base import utcnow
from backend.db.engine import driver_connection
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.lib.validation import clean_text, clean_time_zone
from backend.routing import interactions
from backend.routing.hours import Schedule
from backend.routing.models import (
    AgentProfile,
    AgentSkill,
    AgentState,
    AgentStatePeriod,
    BusinessHours,
    Interaction,
    InteractionEvent,
    IvrFlow,
    PauseReason,
    Queue,
    QueueSkill,
    Skill,
    WrapUpCode,
)
from backend.routing.schemas import (
    AgentProfileIn,
    AgentProfileOut,
    AgentSkillLevel,
    AgentStateChange,
    AgentStateOut,
    AgentStatePeriodOut,
    Announcements,
    BusinessHoursIn,
    BusinessHoursOut,
    CodeIn,
    CodeOut,
    CodePatch,
    Holiday,
    HoursException,
    HoursStatus,
    InteractionOut,
    QueueAction,
    QueueIn,
    QueueOut,
    SkillIn,
    SkillOut,
    SkillPatch,
    SkillRequirement,
    WeeklyRange,
)
from backend.tenants import audit
from backend.tenants import service as tenants


def _actor(principal: Principal) -> dict[str, Any]:
    assert principal.tenant_id is not None
    return {"tenant_id": principal.tenant_id, "actor_type": principal.actor_type, "actor_id": principal.actor_id}


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


# --- skills -------------------------------------------------------------------------------------


def _skill_out(skill: Skill) -> SkillOut:
    return SkillOut(skill.id, skill.name, skill.description, skill.created_at)


async def _skill(session: AsyncSession, skill_id: uuid.UUID, *, lock: bool = False) -> Skill:
    statement = select(Skill).where(Skill.id == skill_id)
    skill = await session.scalar(statement.with_for_update() if lock else statement)
    if skill is None:
        raise NotFound("No such skill")
    return skill


async def list_skills(session: AsyncSession, page: PageRequest) -> tuple[list[SkillOut], str | None]:
    """Skills, by name."""
    rows, cursor = await paginate(
        session,
        select(Skill),
        page,
        sortable={"name": Skill.name, "created_at": Skill.created_at},
        default_sort="name",
        id_column=Skill.id,
    )
    return [_skill_out(s) for s in rows], cursor


async def get_skill(session: AsyncSession, skill_id: uuid.UUID) -> SkillOut:
    """One skill."""
    return _skill_out(await _skill(session, skill_id))


async def create_skill(session: AsyncSession, principal: Principal, data: SkillIn) -> SkillOut:
    """A new skill."""
    assert principal.tenant_id is not None
    name = clean_text("name", data.name, max_length=80)
    if await session.scalar(select(Skill.id).where(Skill.name == name)) is not None:
        raise Conflict("A skill with that name exists", errors=[{"field": "name", "message": "already used"}])
    skill = Skill(
        tenant_id=principal.tenant_id,
        name=name,
        description=clean_text("description", data.description, max_length=300, allow_empty=True),
    )
    session.add(skill)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="skill.create",
        target_type="skill",
        target_id=skill.id,
        after={"name": name},
    )
    return _skill_out(skill)


async def update_skill(session: AsyncSession, principal: Principal, skill_id: uuid.UUID, data: SkillPatch) -> SkillOut:
    """Rename or re-describe a skill."""
    skill = await _skill(session, skill_id, lock=True)
    before = {"name": skill.name, "description": skill.description}
    if data.name is not msgspec.UNSET:
        name = clean_text("name", data.name, max_length=80)
        if name != skill.name and await session.scalar(select(Skill.id).where(Skill.name == name)) is not None:
            raise Conflict("A skill with that name exists", errors=[{"field": "name", "message": "already used"}])
        skill.name = name
    if data.description is not msgspec.UNSET:
        skill.description = clean_text("description", data.description, max_length=300, allow_empty=True)
    await audit.record_by(
        session,
        principal,
        action="skill.update",
        target_type="skill",
        target_id=skill.id,
        before=before,
        after={"name": skill.name, "description": skill.description},
    )
    return _skill_out(skill)


async def delete_skill(session: AsyncSession, principal: Principal, skill_id: uuid.UUID) -> None:
    """Delete a skill no queue requires (agents' levels in it go with it)."""
    skill = await _skill(session, skill_id, lock=True)
    if await session.scalar(select(QueueSkill.queue_id).where(QueueSkill.skill_id == skill_id).limit(1)) is not None:
        raise Conflict("Queues still require this skill; remove it from them first")
    await session.delete(skill)
    await audit.record_by(
        session,
        principal,
        action="skill.delete",
        target_type="skill",
        target_id=skill_id,
        before={"name": skill.name},
    )


async def _flows_naming(column: Any, target: uuid.UUID, session: AsyncSession) -> list[str]:
    """Live IVR flows whose draft or published version names `target` in `column` (a references array)."""
    statement = select(IvrFlow.name).where(IvrFlow.archived_at.is_(None), column.contains([target]))
    statement = statement.order_by(IvrFlow.name)
    return list((await session.scalars(statement)).all())


# --- business hours -----------------------------------------------------------------------------


def _hours_out(hours: BusinessHours) -> BusinessHoursOut:
    return BusinessHoursOut(
        id=hours.id,
        name=hours.name,
        time_zone=hours.time_zone,
        weekly=msgspec.convert(hours.weekly, list[WeeklyRange]),
        holidays=msgspec.convert(hours.holidays, list[Holiday]),
        exceptions=msgspec.convert(hours.exceptions, list[HoursException]),
        created_at=hours.created_at,
    )


def schedule_of(hours: BusinessHours) -> Schedule:
    """The evaluable schedule of stored hours."""
    return Schedule.build(hours.time_zone, hours.weekly, hours.holidays, hours.exceptions)


async def _hours(session: AsyncSession, hours_id: uuid.UUID, *, lock: bool = False) -> BusinessHours:
    statement = select(BusinessHours).where(BusinessHours.id == hours_id)
    hours = await session.scalar(statement.with_for_update() if lock else statement)
    if hours is None:
        raise NotFound("No such business hours")
    return hours


async def _validated_hours(session: AsyncSession, principal: Principal, data: BusinessHoursIn) -> dict[str, Any]:
    assert principal.tenant_id is not None
    if data.time_zone is None:
        time_zone = (await tenants.get_tenant(session, principal.tenant_id)).time_zone
    else:
        time_zone = clean_time_zone("time_zone", data.time_zone)
    values = {
        "name": clean_text("name", data.name, max_length=120),
        "time_zone": time_zone,
        "weekly": _plain(data.weekly),
        "holidays": _plain(data.holidays),
        "exceptions": _plain(data.exceptions),
    }
    Schedule.build(time_zone, values["weekly"], values["holidays"], values["exceptions"])
    return values


async def list_business_hours(session: AsyncSession, page: PageRequest) -> tuple[list[BusinessHoursOut], str | None]:
    """Business hours, by name."""
    rows, cursor = await paginate(
        session,
        select(BusinessHours),
        page,
        sortable={"name": BusinessHours.name},
        default_sort="name",
        id_column=BusinessHours.id,
    )
    return [_hours_out(h) for h in rows], cursor


async def get_business_hours(session: AsyncSession, hours_id: uuid.UUID) -> BusinessHoursOut:
    """One set of business hours."""
    return _hours_out(await _hours(session, hours_id))


async def create_business_hours(session: AsyncSession, principal: Principal, data: BusinessHoursIn) -> BusinessHoursOut:
    """New business hours (weekly ranges, holidays, exceptions); the tenant's time zone unless one is named."""
    assert principal.tenant_id is not None
    values = await _validated_hours(session, principal, data)
    if await session.scalar(select(BusinessHours.id).where(BusinessHours.name == values["name"])) is not None:
        raise Conflict("Business hours with that name exist", errors=[{"field": "name", "message": "already used"}])
    hours = BusinessHours(tenant_id=principal.tenant_id, **values)
    session.add(hours)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="business_hours.create",
        target_type="business_hours",
        target_id=hours.id,
        after=values,
    )
    return _hours_out(hours)


async def replace_business_hours(
    session: AsyncSession, principal: Principal, hours_id: uuid.UUID, data: BusinessHoursIn
) -> BusinessHoursOut:
    """Replace business hours as a whole."""
    hours = await _hours(session, hours_id, lock=True)
    values = await _validated_hours(session, principal, data)
    if (
        values["name"] != hours.name
        and await session.scalar(select(BusinessHours.id).where(BusinessHours.name == values["name"])) is not None
    ):
        raise Conflict("Business hours with that name exist", errors=[{"field": "name", "message": "already used"}])
    before = {
        "name": hours.name,
        "time_zone": hours.time_zone,
        "weekly": hours.weekly,
        "holidays": hours.holidays,
        "exceptions": hours.exceptions,
    }
    for key, value in values.items():
        setattr(hours, key, value)
    await audit.record_by(
        session,
        principal,
        action="business_hours.update",
        target_type="business_hours",
        target_id=hours.id,
        before=before,
        after=values,
    )
    return _hours_out(hours)


async def delete_business_hours(session: AsyncSession, principal: Principal, hours_id: uuid.UUID) -> None:
    """Delete business hours no queue uses."""
    hours = await _hours(session, hours_id, lock=True)
    if await session.scalar(select(Queue.id).where(Queue.business_hours_id == hours_id).limit(1)) is not None:
        raise Conflict("Queues still use these hours; change them first")
    flows = await _flows_naming(IvrFlow.referenced_hours, hours_id, session)
    if flows:
        raise Conflict(f"IVR flows still use these hours ({', '.join(flows[:5])}); change them first")
    await session.delete(hours)
    await audit.record_by(
        session,
        principal,
        action="business_hours.delete",
        target_type="business_hours",
        target_id=hours_id,
        before={"name": hours.name},
    )


async def business_hours_status(session: AsyncSession, hours_id: uuid.UUID, at: datetime) -> HoursStatus:
    """Whether the hours are open at an instant, and when they next open."""
    schedule = schedule_of(await _hours(session, hours_id))
    return HoursStatus(open=schedule.is_open(at), at=at, next_opening=schedule.next_opening(at))


# --- queues -------------------------------------------------------------------------------------


ACTION_FIELDS = ("overflow_action", "closed_action", "no_agents_action")


def _queue_out(queue: Queue, requirements: Sequence[QueueSkill]) -> QueueOut:
    return QueueOut(
        id=queue.id,
        name=queue.name,
        strategy=queue.strategy,
        priority=queue.priority,
        max_wait_seconds=queue.max_wait_seconds,
        offer_timeout_seconds=queue.offer_timeout_seconds,
        wrap_up_seconds=queue.wrap_up_seconds,
        service_level_percent=queue.service_level_percent,
        service_level_seconds=queue.service_level_seconds,
        business_hours_id=queue.business_hours_id,
        overflow_action=msgspec.convert(queue.overflow_action, QueueAction),
        closed_action=msgspec.convert(queue.closed_action, QueueAction),
        no_agents_action=msgspec.convert(queue.no_agents_action, QueueAction),
        announcements=msgspec.convert(queue.announcements, Announcements),
        skills=[msgspec.convert({"skill_id": r.skill_id, "steps": r.steps}, SkillRequirement) for r in requirements],
        created_at=queue.created_at,
    )


async def _queue(session: AsyncSession, queue_id: uuid.UUID, *, lock: bool = False) -> Queue:
    statement = select(Queue).where(Queue.id == queue_id)
    queue = await session.scalar(statement.with_for_update() if lock else statement)
    if queue is None:
        raise NotFound("No such queue")
    return queue


async def _requirements(session: AsyncSession, queue_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[QueueSkill]]:
    found: dict[uuid.UUID, list[QueueSkill]] = {q: [] for q in queue_ids}
    for requirement in (await session.scalars(select(QueueSkill).where(QueueSkill.queue_id.in_(queue_ids)))).all():
        found[requirement.queue_id].append(requirement)
    return found


def _check_action(field: str, action: QueueAction, queue_id: uuid.UUID | None) -> None:
    if action.type == "queue":
        if action.queue_id is None:
            raise InvalidInput.field(f"{field}.queue_id", "is required when type is queue")
        if action.queue_id == queue_id:
            raise InvalidInput.field(f"{field}.queue_id", "cannot be the queue itself")
    elif action.queue_id is not None:
        raise InvalidInput.field(f"{field}.queue_id", "is only allowed when type is queue")
    if action.message is not None:
        clean_text(f"{field}.message", action.message, max_length=500)


async def _check_no_cycle(session: AsyncSession, queue_id: uuid.UUID, data: QueueIn) -> None:
    """Moving interactions between queues must end somewhere: refuse a chain that returns to its start."""
    edges: dict[uuid.UUID, set[uuid.UUID]] = {}
    for other_id, *actions in (
        await session.execute(select(Queue.id, Queue.overflow_action, Queue.closed_action, Queue.no_agents_action))
    ).all():
        edges[other_id] = {uuid.UUID(a["queue_id"]) for a in actions if a.get("type") == "queue" and a.get("queue_id")}
    edges[queue_id] = {
        a.queue_id
        for a in (data.overflow_action, data.closed_action, data.no_agents_action)
        if a.type == "queue" and a.queue_id is not None
    }
    for field in ACTION_FIELDS:
        target = getattr(data, field).queue_id
        if target is not None and target not in edges:
            raise InvalidInput.field(f"{field}.queue_id", "is not a queue of this tenant")
    seen: set[uuid.UUID] = set()
    frontier = list(edges[queue_id])
    while frontier:
        current = frontier.pop()
        if current == queue_id:
            raise InvalidInput.field("overflow_action", "the queue's actions lead back to itself (a cycle)")
        if current not in seen:
            seen.add(current)
            frontier.extend(edges.get(current, ()))


async def _validated_queue(session: AsyncSession, queue_id: uuid.UUID, data: QueueIn) -> dict[str, Any]:
    for field in ACTION_FIELDS:
        _check_action(field, getattr(data, field), queue_id)
    await _check_no_cycle(session, queue_id, data)
    if (
        data.business_hours_id is not None
        and await session.scalar(select(BusinessHours.id).where(BusinessHours.id == data.business_hours_id)) is None
    ):
        raise InvalidInput.field("business_hours_id", "is not business hours of this tenant")
    seen: set[uuid.UUID] = set()
    for index, requirement in enumerate(data.skills):
        if requirement.skill_id in seen:
            raise InvalidInput.field(f"skills[{index}].skill_id", "appears twice")
        seen.add(requirement.skill_id)
        if await session.scalar(select(Skill.id).where(Skill.id == requirement.skill_id)) is None:
            raise InvalidInput.field(f"skills[{index}].skill_id", "is not a skill of this tenant")
        afters = [step.after_seconds for step in requirement.steps]
        levels = [step.min_level for step in requirement.steps]
        if afters[0] != 0 or afters != sorted(set(afters)):
            raise InvalidInput.field(f"skills[{index}].steps", "must start at after_seconds 0 and rise strictly")
        if levels != sorted(levels, reverse=True):
            raise InvalidInput.field(f"skills[{index}].steps", "a requirement may only relax (min_level must not rise)")
    values = {
        "name": clean_text("name", data.name, max_length=120),
        "strategy": data.strategy,
        "priority": data.priority,
        "max_wait_seconds": data.max_wait_seconds,
        "offer_timeout_seconds": data.offer_timeout_seconds,
        "wrap_up_seconds": data.wrap_up_seconds,
        "service_level_percent": data.service_level_percent,
        "service_level_seconds": data.service_level_seconds,
        "business_hours_id": data.business_hours_id,
        "announcements": _plain(data.announcements),
    }
    for field in ACTION_FIELDS:
        values[field] = _plain(getattr(data, field))
    return values


async def _save_requirements(session: AsyncSession, tenant_id: uuid.UUID, queue_id: uuid.UUID, data: QueueIn) -> None:
    await session.execute(delete(QueueSkill).where(QueueSkill.queue_id == queue_id))
    for requirement in data.skills:
        session.add(
            QueueSkill(
                tenant_id=tenant_id, queue_id=queue_id, skill_id=requirement.skill_id, steps=_plain(requirement.steps)
            )
        )
    await session.flush()


async def list_queues(session: AsyncSession, page: PageRequest) -> tuple[list[QueueOut], str | None]:
    """Queues, by name."""
    rows, cursor = await paginate(
        session,
        select(Queue),
        page,
        sortable={"name": Queue.name, "created_at": Queue.created_at, "priority": Queue.priority},
        default_sort="name",
        id_column=Queue.id,
    )
    requirements = await _requirements(session, [q.id for q in rows])
    return [_queue_out(q, requirements[q.id]) for q in rows], cursor


async def get_queue(session: AsyncSession, queue_id: uuid.UUID) -> QueueOut:
    """One queue with its skill requirements."""
    queue = await _queue(session, queue_id)
    return _queue_out(queue, (await _requirements(session, [queue.id]))[queue.id])


async def create_queue(session: AsyncSession, principal: Principal, data: QueueIn) -> QueueOut:
    """A new queue."""
    assert principal.tenant_id is not None
    queue_id = uuid.uuid4()
    values = await _validated_queue(session, queue_id, data)
    if await session.scalar(select(Queue.id).where(Queue.name == values["name"])) is not None:
        raise Conflict("A queue with that name exists", errors=[{"field": "name", "message": "already used"}])
    queue = Queue(tenant_id=principal.tenant_id, id=queue_id, **values)
    session.add(queue)
    await session.flush()
    await _save_requirements(session, principal.tenant_id, queue.id, data)
    out = await get_queue(session, queue.id)
    await audit.record_by(
        session,
        principal,
        action="queue.create",
        target_type="queue",
        target_id=queue.id,
        after=_plain(out),
    )
    return out


async def replace_queue(session: AsyncSession, principal: Principal, queue_id: uuid.UUID, data: QueueIn) -> QueueOut:
    """Replace a queue's settings as a whole."""
    assert principal.tenant_id is not None
    queue = await _queue(session, queue_id, lock=True)
    before = _plain(await get_queue(session, queue_id))
    values = await _validated_queue(session, queue_id, data)
    if (
        values["name"] != queue.name
        and await session.scalar(select(Queue.id).where(Queue.name == values["name"])) is not None
    ):
        raise Conflict("A queue with that name exists", errors=[{"field": "name", "message": "already used"}])
    for key, value in values.items():
        setattr(queue, key, value)
    await session.flush()
    await _save_requirements(session, principal.tenant_id, queue_id, data)
    out = await get_queue(session, queue_id)
    await audit.record_by(
        session,
        principal,
        action="queue.update",
        target_type="queue",
        target_id=queue_id,
        before=before,
        after=_plain(out),
    )
    return out


async def delete_queue(session: AsyncSession, principal: Principal, queue_id: uuid.UUID) -> None:
    """Delete a queue no other queue sends interactions to."""
    queue = await _queue(session, queue_id, lock=True)
    for name, *actions in (
        await session.execute(
            select(Queue.name, Queue.overflow_action, Queue.closed_action, Queue.no_agents_action).where(
                Queue.id != queue_id
            )
        )
    ).all():
        if any(a.get("type") == "queue" and a.get("queue_id") == str(queue_id) for a in actions):
            raise Conflict(f"Queue {name!r} sends interactions to this queue; change it first")
    flows = await _flows_naming(IvrFlow.referenced_queues, queue_id, session)
    if flows:
        raise Conflict(f"IVR flows send calls to this queue ({', '.join(flows[:5])}); change them first")
    await session.delete(queue)
    await audit.record_by(
        session,
        principal,
        action="queue.delete",
        target_type="queue",
        target_id=queue_id,
        before={"name": queue.name},
    )


# --- agent profiles -----------------------------------------------------------------------------


async def get_agent_profile(session: AsyncSession, user_id: uuid.UUID) -> AgentProfileOut:
    """An agent's capacity and skills (defaults if never set)."""
    await tenants.get_user(session, user_id)  # 404 for users of other tenants
    profile = await session.get(AgentProfile, (await _tenant_of_user(session, user_id), user_id))
    skills = (await session.scalars(select(AgentSkill).where(AgentSkill.user_id == user_id))).all()
    capacity = profile.capacity if profile else msgspec.to_builtins(AgentProfileIn().capacity)
    return AgentProfileOut(
        user_id, capacity, [AgentSkillLevel(s.skill_id, s.level) for s in sorted(skills, key=lambda s: str(s.skill_id))]
    )


async def _tenant_of_user(session: AsyncSession, user_id: uuid.UUID) -> uuid.UUID:
    user = await tenants.user_permissions(session, user_id)
    if user is None:
        raise NotFound("No such user")
    return user[0].tenant_id


async def put_agent_profile(
    session: AsyncSession, principal: Principal, user_id: uuid.UUID, data: AgentProfileIn
) -> AgentProfileOut:
    """Set an agent's capacity per channel and skill levels."""
    assert principal.tenant_id is not None
    before = _plain(await get_agent_profile(session, user_id))
    seen: set[uuid.UUID] = set()
    for index, item in enumerate(data.skills):
        if item.skill_id in seen:
            raise InvalidInput.field(f"skills[{index}].skill_id", "appears twice")
        seen.add(item.skill_id)
        if await session.scalar(select(Skill.id).where(Skill.id == item.skill_id)) is None:
            raise InvalidInput.field(f"skills[{index}].skill_id", "is not a skill of this tenant")
    profile = await session.get(AgentProfile, (principal.tenant_id, user_id), with_for_update=True)
    if profile is None:
        profile = AgentProfile(
            tenant_id=principal.tenant_id, user_id=user_id, capacity={str(k): v for k, v in data.capacity.items()}
        )
        session.add(profile)
    else:
        profile.capacity = {str(k): v for k, v in data.capacity.items()}
    await session.flush()
    await session.execute(delete(AgentSkill).where(AgentSkill.user_id == user_id))
    for item in data.skills:
        session.add(
            AgentSkill(tenant_id=principal.tenant_id, user_id=user_id, skill_id=item.skill_id, level=item.level)
        )
    await session.flush()
    out = await get_agent_profile(session, user_id)
    await audit.record_by(
        session,
        principal,
        action="agent_profile.update",
        target_type="user",
        target_id=user_id,
        before=before,
        after=_plain(out),
    )
    return out


# --- wrap-up codes and pause reasons ------------------------------------------------------------


class CodeCatalogue:
    """A tenant's list of short codes with labels: wrap-up (disposition) codes or pause reasons."""

    def __init__(self, model: type[WrapUpCode] | type[PauseReason], kind: str) -> None:
        self.model = model
        self.kind = kind

    def _out(self, row: WrapUpCode | PauseReason) -> CodeOut:
        return CodeOut(row.id, row.code, row.label, row.active, row.created_at)

    async def _row(self, session: AsyncSession, row_id: uuid.UUID, *, lock: bool = False) -> WrapUpCode | PauseReason:
        statement = select(self.model).where(self.model.id == row_id)
        row: WrapUpCode | PauseReason | None = await session.scalar(statement.with_for_update() if lock else statement)
        if row is None:
            raise NotFound(f"No such {self.kind.replace('_', ' ')}")
        return row

    async def list(
        self, session: AsyncSession, page: PageRequest, active: bool | None
    ) -> tuple[list[CodeOut], str | None]:
        """Codes, by code."""
        statement = select(self.model)
        if active is not None:
            statement = statement.where(self.model.active.is_(active))
        rows, cursor = await paginate(
            session,
            statement,
            page,
            sortable={"code": self.model.code, "label": self.model.label},
            default_sort="code",
            id_column=self.model.id,
        )
        return [self._out(r) for r in rows], cursor

    async def get(self, session: AsyncSession, row_id: uuid.UUID) -> CodeOut:
        """One code."""
        return self._out(await self._row(session, row_id))

    async def create(self, session: AsyncSession, principal: Principal, data: CodeIn) -> CodeOut:
        """A new code."""
        assert principal.tenant_id is not None
        if await session.scalar(select(self.model.id).where(self.model.code == data.code)) is not None:
            raise Conflict("That code exists", errors=[{"field": "code", "message": "already used"}])
        row = self.model(
            tenant_id=principal.tenant_id,
            code=data.code,
            label=clean_text("label", data.label, max_length=120),
            active=data.active,
        )
        session.add(row)
        await session.flush()
        await audit.record_by(
            session,
            principal,
            action=f"{self.kind}.create",
            target_type=self.kind,
            target_id=row.id,
            after={"code": row.code, "label": row.label},
        )
        return self._out(row)

    async def update(self, session: AsyncSession, principal: Principal, row_id: uuid.UUID, data: CodePatch) -> CodeOut:
        """Relabel or (de)activate a code; codes are never renamed, reports refer to them."""
        row = await self._row(session, row_id, lock=True)
        before = {"label": row.label, "active": row.active}
        if data.label is not msgspec.UNSET:
            row.label = clean_text("label", data.label, max_length=120)
        if data.active is not msgspec.UNSET:
            row.active = data.active
        await audit.record_by(
            session,
            principal,
            action=f"{self.kind}.update",
            target_type=self.kind,
            target_id=row.id,
            before=before,
            after={"label": row.label, "active": row.active},
        )
        return self._out(row)

    async def delete(self, session: AsyncSession, principal: Principal, row_id: uuid.UUID) -> None:
        """Delete a code (deactivate it instead once it has been used)."""
        row = await self._row(session, row_id, lock=True)
        await session.delete(row)
        await audit.record_by(
            session,
            principal,
            action=f"{self.kind}.delete",
            target_type=self.kind,
            target_id=row_id,
            before={"code": row.code},
        )


wrap_up_codes = CodeCatalogue(WrapUpCode, "wrap_up_code")
pause_reasons = CodeCatalogue(PauseReason, "pause_reason")


# --- agent states -------------------------------------------------------------------------------

MANUAL_TARGETS = {"available", "away", "offline"}
# Which states an agent may leave by hand, for each target. busy and wrap_up are set by routing.
MANUAL_FROM = {
    "available": {"offline", "away", "wrap_up", "available"},
    "away": {"available", "wrap_up", "away"},
    "offline": {"available", "away", "wrap_up", "offline"},
}
SYSTEM_REASONS = {"disconnected", "offer_timeout"}


def _state_out(row: AgentState) -> AgentStateOut:
    return AgentStateOut(
        user_id=row.user_id,
        state=row.state,
        reason=row.reason,
        since=row.since,
        voice_registered=row.voice_registered,
        voice_ready=row.state == "available" and row.voice_registered,
    )


async def _agent_state(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, *, lock: bool) -> AgentState:
    row = await session.get(AgentState, (tenant_id, user_id), with_for_update=lock)
    if row is None:
        # Two first readers at once (the workspace, a softphone's registration in a worker) must not collide.
        await session.execute(
            pg_insert(AgentState)
            .values(tenant_id=tenant_id, user_id=user_id, state="offline", reason=None, since=utcnow())
            .on_conflict_do_nothing(index_elements=["tenant_id", "user_id"])
        )
        row = await session.get(AgentState, (tenant_id, user_id), with_for_update=lock)
        assert row is not None
    return row


async def get_agent_state(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID) -> AgentStateOut:
    """An agent's current state (offline if never set)."""
    await tenants.get_user(session, user_id)  # 404 for other tenants' users
    return _state_out(await _agent_state(session, tenant_id, user_id, lock=False))


_AGENT_TRANSITION = text("SELECT agent_transition(:tenant, :user, :state, :reason, :at)")


def _system(tenant_id: uuid.UUID) -> dict[str, Any]:
    """Who made routing's own transitions, for the audit log."""
    return {"tenant_id": tenant_id, "actor_type": "system", "actor_id": None}


async def _transition(
    session: AsyncSession, row: AgentState, state: str, reason: str | None, actor: dict[str, Any]
) -> AgentStateOut:
    if (row.state, row.reason) == (state, reason):
        return _state_out(row)
    now = utcnow()
    before = {"state": row.state, "reason": row.reason}
    # The open period closed, the next one opened and the row moved in one statement (migration 0018); the row
    # in hand is told what the database now holds, so the session writes nothing more for it.
    await session.execute(
        _AGENT_TRANSITION,
        {"tenant": row.tenant_id, "user": row.user_id, "state": state, "reason": reason, "at": now},
    )
    for name, value in (("state", state), ("reason", reason), ("since", now)):
        set_committed_value(row, name, value)
    await audit.record(
        session,
        action="agent_state.change",
        target_type="user",
        target_id=row.user_id,
        before=before,
        after={"state": state, "reason": reason},
        **actor,
    )
    return _state_out(row)


async def set_own_state(session: AsyncSession, principal: Principal, data: AgentStateChange) -> AgentStateOut:
    """An agent changes their own state; only available, away (with a reason) and offline are theirs to set."""
    assert principal.tenant_id is not None
    assert principal.user_id is not None
    if data.state not in MANUAL_TARGETS:
        raise InvalidInput.field("state", f"{data.state} is set by routing, not by hand")
    reason = None
    if data.state == "away":
        if data.reason is None:
            raise InvalidInput.field("reason", "is required when away (a pause reason code)")
        active = await session.scalar(
            select(PauseReason.id).where(PauseReason.code == data.reason, PauseReason.active.is_(True))
        )
        if active is None:
            raise InvalidInput.field("reason", "is not an active pause reason of this tenant")
        reason = data.reason
    elif data.reason is not None:
        raise InvalidInput.field("reason", "is only given when away")
    if data.state == "available" and not await tenants.has_seat(session, principal.user_id):
        raise Conflict("You need a seat (an agent licence) to take work; ask an administrator", kind="no-seat")
    row = await _agent_state(session, principal.tenant_id, principal.user_id, lock=True)
    if row.state not in MANUAL_FROM[data.state]:
        raise Conflict(f"Cannot go {data.state} while {row.state}", kind="state-transition")
    return await _transition(session, row, data.state, reason, _actor(principal))


async def set_system_state(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, state: str, reason: str | None = None
) -> AgentStateOut:
    """Routing's own transitions (busy, wrap_up, away on disconnect or missed offer); audited as the system."""
    row = await _agent_state(session, tenant_id, user_id, lock=True)
    if state == "away" and reason not in SYSTEM_REASONS and reason is not None:
        raise InvalidInput.field("reason", "unknown system reason")
    return await _transition(session, row, state, reason, _system(tenant_id))


async def mark_busy(session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """An agent who takes a contact while available (or away) is busy from now on; any other state stays.
    Audited as the system, as `set_system_state`; the agent is one routing or the channel already knows."""
    row = await _agent_state(session, tenant_id, user_id, lock=True)
    if row.state in ("available", "away"):
        await _transition(session, row, "busy", None, _system(tenant_id))


_AGENT_RELEASED = "SELECT * FROM agent_released($1, $2, $3, $4, $5, $6, $7)"


@dataclass(frozen=True, slots=True)
class AgentFacts:
    """What routing needs of an agent: their state row (None when they never had one), capacity and skills."""

    moved: bool
    """Whether `agent_released` released them (they were busy)."""
    state: str | None
    since: datetime | None
    voice_registered: bool
    capacity: dict[str, int] | None
    """Their profile's capacity per channel; None without a profile."""
    skills: dict[str, int]
    """Skill id -> level."""


async def agent_facts(
    engine: AsyncEngine, tenant_id: uuid.UUID, user_id: uuid.UUID, *, release: bool = False, wrap_up: bool = False
) -> AgentFacts:
    """What routing needs of an agent, in one statement of its own (`agent_released`, migration 0019).

    With `release` (their last contact is over), busy becomes wrap-up (`wrap_up`) or available, audited as the
    system; any other state (available, away, offline) stays."""
    ip, request_id = audit.origin()
    async with driver_connection(engine) as driver:
        row = await driver.fetchrow(_AGENT_RELEASED, tenant_id, user_id, release, wrap_up, utcnow(), ip, request_id)
    if row["r_moved"]:
        audit.written(tenant_id=tenant_id, action="agent_state.change", target_type="user", target_id=str(user_id))
    return AgentFacts(
        moved=row["r_moved"],
        state=row["r_state"],
        since=row["r_since"],
        voice_registered=bool(row["r_voice_registered"]),
        capacity=row["r_capacity"],
        skills=row["r_skills"],
    )


async def free_agent_for_consultation(
    session: AsyncSession, queue_id: uuid.UUID, *, excluding: Collection[uuid.UUID] = ()
) -> uuid.UUID | None:
    """An agent a caller's agent may consult on behalf of a queue: available, softphone registered, holding the
    queue's skills at the levels it asks of a new arrival; the longest idle first. None when nobody is free."""
    await _queue(session, queue_id)
    requirements = (await _requirements(session, [queue_id])).get(queue_id, [])
    statement = (
        select(AgentState.user_id)
        .where(AgentState.state == "available", AgentState.voice_registered.is_(True))
        .order_by(AgentState.since, AgentState.user_id)
    )
    if excluding:
        statement = statement.where(AgentState.user_id.not_in(list(excluding)))
    for requirement in requirements:
        first_step = min(requirement.steps, key=lambda step: step["after_seconds"])
        statement = statement.where(
            select(AgentSkill.user_id)
            .where(
                AgentSkill.user_id == AgentState.user_id,
                AgentSkill.skill_id == requirement.skill_id,
                AgentSkill.level >= first_step["min_level"],
            )
            .exists()
        )
    found: uuid.UUID | None = await session.scalar(statement.limit(1))
    return found


async def set_voice_registration(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, registered: bool
) -> AgentStateOut:
    """The voice channel reports whether the agent's softphone is registered."""
    row = await _agent_state(session, tenant_id, user_id, lock=True)
    row.voice_registered = registered
    await session.flush()
    return _state_out(row)


async def agent_state_history(
    session: AsyncSession, user_id: uuid.UUID, page: PageRequest
) -> tuple[list[AgentStatePeriodOut], str | None]:
    """The agent's time in each state, newest first."""
    await tenants.get_user(session, user_id)
    rows, cursor = await paginate(
        session,
        select(AgentStatePeriod).where(AgentStatePeriod.user_id == user_id),
        page,
        sortable={"started_at": AgentStatePeriod.started_at},
        default_sort="-started_at",
        id_column=AgentStatePeriod.id,
    )
    return [
        AgentStatePeriodOut(
            r.state,
            r.reason,
            r.started_at,
            r.ended_at,
            (r.ended_at - r.started_at).total_seconds() if r.ended_at else None,
        )
        for r in rows
    ], cursor


# --- for the customer store: an interaction's customer, a customer's interactions ------------------

HANDLING_STATES = ("offered", "connected", "wrap_up")
ERASED = "[erased]"


async def interaction_for_customer_store(session: AsyncSession, interaction_id: uuid.UUID) -> InteractionOut:
    """One interaction (404 for another tenant's), without its timeline."""
    found = await session.scalar(select(Interaction).where(Interaction.id == interaction_id))
    if found is None:
        raise NotFound("No such interaction")
    return interactions.out(found)


async def recent_customer_interactions(session: AsyncSession, refs: Sequence[str], limit: int) -> list[InteractionOut]:
    """The latest interactions attached to any of `refs` (a customer id or the customer's addresses)."""
    if not refs:
        return []
    rows = await session.scalars(_RECENT_FOR_CUSTOMER, {"refs": list(refs), "limit": limit})
    return [interactions.out(r) for r in rows.all()]


_REFS: Any = ARRAY(String())
_RECENT_FOR_CUSTOMER = (
    select(Interaction)
    .where(Interaction.customer_ref == any_(bindparam("refs", type_=_REFS)))
    .order_by(Interaction.created_at.desc(), Interaction.id.desc())
    .limit(bindparam("limit"))
)
"""Built once: the screen pop runs it on every offer and lookup."""


def customer_interactions_select(refs: Sequence[str]) -> Select[*tuple[Any, ...]]:
    """Interactions of a customer as history entries: (at, kind, id, channel, state, outcome, actor_id, text)."""
    return select(
        Interaction.created_at.label("at"),
        literal("interaction").label("kind"),
        Interaction.id.label("id"),
        Interaction.channel.label("channel"),
        Interaction.state.label("state"),
        Interaction.outcome.label("outcome"),
        Interaction.agent_id.label("actor_id"),
        Interaction.customer_ref.label("text"),
        cast(null(), Integer).label("number"),
    ).where(Interaction.customer_ref.in_(list(refs)))


async def agent_is_handling(
    session: AsyncSession, agent_id: uuid.UUID, refs: Sequence[str], recent_seconds: int
) -> bool:
    """Whether the agent has an interaction with one of `refs` offered, open, or ended in the last moments."""
    if not refs:
        return False
    since = utcnow() - timedelta(seconds=recent_seconds)
    found = await session.scalar(
        select(Interaction.id)
        .where(
            Interaction.agent_id == agent_id,
            Interaction.customer_ref.in_(list(refs)),
            or_(Interaction.state.in_(HANDLING_STATES), Interaction.ended_at >= since),
        )
        .limit(1)
    )
    return found is not None


def interaction_as_seen_by(item: InteractionOut, permissions: frozenset[str]) -> InteractionOut:
    """An interaction with the customer's addresses masked unless `permissions` may read them."""
    return interactions.as_seen_by(item, permissions)


async def attach_customer(session: AsyncSession, interaction_id: uuid.UUID, customer_ref: str) -> InteractionOut:
    """Attach an interaction to a customer record; the address it came from is kept in its attributes."""
    found = await session.scalar(select(Interaction).where(Interaction.id == interaction_id).with_for_update())
    if found is None:
        raise NotFound("No such interaction")
    if found.customer_ref != customer_ref:
        attributes = dict(found.attributes)
        if found.customer_ref and "customer_address" not in attributes:
            attributes["customer_address"] = found.customer_ref
        found.attributes = attributes
        found.customer_ref = customer_ref
    return interactions.out(found)


async def move_customer_interactions(session: AsyncSession, old_ref: str, new_ref: str) -> int:
    """Re-attach every interaction of one customer to another (a merge); returns how many moved."""
    result = await session.execute(
        update(Interaction).where(Interaction.customer_ref == old_ref).values(customer_ref=new_ref)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _scrub(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        return ERASED if any(s and s in value for s in secrets) else value
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    return value


async def anonymise_customer_interactions(
    session: AsyncSession, refs: Sequence[str], replacement_ref: str, secrets: Sequence[str]
) -> int:
    """Erasure: interactions stay (statistics need them) but carry no address or name of the customer any more."""
    if not refs:
        return 0
    rows = (
        await session.scalars(select(Interaction).where(Interaction.customer_ref.in_(list(refs))).with_for_update())
    ).all()
    for interaction in rows:
        interaction.customer_ref = replacement_ref
        interaction.attributes = _scrub(dict(interaction.attributes), secrets)
        events = await session.scalars(
            select(InteractionEvent).where(InteractionEvent.interaction_id == interaction.id)
        )
        for event in events.all():
            scrubbed = _scrub(dict(event.data), secrets)
            if scrubbed != event.data:
                event.data = scrubbed
    return len(rows)
