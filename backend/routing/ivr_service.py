"""IVR flows in the database: drafts validated on save, immutable published versions, and what call control loads.

A flow has one draft, edited freely (every save is validated: structure,
limits, and that what it names exists in the tenant), and published versions
numbered from 1. Publishing copies the draft into a new `ivr_flow_versions`
row, which the application role can insert and read but never change or
delete. A call pins the version it starts on (`current_version`) and keeps
asking for that one (`pinned_version`), so a new publication never changes a
call already in the flow.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.channels.voice import numbers as voice_numbers
from backend.config import Settings
from backend.db.base import utcnow
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.lib.validation import clean_text
from backend.routing.ivr import FlowGraph, FlowReferences, GraphLimits, check_graph, references
from backend.routing.ivr_interpreter import FlowInterpreter
from backend.routing.models import BusinessHours, IvrFlow, IvrFlowVersion, Queue
from backend.routing.schemas import IvrFlowIn, IvrFlowOut, IvrFlowVersionOut
from backend.tenants import audit
from backend.tenants import service as tenants

log = structlog.get_logger("routing.ivr")


class PromptCatalogue(Protocol):
    """Which prompts exist in the current tenant (the voice channel's media library answers)."""

    async def existing(self, session: AsyncSession, prompt_ids: set[uuid.UUID]) -> set[uuid.UUID]:
        """The subset of `prompt_ids` that are prompts of the tenant in the session's context."""
        ...


def limits(settings: Settings) -> GraphLimits:
    """The graph limits the settings name."""
    return GraphLimits(
        max_nodes=settings.ivr_max_nodes,
        max_bytes=settings.ivr_max_graph_bytes,
        max_visits=settings.ivr_max_visits,
        max_retries=settings.ivr_max_retries,
        max_voicemail_seconds=settings.voicemail_max_seconds,
    )


async def _missing(
    session: AsyncSession, model: type[Queue] | type[BusinessHours], ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    wanted = set(ids)
    if not wanted:
        return set()
    found = set((await session.scalars(select(model.id).where(model.id.in_(wanted)))).all())
    return wanted - found


async def validate(
    session: AsyncSession, graph: FlowGraph, prompts: PromptCatalogue, settings: Settings
) -> FlowReferences:
    """Check a graph completely (422 with every field error at once); returns what it refers to."""
    errors = check_graph(graph, limits(settings))
    if errors:
        raise InvalidInput("The flow is not valid: " + "; ".join(e["message"] for e in errors[:3]), errors=errors)
    refs = references(graph)
    problems: list[dict[str, str]] = []
    for queue_id in await _missing(session, Queue, refs.queues):
        problems += [{"field": path, "message": "is not a queue of this tenant"} for path in refs.queues[queue_id]]
    for hours_id in await _missing(session, BusinessHours, refs.hours):
        problems += [{"field": p, "message": "is not business hours of this tenant"} for p in refs.hours[hours_id]]
    present = await prompts.existing(session, set(refs.prompts))
    for prompt_id in set(refs.prompts) - present:
        problems += [{"field": p, "message": "is not a prompt of this tenant"} for p in refs.prompts[prompt_id]]
    for agent_id, paths in refs.agents.items():
        try:
            user = await tenants.get_user(session, agent_id)
        except NotFound:
            user = None
        if user is None or user.status == "disabled":
            problems += [{"field": p, "message": "is not an active user of this tenant"} for p in paths]
    if problems:
        problems.sort(key=lambda e: e["field"])
        raise InvalidInput("The flow names things this tenant does not have", errors=problems)
    return refs


def _graph(raw: dict[str, Any]) -> FlowGraph:
    return msgspec.convert(raw, FlowGraph)


def _out(flow: IvrFlow) -> IvrFlowOut:
    return IvrFlowOut(
        id=flow.id,
        name=flow.name,
        description=flow.description,
        graph=_graph(flow.draft),
        draft_revision=flow.draft_revision,
        published_version=flow.published_version,
        archived=flow.archived_at is not None,
        created_at=flow.created_at,
        updated_at=flow.updated_at,
    )


def _version_out(row: IvrFlowVersion) -> IvrFlowVersionOut:
    return IvrFlowVersionOut(row.flow_id, row.version, _graph(row.graph), row.created_at, row.published_by)


async def _flow(session: AsyncSession, flow_id: uuid.UUID, *, lock: bool = False) -> IvrFlow:
    statement = select(IvrFlow).where(IvrFlow.id == flow_id)
    flow = await session.scalar(statement.with_for_update() if lock else statement)
    if flow is None:
        raise NotFound("No such IVR flow")
    return flow


async def _name_taken(session: AsyncSession, name: str, other_than: uuid.UUID | None) -> bool:
    statement = select(IvrFlow.id).where(IvrFlow.name == name, IvrFlow.archived_at.is_(None))
    if other_than is not None:
        statement = statement.where(IvrFlow.id != other_than)
    return await session.scalar(statement.limit(1)) is not None


def _set_references(flow: IvrFlow, *found: FlowReferences) -> None:
    flow.referenced_queues = sorted({q for refs in found for q in refs.queues}, key=str)
    flow.referenced_hours = sorted({h for refs in found for h in refs.hours}, key=str)
    flow.referenced_prompts = sorted({p for refs in found for p in refs.prompts}, key=str)
    flow.referenced_agents = sorted({a for refs in found for a in refs.agents}, key=str)


async def _current_references(session: AsyncSession, flow: IvrFlow) -> FlowReferences:
    if flow.published_version is None:
        return FlowReferences()
    row = await _version_row(session, flow.id, flow.published_version)
    return references(_graph(row.graph))


# --- the flows --------------------------------------------------------------------------------


async def list_flows(
    session: AsyncSession, page: PageRequest, *, archived: bool = False
) -> tuple[list[IvrFlowOut], str | None]:
    """Flows by name (archived ones on request)."""
    statement = select(IvrFlow).where(IvrFlow.archived_at.is_not(None) if archived else IvrFlow.archived_at.is_(None))
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"name": IvrFlow.name, "created_at": IvrFlow.created_at, "updated_at": IvrFlow.updated_at},
        default_sort="name",
        id_column=IvrFlow.id,
    )
    return [_out(f) for f in rows], cursor


