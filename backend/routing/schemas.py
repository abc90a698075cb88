"""Request and response types of the routing domain's configuration."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from backend.routing.ivr import FlowGraph
from backend.tenants.schemas import Strict

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
Description = Annotated[str, msgspec.Meta(max_length=300)]
Code = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")]
Clock = Annotated[str, msgspec.Meta(pattern=r"^\d\d:\d\d$")]
IsoDate = Annotated[str, msgspec.Meta(pattern=r"^\d{4}-\d\d-\d\d$")]
Level = Annotated[int, msgspec.Meta(ge=1, le=10)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=86_400)]
Strategy = Literal["longest_idle", "round_robin", "fewest_interactions", "best_skill", "ring_all"]
Channel = Literal["voice", "webchat", "wechat", "callback", "email", "sms"]


class SkillIn(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
    description: Description = ""


class SkillPatch(Strict):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=80)] | msgspec.UnsetType = msgspec.UNSET
    description: Description | msgspec.UnsetType = msgspec.UNSET


class SkillOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    created_at: datetime


class WeeklyRange(Strict):
    day: Annotated[int, msgspec.Meta(ge=0, le=6, description="Monday is 0")]
    start: Clock
    end: Clock


class Holiday(Strict):
    date: IsoDate
    name: Annotated[str, msgspec.Meta(max_length=120)] = ""


class ClockRange(Strict):
    start: Clock
    end: Clock


class HoursException(Strict):
    """A day with hours of its own (empty `ranges`: closed)."""

    date: IsoDate
    ranges: Annotated[list[ClockRange], msgspec.Meta(max_length=12)] = []


class BusinessHoursIn(Strict):
    name: Name
    time_zone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    weekly: Annotated[list[WeeklyRange], msgspec.Meta(max_length=84)] = []
    holidays: Annotated[list[Holiday], msgspec.Meta(max_length=366)] = []
    exceptions: Annotated[list[HoursException], msgspec.Meta(max_length=366)] = []


class BusinessHoursOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    time_zone: str
    weekly: list[WeeklyRange]
    holidays: list[Holiday]
    exceptions: list[HoursException]
    created_at: datetime


class HoursStatus(msgspec.Struct):
    open: bool
    at: datetime
    next_opening: datetime | None


class QueueAction(Strict):
    """What happens to an interaction: another queue, voicemail, a callback offer, hang-up, or nothing."""

    type: Literal["none", "queue", "voicemail", "callback", "hangup"]
    queue_id: uuid.UUID | None = None
    message: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class SkillStep(Strict):
    after_seconds: Seconds
    min_level: Level


class SkillRequirement(Strict):
    skill_id: uuid.UUID
    steps: Annotated[list[SkillStep], msgspec.Meta(min_length=1, max_length=10)]


class Announcements(Strict):
    position: bool = True
    estimated_wait: bool = True
    interval_seconds: Annotated[int, msgspec.Meta(ge=10, le=3600)] = 60


class QueueIn(Strict):
    name: Name
    strategy: Strategy = "longest_idle"
    priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 50
    max_wait_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)] = 600
    offer_timeout_seconds: Annotated[int, msgspec.Meta(ge=5, le=600)] = 20
    wrap_up_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 30
    service_level_percent: Annotated[int, msgspec.Meta(ge=1, le=100)] = 80
    service_level_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 20
    business_hours_id: uuid.UUID | None = None
    overflow_action: QueueAction = msgspec.field(default_factory=lambda: QueueAction(type="none"))
    closed_action: QueueAction = msgspec.field(default_factory=lambda: QueueAction(type="hangup"))
    no_agents_action: QueueAction = msgspec.field(default_factory=lambda: QueueAction(type="none"))
    announcements: Announcements = msgspec.field(default_factory=Announcements)
    skills: Annotated[list[SkillRequirement], msgspec.Meta(max_length=20)] = []


class QueueOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    strategy: str
    priority: int
    max_wait_seconds: int
    offer_timeout_seconds: int
    wrap_up_seconds: int
    service_level_percent: int
    service_level_seconds: int
    business_hours_id: uuid.UUID | None
    overflow_action: QueueAction
    closed_action: QueueAction
    no_agents_action: QueueAction
    announcements: Announcements
    skills: list[SkillRequirement]
    created_at: datetime


class AgentSkillLevel(Strict):
    skill_id: uuid.UUID
    level: Level


class AgentProfileIn(Strict):
    capacity: dict[Channel, Annotated[int, msgspec.Meta(ge=0, le=50)]] = msgspec.field(
        default_factory=lambda: {"voice": 1, "webchat": 3, "wechat": 3}
    )
    skills: Annotated[list[AgentSkillLevel], msgspec.Meta(max_length=100)] = []


class AgentProfileOut(msgspec.Struct):
    user_id: uuid.UUID
    capacity: dict[str, int]
    skills: list[AgentSkillLevel]


class CodeIn(Strict):
    code: Code
    label: Name
    active: bool = True


class CodePatch(Strict):
    label: Name | msgspec.UnsetType = msgspec.UNSET
    active: bool | msgspec.UnsetType = msgspec.UNSET


class CodeOut(msgspec.Struct):
    id: uuid.UUID
    code: str
    label: str
    active: bool
    created_at: datetime


AgentStateName = Literal["offline", "available", "away", "busy", "wrap_up"]


class AgentStateChange(Strict):
    """What an agent sets by hand: available, away (with a pause reason code) or offline."""

    state: AgentStateName
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=40)] | None = None


class AgentStateOut(msgspec.Struct):
    user_id: uuid.UUID
    state: str
    reason: str | None
    since: datetime
    voice_registered: bool
    voice_ready: bool


class AgentStatePeriodOut(msgspec.Struct):
    state: str
    reason: str | None
    started_at: datetime
    ended_at: datetime | None
    seconds: float | None


class InteractionCreate(Strict):
    """A new contact to route. Channels create these through the routing service; this route serves integrations."""

    channel: Channel
    queue_id: uuid.UUID
    customer_ref: Annotated[str, msgspec.Meta(max_length=120)] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None
    attributes: Annotated[dict[str, str], msgspec.Meta(max_length=50)] = msgspec.field(default_factory=dict)


class InteractionEventOut(msgspec.Struct):
    seq: int
    name: str
    at: datetime
    agent_id: uuid.UUID | None
    data: dict[str, Any]


class InteractionOut(msgspec.Struct):
    id: uuid.UUID
    channel: str
    queue_id: uuid.UUID | None
    customer_ref: str | None
    priority: int
    attributes: dict[str, Any]
    state: str
    agent_id: uuid.UUID | None
    outcome: str | None
    created_at: datetime
    queued_at: datetime | None
    connected_at: datetime | None
    ended_at: datetime | None
    position: int | None = None
    estimated_wait_seconds: int | None = None
    timeline: list[InteractionEventOut] | None = None


class InteractionEnd(Strict):
    outcome: Literal["handled", "abandoned", "cancelled"] = "handled"
    wrap_up_code: Annotated[str, msgspec.Meta(max_length=40)] | None = None


class CallbackRequest(Strict):
    """Keep my place and call me back (now, when my turn comes), or at a time I choose within business hours."""

    number: Annotated[str, msgspec.Meta(min_length=3, max_length=32)]
    at: datetime | None = None


class QueueStats(msgspec.Struct):
    """A queue right now, and so far today in the tenant's time zone."""

    queue_id: uuid.UUID
    waiting: int
    longest_wait_seconds: float
    agents: dict[str, int]
    """Agents of the tenant by state."""
    offered_today: int
    answered_today: int
    abandoned_today: int
    answered_within_target_today: int
    service_level_percent: float | None
    """Answered within the queue's target, of answered plus abandoned; null before the first one."""
    abandonment_percent: float | None
    at: datetime


class IvrFlowIn(Strict):
    """A flow's name and its draft graph (validated on save; publish to make it take calls)."""

    name: Name
    graph: FlowGraph
    description: Description = ""
    draft_revision: int | None = None
    """When given, the save is refused (409) if someone else saved the draft since this revision."""


class IvrFlowOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    graph: FlowGraph
    """The draft."""
    draft_revision: int
    published_version: int | None
    archived: bool
    created_at: datetime
    updated_at: datetime


class IvrFlowVersionOut(msgspec.Struct):
    flow_id: uuid.UUID
    version: int
    graph: FlowGraph
    published_at: datetime
    published_by: uuid.UUID | None
