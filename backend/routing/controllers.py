"""Routes of the routing domain: the agent WebSocket and the routing configuration."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from litestar import Controller, Request, WebSocket, delete, get, patch, post, put, websocket
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.config import Settings
from backend.db.session import after_commit
from backend.lib.pagination import Page, PageRequest
from backend.lib.problems import InvalidInput, NotFound
from backend.routing import interactions, ivr_service, service
from backend.routing.engine import RoutingEngine
from backend.routing.hub import AgentHub
from backend.routing.schemas import (
    AgentProfileIn,
    AgentProfileOut,
    AgentStateChange,
    AgentStateOut,
    AgentStatePeriodOut,
    BusinessHoursIn,
    BusinessHoursOut,
    CallbackRequest,
    CodeIn,
    CodeOut,
    CodePatch,
    HoursStatus,
    InteractionCreate,
    InteractionEnd,
    InteractionOut,
    IvrFlowIn,
    IvrFlowOut,
    IvrFlowVersionOut,
    QueueIn,
    QueueOut,
    QueueStats,
    SkillIn,
    SkillOut,
    SkillPatch,
)


@websocket("/api/v1/agent/ws", opt={"access": "tenant", "permission": "self"}, name="agent_ws")
async def agent_socket(socket: WebSocket[Principal, Any, Any]) -> None:
    """The agent workspace's connection: offers, state changes and notifications arrive here.

    Authenticate with `?ticket=` from `POST /api/v1/auth/ws-ticket` (browsers) or a bearer header.
    """
    hub: AgentHub = socket.app.state.hub
    await socket.accept()
    await hub.serve(socket, socket.user)


InteractionState = Literal["new", "queued", "offered", "connected", "wrap_up", "ended"]


def _engine(request: Request[Any, Any, Any]) -> RoutingEngine:
    engine: RoutingEngine = request.app.state.routing
    return engine


def _sync_after_commit(request: Request[Principal, Any, Any], session: AsyncSession, user_id: uuid.UUID) -> None:
    """Once the change is durable, bring the matcher's view of the agent up to date."""
    tenant_id = request.user.tenant_id
    assert tenant_id is not None
    engine = _engine(request)
    after_commit(session, lambda: engine.sync_agent(tenant_id, user_id))


