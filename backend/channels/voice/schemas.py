"""Request and response types of the voice channel: switch nodes, numbers, CDRs."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

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
