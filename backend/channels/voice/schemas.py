"""Request and response types of the voice channel: switch nodes, numbers, CDRs, media, outbound, supervision."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from backend.tenants.schemas import Strict

NodeName = Annotated[
    str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="FreeSWITCH switchname")
]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Secret = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Source = Annotated[str, msgspec.Meta(min_length=2, max_length=64, description="An IP address or network (CIDR)")]
Number = Annotated[str, msgspec.Meta(min_length=3, max_length=32, description="A phone number, E.164 (+...)")]
Label = Annotated[str, msgspec.Meta(max_length=120)]


class SwitchNodeCreate(Strict):
    name: NodeName
    esl_host: Host
    esl_password: Secret
    xml_curl_sources: Annotated[list[Source], msgspec.Meta(min_length=1, max_length=16)]
    esl_port: Port = 8021
    sip_address: Host | None = None


class SwitchNodePatch(Strict):
    esl_host: Host | msgspec.UnsetType = msgspec.UNSET
    esl_port: Port | msgspec.UnsetType = msgspec.UNSET
    esl_password: Secret | msgspec.UnsetType = msgspec.UNSET
    xml_curl_sources: Annotated[list[Source], msgspec.Meta(min_length=1, max_length=16)] | msgspec.UnsetType = (
        msgspec.UNSET
    )
    sip_address: Host | msgspec.UnsetType | None = msgspec.UNSET


class SwitchNodeOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    status: str
    """up, down, draining or unknown (never heard from)."""
    health: str
    draining: bool
    esl_host: str
    esl_port: int
    xml_curl_sources: list[str]
    sip_address: str | None
    last_heartbeat_at: datetime | None
    went_down_at: datetime | None
    stats: dict[str, Any]
    created_at: datetime


class SwitchLinkOut(msgspec.Struct):
    """The node's inbound event socket as the process holding it last reported (every lease renewal)."""

    node_id: uuid.UUID
    held: bool
    """Whether some backend process holds the node's lease now."""
    holder: str | None
    """`host:pid:tag` of that process."""
    connected: bool
    connected_since: datetime | None
    error: str | None
    """Why it is not connected (a refused password, the node unreachable...)."""
    events: int
    dropped: int
    failed: int
    lag_ms: float | None
    """How long after the switch fired it the last event was applied."""
    reported_at: datetime | None


class NumberCreate(Strict):
    number: Number
    label: Label = ""


class NumberAssign(Strict):
    tenant_id: uuid.UUID


class NumberRouting(Strict):
    """Where a tenant's number sends its calls. `null` removes the target."""

    queue_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    ivr_flow_id: uuid.UUID | msgspec.UnsetType | None = msgspec.UNSET
    label: Label | msgspec.UnsetType = msgspec.UNSET


class NumberOut(msgspec.Struct):
    id: uuid.UUID
    number: str
    label: str
    queue_id: uuid.UUID | None
    ivr_flow_id: uuid.UUID | None
    assigned_at: datetime | None


class PoolNumberOut(msgspec.Struct):
    id: uuid.UUID
    number: str
    label: str
    tenant_id: uuid.UUID | None
    queue_id: uuid.UUID | None
    ivr_flow_id: uuid.UUID | None
    assigned_at: datetime | None
    created_at: datetime


class CdrOut(msgspec.Struct):
    id: uuid.UUID
    leg_uuid: uuid.UUID
    call_uuid: uuid.UUID | None
    direction: str
    caller_number: str
    caller_name: str
    destination_number: str
    did: str | None
    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    interaction_id: uuid.UUID | None
    node_name: str
    started_at: datetime
    ringing_at: datetime | None
    answered_at: datetime | None
    bridged_at: datetime | None
    ended_at: datetime
    duration_ms: int
    billable_ms: int
    hangup_cause: str | None
    disposition: str
    sources: list[str]


PromptName = Annotated[str, msgspec.Meta(min_length=1, max_length=120)]
PromptKind = Literal["prompt", "music"]
RecordingPolicy = Literal["always", "never", "on_demand"]
Region = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2 region, e.g. FR")]


class PromptOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    kind: str
    format: str
    size_bytes: int
    duration_ms: int
    sample_rate: int
    channels: int
    sha256: str
    created_at: datetime
    updated_at: datetime


class PromptPatch(Strict):
    name: PromptName


class QueueVoiceSettingsIn(Strict):
    """What a queue's callers hear and keep."""

    music_on_hold_id: uuid.UUID | None = None
    """A `music` prompt played while callers wait (null: the switch's default music)."""
    announcement_id: uuid.UUID | None = None
    """Played at the queue's announcement interval, before position and estimated wait."""
    recording_policy: RecordingPolicy = "never"
    voicemail_enabled: bool = False
    voicemail_greeting_id: uuid.UUID | None = None
    voicemail_max_seconds: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 120
    voicemail_creates_ticket: bool = False
    """Each voicemail left in this queue's box opens a ticket (when the ticket desk is wired in)."""


class QueueVoiceSettingsOut(msgspec.Struct):
    queue_id: uuid.UUID
    music_on_hold_id: uuid.UUID | None
    announcement_id: uuid.UUID | None
    recording_policy: str
    voicemail_enabled: bool
    voicemail_greeting_id: uuid.UUID | None
    voicemail_max_seconds: int
    voicemail_creates_ticket: bool


class PausedInterval(msgspec.Struct):
    paused_at: datetime
    resumed_at: datetime | None


class RecordingOut(msgspec.Struct):
    id: uuid.UUID
    interaction_id: uuid.UUID | None
    call_uuid: uuid.UUID | None
    leg_uuid: uuid.UUID | None
    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    policy: str
    status: str
    format: str
    size_bytes: int | None
    duration_ms: int | None
    paused_intervals: list[PausedInterval]
    started_at: datetime
    ended_at: datetime | None
    stored_at: datetime | None


class VoicemailOut(msgspec.Struct):
    id: uuid.UUID
    box: str
    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    interaction_id: uuid.UUID | None
    caller_number: str
    status: str
    format: str
    size_bytes: int | None
    duration_ms: int | None
    ticket_id: str | None
    created_at: datetime
    stored_at: datetime | None


GatewayName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class GatewayIn(Strict):
    name: GatewayName
    description: Annotated[str, msgspec.Meta(max_length=300)] = ""
    enabled: bool = True


class GatewayOut(msgspec.Struct):
    id: uuid.UUID
    name: str
    description: str
    enabled: bool
    created_at: datetime


class OutboundRouteIn(Strict):
    prefix: Annotated[str, msgspec.Meta(pattern=r"^\+[0-9]{0,15}$", description="E.164 prefix; `+` alone: all")]
    gateway_id: uuid.UUID
    priority: Annotated[int, msgspec.Meta(ge=0, le=100)] = 50


class OutboundRouteOut(msgspec.Struct):
    id: uuid.UUID
    prefix: str
    gateway_id: uuid.UUID
    gateway_name: str
    priority: int
    created_at: datetime


class OutboundPolicyIn(Strict):
    home_regions: Annotated[list[Region], msgspec.Meta(max_length=20)] = []
    allow_international: bool = False
    allowed_regions: Annotated[list[Region], msgspec.Meta(max_length=250)] = []
    allow_premium: bool = False
    max_concurrent_calls: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None


class OutboundPolicyOut(msgspec.Struct):
    home_regions: list[str]
    """Regions national for the tenant: those set, or those of its numbers."""
    allow_international: bool
    allowed_regions: list[str]
    allow_premium: bool
    max_concurrent_calls: int
    """The cap in force: the policy's, the plan's, or the default setting."""


class OutboundCheckIn(Strict):
    destination: Number
    caller_id: Number | None = None


class OutboundCheckOut(msgspec.Struct):
    allowed: bool
    destination: str
    caller_id: str
    gateway: str
    number_type: str
    region: str


class SupervisionSessionOut(msgspec.Struct):
    id: uuid.UUID
    supervisor_id: uuid.UUID
    agent_id: uuid.UUID | None
    interaction_id: uuid.UUID | None
    call_uuid: uuid.UUID | None
    mode: str
    modes: list[dict[str, Any]]
    started_at: datetime
    ended_at: datetime | None