async def get_flow(session: AsyncSession, flow_id: uuid.UUID) -> IvrFlowOut:
    """One flow with its draft."""
    return _out(await _flow(session, flow_id))


async def create_flow(
    session: AsyncSession, principal: Principal, data: IvrFlowIn, prompts: PromptCatalogue, settings: Settings
) -> IvrFlowOut:
    """A new flow with a validated draft (not taking calls until published)."""
    assert principal.tenant_id is not None
    name = clean_text("name", data.name, max_length=120)
    description = clean_text("description", data.description, max_length=300, allow_empty=True)
    refs = await validate(session, data.graph, prompts, settings)
    if await _name_taken(session, name, None):
        raise Conflict("An IVR flow with that name exists", errors=[{"field": "name", "message": "already used"}])
    now = utcnow()
    flow = IvrFlow(
        tenant_id=principal.tenant_id,
        name=name,
        description=description,
        draft=msgspec.to_builtins(data.graph),
        draft_revision=1,
        created_at=now,
        updated_at=now,
    )
    _set_references(flow, refs)
    session.add(flow)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="ivr_flow.create",
        target_type="ivr_flow",
        target_id=flow.id,
        after={"name": name, "nodes": len(data.graph.nodes)},
    )
    return _out(flow)


async def save_draft(
    session: AsyncSession,
    principal: Principal,
    flow_id: uuid.UUID,
    data: IvrFlowIn,
    prompts: PromptCatalogue,
    settings: Settings,
) -> IvrFlowOut:
    """Replace a flow's name, description and draft; calls keep running on the published version."""
    flow = await _flow(session, flow_id, lock=True)
    if flow.archived_at is not None:
        raise Conflict("The flow is archived", kind="flow-archived")
    if data.draft_revision is not None and data.draft_revision != flow.draft_revision:
        raise Conflict(
            f"The draft was saved by someone else since revision {data.draft_revision} (now {flow.draft_revision})",
            kind="draft-changed",
            errors=[{"field": "draft_revision", "message": f"is {flow.draft_revision} now"}],
        )
    name = clean_text("name", data.name, max_length=120)
    description = clean_text("description", data.description, max_length=300, allow_empty=True)
    refs = await validate(session, data.graph, prompts, settings)
    if await _name_taken(session, name, flow.id):
        raise Conflict("An IVR flow with that name exists", errors=[{"field": "name", "message": "already used"}])
    before = {"name": flow.name, "draft_revision": flow.draft_revision}
    flow.name = name
    flow.description = description
    flow.draft = msgspec.to_builtins(data.graph)
    flow.draft_revision += 1
    flow.updated_at = utcnow()
    _set_references(flow, refs, await _current_references(session, flow))
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="ivr_flow.save_draft",
        target_type="ivr_flow",
        target_id=flow.id,
        before=before,
        after={"name": name, "draft_revision": flow.draft_revision, "nodes": len(data.graph.nodes)},
    )
    return _out(flow)