class InteractionController(Controller):
    """Interactions of every channel: created, offered, accepted, ended; each with its timeline."""

    path = "/api/v1/interactions"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @post("/", permission="queues:write", operation_id="create_interaction")
    async def create(self, request: Request[Principal, Any, Any], data: InteractionCreate) -> InteractionOut:
        """Create and queue an interaction (channels do this through the routing service)."""
        assert request.user.tenant_id is not None
        created = await _engine(request).create(request.user.tenant_id, data)
        return interactions.as_seen_by(created, request.user.permissions)

    @get("/", permission="queues:read", operation_id="list_interactions")
    async def list_interactions(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        page: PageRequest,
        interaction_state: InteractionState | None = Parameter(query="state", default=None),
        queue_id: uuid.UUID | None = None,
        agent_id: uuid.UUID | None = None,
    ) -> Page[InteractionOut]:
        """Interactions, newest first; filter by state, queue or agent."""
        items, cursor = await interactions.listing(
            db_session, page, state=interaction_state, queue_id=queue_id, agent_id=agent_id
        )
        return Page([interactions.as_seen_by(item, request.user.permissions) for item in items], cursor)

    @get("/{interaction_id:uuid}", permission="queues:read", operation_id="get_interaction")
    async def get_interaction(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, interaction_id: uuid.UUID
    ) -> InteractionOut:
        """One interaction with its timeline and, while it waits, its place and estimated wait."""
        assert request.user.tenant_id is not None
        found, timeline = await interactions.get(db_session, interaction_id)
        described = await _engine(request).describe(db_session, request.user.tenant_id, found, timeline)
        return interactions.as_seen_by(described, request.user.permissions)

    @post(
        "/{interaction_id:uuid}/callback", permission="queues:write", operation_id="request_callback", status_code=200
    )
    async def callback(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, data: CallbackRequest
    ) -> InteractionOut:
        """The waiting customer asks to be called back: their place is kept (or a time is booked)."""
        assert request.user.tenant_id is not None
        waiting = await _engine(request).request_callback(request.user.tenant_id, interaction_id, data.number, data.at)
        return interactions.as_seen_by(waiting, request.user.permissions)

    @post("/{interaction_id:uuid}/accept", permission="agent:workspace", operation_id="accept_offer", status_code=200)
    async def accept(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> InteractionOut:
        """Take an offer made to you."""
        accepted = await _engine(request).accept(request.user, interaction_id)
        return interactions.as_seen_by(accepted, request.user.permissions)

    @post("/{interaction_id:uuid}/reject", permission="agent:workspace", operation_id="reject_offer", status_code=204)
    async def reject(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> None:
        """Decline an offer made to you; it goes back to its place in the queue."""
        await _engine(request).reject(request.user, interaction_id)

    @post("/{interaction_id:uuid}/end", permission="agent:workspace", operation_id="end_interaction", status_code=200)
    async def end(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, data: InteractionEnd
    ) -> InteractionOut:
        """End an interaction you handle (supervisors may end any)."""
        ended = await _engine(request).end(request.user, interaction_id, data.outcome)
        return interactions.as_seen_by(ended, request.user.permissions)


class SkillController(Controller):
    """Skills agents hold and queues require."""

    path = "/api/v1/routing/skills"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_skills")
    async def list_skills(self, db_session: AsyncSession, page: PageRequest) -> Page[SkillOut]:
        """Skills; sort by name or created_at."""
        items, cursor = await service.list_skills(db_session, page)
        return Page(items, cursor)

    @post("/", permission="queues:write", operation_id="create_skill")
    async def create_skill(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: SkillIn
    ) -> SkillOut:
        """A new skill."""
        return await service.create_skill(db_session, request.user, data)

    @get("/{skill_id:uuid}", permission="queues:read", operation_id="get_skill")
    async def get_skill(self, db_session: AsyncSession, skill_id: uuid.UUID) -> SkillOut:
        """One skill."""
        return await service.get_skill(db_session, skill_id)

    @patch("/{skill_id:uuid}", permission="queues:write", operation_id="update_skill")
    async def update_skill(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, skill_id: uuid.UUID, data: SkillPatch
    ) -> SkillOut:
        """Rename a skill."""
        return await service.update_skill(db_session, request.user, skill_id, data)

    @delete("/{skill_id:uuid}", permission="queues:write", operation_id="delete_skill")
    async def delete_skill(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, skill_id: uuid.UUID
    ) -> None:
        """Delete a skill no queue requires."""
        await service.delete_skill(db_session, request.user, skill_id)


class BusinessHoursController(Controller):
    """Opening hours with holidays and exceptions, in a time zone."""

    path = "/api/v1/routing/business-hours"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_business_hours")
    async def list_hours(self, db_session: AsyncSession, page: PageRequest) -> Page[BusinessHoursOut]:
        """Business hours, by name."""
        items, cursor = await service.list_business_hours(db_session, page)
        return Page(items, cursor)

    @post("/", permission="queues:write", operation_id="create_business_hours")
    async def create_hours(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: BusinessHoursIn
    ) -> BusinessHoursOut:
        """New business hours; the tenant's time zone unless `time_zone` is given."""
        return await service.create_business_hours(db_session, request.user, data)

    @get("/{business_hours_id:uuid}", permission="queues:read", operation_id="get_business_hours")
    async def get_hours(self, db_session: AsyncSession, business_hours_id: uuid.UUID) -> BusinessHoursOut:
        """One set of business hours."""
        return await service.get_business_hours(db_session, business_hours_id)

    @put("/{business_hours_id:uuid}", permission="queues:write", operation_id="replace_business_hours")
    async def replace_hours(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        business_hours_id: uuid.UUID,
        data: BusinessHoursIn,
    ) -> BusinessHoursOut:
        """Replace business hours as a whole."""
        return await service.replace_business_hours(db_session, request.user, business_hours_id, data)

    @delete("/{business_hours_id:uuid}", permission="queues:write", operation_id="delete_business_hours")
    async def delete_hours(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, business_hours_id: uuid.UUID
    ) -> None:
        """Delete business hours no queue uses."""
        await service.delete_business_hours(db_session, request.user, business_hours_id)

    @get("/{business_hours_id:uuid}/status", permission="queues:read", operation_id="business_hours_status")
    async def status(
        self, db_session: AsyncSession, business_hours_id: uuid.UUID, at: datetime | None = None
    ) -> HoursStatus:
        """Open or closed at `at` (default now), and the next opening."""
        moment = at or datetime.now(UTC)
        if moment.tzinfo is None:
            raise InvalidInput.field("at", "must carry a UTC offset, e.g. 2026-03-29T01:30:00Z")
        return await service.business_hours_status(db_session, business_hours_id, moment)


class QueueController(Controller):
    """Queues and their routing rules."""

    path = "/api/v1/routing/queues"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_queues")
    async def list_queues(self, db_session: AsyncSession, page: PageRequest) -> Page[QueueOut]:
        """Queues; sort by name, priority or created_at."""
        items, cursor = await service.list_queues(db_session, page)
        return Page(items, cursor)

    @post("/", permission="queues:write", operation_id="create_queue")
    async def create_queue(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: QueueIn
    ) -> QueueOut:
        """A new queue."""
        return await service.create_queue(db_session, request.user, data)

    @get("/{queue_id:uuid}", permission="queues:read", operation_id="get_queue")
    async def get_queue(self, db_session: AsyncSession, queue_id: uuid.UUID) -> QueueOut:
        """One queue."""
        return await service.get_queue(db_session, queue_id)

    @put("/{queue_id:uuid}", permission="queues:write", operation_id="replace_queue")
    async def replace_queue(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, queue_id: uuid.UUID, data: QueueIn
    ) -> QueueOut:
        """Replace a queue's settings as a whole."""
        return await service.replace_queue(db_session, request.user, queue_id, data)

    @get("/{queue_id:uuid}/stats", permission="reports:read", operation_id="queue_stats")
    async def stats(self, request: Request[Principal, Any, Any], queue_id: uuid.UUID) -> QueueStats:
        """The queue now (waiting, longest wait, agents by state) and today (service level, abandonment).

        Supervisors' agent WebSockets also receive these as `queue_stats` messages whenever the queue changes.
        """
        assert request.user.tenant_id is not None
        return await _engine(request).queue_stats(request.user.tenant_id, queue_id)

    @delete("/{queue_id:uuid}", permission="queues:write", operation_id="delete_queue")
    async def delete_queue(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, queue_id: uuid.UUID
    ) -> None:
        """Delete a queue nothing overflows into."""
        await service.delete_queue(db_session, request.user, queue_id)


class AgentProfileController(Controller):
    """Agents' capacity per channel and skill levels."""

    path = "/api/v1/routing/agents"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/{user_id:uuid}", permission="queues:read", operation_id="get_agent_profile")
    async def get_profile(self, db_session: AsyncSession, user_id: uuid.UUID) -> AgentProfileOut:
        """An agent's routing profile."""
        return await service.get_agent_profile(db_session, user_id)

    @put("/{user_id:uuid}", permission="queues:write", operation_id="put_agent_profile")
    async def put_profile(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, user_id: uuid.UUID, data: AgentProfileIn
    ) -> AgentProfileOut:
        """Set an agent's capacity and skills."""
        profile = await service.put_agent_profile(db_session, request.user, user_id, data)
        _sync_after_commit(request, db_session, user_id)
        return profile


class _CodeCatalogueController(Controller):
    """Routes of a code catalogue; wrap-up codes and pause reasons behave the same."""

    tags = ["routing"]
    opt = {"access": "tenant"}
    catalogue: service.CodeCatalogue

    @get("/", permission="queues:read")
    async def list_codes(
        self, db_session: AsyncSession, page: PageRequest, active: bool | None = None
    ) -> Page[CodeOut]:
        """Codes, optionally only active or inactive ones."""
        items, cursor = await self.catalogue.list(db_session, page, active)
        return Page(items, cursor)

    @post("/", permission="queues:write")
    async def create_code(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: CodeIn
    ) -> CodeOut:
        """A new code."""
        return await self.catalogue.create(db_session, request.user, data)

    @get("/{code_id:uuid}", permission="queues:read")
    async def get_code(self, db_session: AsyncSession, code_id: uuid.UUID) -> CodeOut:
        """One code."""
        return await self.catalogue.get(db_session, code_id)

    @patch("/{code_id:uuid}", permission="queues:write")
    async def update_code(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, code_id: uuid.UUID, data: CodePatch
    ) -> CodeOut:
        """Relabel or (de)activate a code."""
        return await self.catalogue.update(db_session, request.user, code_id, data)

    @delete("/{code_id:uuid}", permission="queues:write")
    async def delete_code(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, code_id: uuid.UUID
    ) -> None:
        """Delete a code."""
        await self.catalogue.delete(db_session, request.user, code_id)


class WrapUpCodeController(_CodeCatalogueController):
    """Wrap-up (disposition) codes agents record after an interaction."""

    path = "/api/v1/routing/wrap-up-codes"
    catalogue = service.wrap_up_codes


class PauseReasonController(_CodeCatalogueController):
    """Reasons an agent can give for being away."""

    path = "/api/v1/routing/pause-reasons"
    catalogue = service.pause_reasons


class AgentStateController(Controller):
    """Agents' states: their own through `me`, anyone's for supervisors."""

    path = "/api/v1/routing"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/me/state", permission="agent:workspace", operation_id="get_my_state")
    async def my_state(self, request: Request[Principal, Any, Any], db_session: AsyncSession) -> AgentStateOut:
        """The caller's own state."""
        assert request.user.tenant_id is not None
        assert request.user.user_id is not None
        return await service.get_agent_state(db_session, request.user.tenant_id, request.user.user_id)

    @put("/me/state", permission="agent:workspace", operation_id="set_my_state")
    async def set_my_state(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, data: AgentStateChange
    ) -> AgentStateOut:
        """Go available, away (with a pause reason) or offline; busy and wrap-up are routing's to set."""
        state = await service.set_own_state(db_session, request.user, data)
        _sync_after_commit(request, db_session, state.user_id)
        return state

    @get("/agents/{user_id:uuid}/state", permission="queues:read", operation_id="get_agent_state")
    async def agent_state(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, user_id: uuid.UUID
    ) -> AgentStateOut:
        """An agent's current state."""
        assert request.user.tenant_id is not None
        return await service.get_agent_state(db_session, request.user.tenant_id, user_id)

    @get("/agents/{user_id:uuid}/state-history", permission="reports:read", operation_id="agent_state_history")
    async def history(
        self, db_session: AsyncSession, user_id: uuid.UUID, page: PageRequest
    ) -> Page[AgentStatePeriodOut]:
        """Time in each state, newest first."""
        items, cursor = await service.agent_state_history(db_session, user_id, page)
        return Page(items, cursor)


def _prompts(request: Request[Any, Any, Any]) -> ivr_service.PromptCatalogue:
    catalogue: ivr_service.PromptCatalogue = request.app.state.prompts
    return catalogue


class IvrFlowController(Controller):
    """IVR flows: drafts validated on save, published as immutable versions that calls pin."""

    path = "/api/v1/routing/ivr-flows"
    tags = ["routing"]
    opt = {"access": "tenant"}

    @get("/", permission="queues:read", operation_id="list_ivr_flows")
    async def list_flows(self, db_session: AsyncSession, page: PageRequest, archived: bool = False) -> Page[IvrFlowOut]:
        """Flows with their drafts (sort name, created_at, updated_at); `archived=true` lists archived ones."""
        items, cursor = await ivr_service.list_flows(db_session, page, archived=archived)
        return Page(items, cursor)

    @post("/", permission="queues:write", operation_id="create_ivr_flow")
    async def create_flow(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, settings: Settings, data: IvrFlowIn
    ) -> IvrFlowOut:
        """A new flow; its draft is validated (every field error at once) and takes no calls until published."""
        return await ivr_service.create_flow(db_session, request.user, data, _prompts(request), settings)

    @get("/{flow_id:uuid}", permission="queues:read", operation_id="get_ivr_flow")
    async def get_flow(self, db_session: AsyncSession, flow_id: uuid.UUID) -> IvrFlowOut:
        """One flow with its draft and the number of its published version."""
        return await ivr_service.get_flow(db_session, flow_id)

    @put("/{flow_id:uuid}", permission="queues:write", operation_id="save_ivr_flow")
    async def save(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        flow_id: uuid.UUID,
        data: IvrFlowIn,
    ) -> IvrFlowOut:
        """Save the draft (validated); give `draft_revision` to refuse overwriting someone else's save."""
        return await ivr_service.save_draft(db_session, request.user, flow_id, data, _prompts(request), settings)

    @post("/{flow_id:uuid}/publish", permission="queues:write", operation_id="publish_ivr_flow", status_code=201)
    async def publish(
        self,
        request: Request[Principal, Any, Any],
        db_session: AsyncSession,
        settings: Settings,
        flow_id: uuid.UUID,
        draft_revision: int | None = Parameter(query="draft_revision", default=None, ge=1),
    ) -> IvrFlowVersionOut:
        """Publish the draft as the next version: new calls start on it, calls in progress keep theirs."""
        return await ivr_service.publish(db_session, request.user, flow_id, _prompts(request), settings, draft_revision)

    @delete("/{flow_id:uuid}", permission="queues:write", operation_id="archive_ivr_flow")
    async def archive(
        self, request: Request[Principal, Any, Any], db_session: AsyncSession, flow_id: uuid.UUID
    ) -> None:
        """Archive a flow no number points at (versions are kept for calls in them and for history)."""
        await ivr_service.archive(db_session, request.user, flow_id)

    @get("/{flow_id:uuid}/versions", permission="queues:read", operation_id="list_ivr_flow_versions")
    async def versions(
        self, db_session: AsyncSession, flow_id: uuid.UUID, page: PageRequest
    ) -> Page[IvrFlowVersionOut]:
        """Published versions, newest first."""
        items, cursor = await ivr_service.list_versions(db_session, flow_id, page)
        return Page(items, cursor)

    @get("/{flow_id:uuid}/versions/{version:str}", permission="queues:read", operation_id="get_ivr_flow_version")
    async def version(self, db_session: AsyncSession, flow_id: uuid.UUID, version: str) -> IvrFlowVersionOut:
        """One published version (immutable), by its number."""
        if not version.isdigit() or len(version) > 9:
            raise NotFound("No such version of this IVR flow")
        return await ivr_service.get_version(db_session, flow_id, int(version))