async def publish(
    session: AsyncSession,
    principal: Principal,
    flow_id: uuid.UUID,
    prompts: PromptCatalogue,
    settings: Settings,
    draft_revision: int | None = None,
) -> IvrFlowVersionOut:
    """Publish the draft as a new immutable version; new calls start on it, calls in progress keep theirs."""
    assert principal.tenant_id is not None
    flow = await _flow(session, flow_id, lock=True)
    if flow.archived_at is not None:
        raise Conflict("The flow is archived", kind="flow-archived")
    if draft_revision is not None and draft_revision != flow.draft_revision:
        raise Conflict(
            f"The draft changed since revision {draft_revision} (now {flow.draft_revision})", kind="draft-changed"
        )
    graph = _graph(flow.draft)
    # What the draft names may have gone since it was saved: check again, as of now.
    refs = await validate(session, graph, prompts, settings)
    latest = await session.scalar(select(func.max(IvrFlowVersion.version)).where(IvrFlowVersion.flow_id == flow.id))
    row = IvrFlowVersion(
        tenant_id=principal.tenant_id,
        flow_id=flow.id,
        version=(latest or 0) + 1,
        graph=flow.draft,
        published_by=principal.user_id,
        created_at=utcnow(),
    )
    session.add(row)
    before = flow.published_version
    flow.published_version = row.version
    flow.updated_at = utcnow()
    _set_references(flow, refs)
    await session.flush()
    await audit.record_by(
        session,
        principal,
        action="ivr_flow.publish",
        target_type="ivr_flow",
        target_id=flow.id,
        before={"published_version": before},
        after={"published_version": row.version, "draft_revision": flow.draft_revision},
    )
    log.info("ivr_flow_published", tenant_id=str(flow.tenant_id), flow_id=str(flow.id), version=row.version)
    return _version_out(row)


async def archive(session: AsyncSession, principal: Principal, flow_id: uuid.UUID) -> None:
    """Archive a flow no number points at; its versions stay readable for calls still in them and for history."""
    assert principal.tenant_id is not None
    flow = await _flow(session, flow_id, lock=True)
    if flow.archived_at is not None:
        return
    routed = await voice_numbers.numbers_routed_to_flow(session, principal.tenant_id, flow.id)
    if routed:
        raise Conflict(f"Numbers still send calls to this flow ({', '.join(routed[:5])}); point them elsewhere first")
    flow.archived_at = utcnow()
    await audit.record_by(
        session,
        principal,
        action="ivr_flow.archive",
        target_type="ivr_flow",
        target_id=flow.id,
        before={"name": flow.name},
    )


async def _version_row(session: AsyncSession, flow_id: uuid.UUID, version: int) -> IvrFlowVersion:
    row = await session.scalar(
        select(IvrFlowVersion).where(IvrFlowVersion.flow_id == flow_id, IvrFlowVersion.version == version)
    )
    if row is None:
        raise NotFound("No such version of this IVR flow")
    return row


async def list_versions(
    session: AsyncSession, flow_id: uuid.UUID, page: PageRequest
) -> tuple[list[IvrFlowVersionOut], str | None]:
    """A flow's published versions, newest first."""
    await _flow(session, flow_id)
    rows, cursor = await paginate(
        session,
        select(IvrFlowVersion).where(IvrFlowVersion.flow_id == flow_id),
        page,
        sortable={"version": IvrFlowVersion.version},
        default_sort="-version",
        id_column=IvrFlowVersion.id,
    )
    return [_version_out(r) for r in rows], cursor


async def get_version(session: AsyncSession, flow_id: uuid.UUID, version: int) -> IvrFlowVersionOut:
    """One published version."""
    return _version_out(await _version_row(session, flow_id, version))


# --- what other parts of the product ask ------------------------------------------------------


async def flows_using(
    session: AsyncSession,
    *,
    queue_id: uuid.UUID | None = None,
    hours_id: uuid.UUID | None = None,
    prompt_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
) -> list[str]:
    """Names of the live flows whose draft or current version names the queue, hours, prompt or agent."""
    statement = select(IvrFlow.name).where(IvrFlow.archived_at.is_(None))
    for column, value in (
        (IvrFlow.referenced_queues, queue_id),
        (IvrFlow.referenced_hours, hours_id),
        (IvrFlow.referenced_prompts, prompt_id),
        (IvrFlow.referenced_agents, agent_id),
    ):
        if value is not None:
            statement = statement.where(column.contains([value]))
    return list((await session.scalars(statement.order_by(IvrFlow.name))).all())


class TenantIvrFlows:
    """The numbers' `IvrFlows` hook: a number may point at a live, published flow of its tenant."""

    async def exists(self, session: AsyncSession, flow_id: uuid.UUID) -> bool:
        """True for a flow of the session's tenant that is not archived and has a published version."""
        found = await session.scalar(
            select(IvrFlow.id).where(
                IvrFlow.id == flow_id, IvrFlow.archived_at.is_(None), IvrFlow.published_version.is_not(None)
            )
        )
        return found is not None


@dataclass(frozen=True, slots=True)
class PinnedFlow:
    """One published version, ready to run: what call control pins a call to."""

    flow_id: uuid.UUID
    version: int
    graph: FlowGraph

    def interpreter(self, settings: Settings) -> FlowInterpreter:
        """The interpreter of this version."""
        return FlowInterpreter(self.flow_id, self.version, self.graph, max_steps=settings.ivr_max_steps)


async def published_version(session: AsyncSession, flow_id: uuid.UUID) -> int:
    """The number of the version a new call starts on (404 when the flow is archived or was never published)."""
    version = await session.scalar(
        select(IvrFlow.published_version).where(IvrFlow.id == flow_id, IvrFlow.archived_at.is_(None))
    )
    if version is None:
        raise NotFound("No published IVR flow by that id")
    return version


async def current_version(session: AsyncSession, flow_id: uuid.UUID) -> PinnedFlow:
    """The version a new call starts on (404 when the flow is archived or was never published)."""
    return await pinned_version(session, flow_id, await published_version(session, flow_id))


async def pinned_version(session: AsyncSession, flow_id: uuid.UUID, version: int) -> PinnedFlow:
    """The version a call in progress is pinned to, archived flow or not (versions are never changed)."""
    row = await _version_row(session, flow_id, version)
    return PinnedFlow(flow_id, row.version, _graph(row.graph))
