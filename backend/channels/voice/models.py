"""Tables of the voice channel.

Global: switch nodes, the number pool, carrier gateways and outbound routes. Per tenant: CDRs,
registrations, prompts, queues' voice settings, recordings, voicemail, outbound policy, supervision.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.db.base import Base, GlobalRow, TenantOwned, utcnow

NODE_HEALTH = ("unknown", "up", "down")
DISPOSITIONS = ("answered", "no_answer", "busy", "cancelled", "refused", "failed", "node_failure")
CDR_SOURCES = ("event", "json_cdr", "err_log", "node_failure")
TRANSPORTS = ("udp", "tcp", "tls", "ws", "wss")


class SwitchNode(GlobalRow, Base):
    """A FreeSWITCH node of the provider's cluster; its health comes from HEARTBEAT events.

    `health` is what the heartbeats say; `draining` is what provider ops decided. A node takes
    new calls and originations only when it is up and not draining.
    """

    __tablename__ = "switch_nodes"
    __table_args__ = (CheckConstraint(f"health IN {NODE_HEALTH!r}", name="health"),)

    name: Mapped[str] = mapped_column(String(64), unique=True)
    """FreeSWITCH's switchname (`FreeSWITCH-Switchname`, the `hostname` field of xml_curl requests)."""
    esl_host: Mapped[str] = mapped_column(String(255))
    esl_port: Mapped[int] = mapped_column(Integer, default=8021)
    esl_password_sealed: Mapped[str] = mapped_column(Text)
    """The event socket password, encrypted with the application key; never returned by the API."""
    xml_curl_sources: Mapped[list[str]] = mapped_column(ARRAY(String(64)), default=list)
    """Addresses or networks (CIDR) the node's xml_curl and json_cdr requests come from."""
    sip_address: Mapped[str | None] = mapped_column(String(255))
    """Where SIP reaches the node (`host:port`), for bridging calls between nodes."""
    health: Mapped[str] = mapped_column(String(8), default="unknown")
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column()
    went_down_at: Mapped[datetime | None] = mapped_column()
    failover_claimed_at: Mapped[datetime | None] = mapped_column()
    """When a process started freeing the agents and closing the calls of this (down) node."""
    failover_done_at: Mapped[datetime | None] = mapped_column()
    core_uuid: Mapped[str | None] = mapped_column(String(64))
    """FreeSWITCH's `Core-UUID`: it changes when the node restarts."""
    stats: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    """The last heartbeat's figures: version, sessions, peak, idle CPU."""
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class PhoneNumber(GlobalRow, Base):
    """A number (DID) of the provider's pool, free or assigned to one tenant and pointed at a queue."""

    __tablename__ = "phone_numbers"
    __table_args__ = (
        CheckConstraint("e164 ~ '^\\+[1-9][0-9]{6,14}$'", name="e164"),
        CheckConstraint(
            "tenant_id IS NOT NULL OR (queue_id IS NULL AND ivr_flow_id IS NULL)", name="free_has_no_target"
        ),
        # A deleted queue leaves the number assigned but unrouted (PostgreSQL 15's column list on SET NULL).
        ForeignKeyConstraint(
            ["tenant_id", "queue_id"], ["queues.tenant_id", "queues.id"], ondelete="SET NULL (queue_id)"
        ),
        Index("ix_phone_numbers_tenant", "tenant_id", "e164"),
        ForeignKeyConstraint(["tenant_id", "ivr_flow_id"], ["ivr_flows.tenant_id", "ivr_flows.id"]),
    )

    e164: Mapped[str] = mapped_column(String(16), unique=True)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id"))
    """Null while the number is in the free pool; a tenant with numbers cannot be deleted before they are released."""
    queue_id: Mapped[uuid.UUID | None] = mapped_column()
    ivr_flow_id: Mapped[uuid.UUID | None] = mapped_column()
    """The IVR flow that answers the number (call handling fills this in; it takes precedence over the queue)."""
    label: Mapped[str] = mapped_column(String(120), default="")
    assigned_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class CallLeg(TenantOwned, Base):
    """The CDR of one call leg, stored once per FreeSWITCH leg UUID whatever source reported it."""

    __tablename__ = "voice_cdrs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "leg_uuid"),
        CheckConstraint(f"disposition IN {DISPOSITIONS!r}", name="disposition"),
        CheckConstraint("direction IN ('inbound','outbound')", name="direction"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        Index("ix_voice_cdrs_ended", "tenant_id", "ended_at", "id"),
        Index("ix_voice_cdrs_interaction", "tenant_id", "interaction_id"),
    )

    leg_uuid: Mapped[uuid.UUID] = mapped_column()
    call_uuid: Mapped[uuid.UUID | None] = mapped_column()
    """The leg that started the call (the caller's a-leg); legs of one call share it."""
    node_id: Mapped[uuid.UUID | None] = mapped_column()
    node_name: Mapped[str] = mapped_column(String(64), default="")
    direction: Mapped[str] = mapped_column(String(8))
    caller_number: Mapped[str] = mapped_column(String(64), default="")
    caller_name: Mapped[str] = mapped_column(String(120), default="")
    destination_number: Mapped[str] = mapped_column(String(64), default="")
    did: Mapped[str | None] = mapped_column(String(16))
    queue_id: Mapped[uuid.UUID | None] = mapped_column()
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    interaction_id: Mapped[uuid.UUID | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column()
    ringing_at: Mapped[datetime | None] = mapped_column()
    answered_at: Mapped[datetime | None] = mapped_column()
    bridged_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime] = mapped_column()
    duration_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    billable_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    hangup_cause: Mapped[str | None] = mapped_column(String(48))
    hangup_cause_q850: Mapped[int | None] = mapped_column(SmallInteger)
    disposition: Mapped[str] = mapped_column(String(16))
    sources: Mapped[list[str]] = mapped_column(ARRAY(String(16)), default=list)
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    """A few SIP and channel facts worth keeping (call id, who hung up, refusal reason, core uuid)."""
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class UnattributedLeg(GlobalRow, Base):
    """A CDR no tenant could be found for (unknown domain or number, a test call): kept, never dropped."""

    __tablename__ = "unattributed_cdrs"

    leg_uuid: Mapped[uuid.UUID] = mapped_column(unique=True)
    node_name: Mapped[str] = mapped_column(String(64), default="")
    reason: Mapped[str] = mapped_column(String(120))
    sources: Mapped[list[str]] = mapped_column(ARRAY(String(16)), default=list)
    leg: Mapped[dict[str, Any]] = mapped_column(JSONB)
    """The leg's facts as parsed, for provider operations to look into."""


class Registration(TenantOwned, Base):
    """Where a seat's softphone is registered: which node, which contact, until when."""

    __tablename__ = "voice_registrations"
    __table_args__ = (
        UniqueConstraint("tenant_id", "node_id", "sip_username", "contact"),
        CheckConstraint(f"transport IN {TRANSPORTS!r}", name="transport"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
        Index("ix_voice_registrations_user", "tenant_id", "user_id"),
        ForeignKeyConstraint(["node_id"], ["switch_nodes.id"], ondelete="CASCADE"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column()
    node_id: Mapped[uuid.UUID] = mapped_column()
    sip_username: Mapped[str] = mapped_column(String(64))
    contact: Mapped[str] = mapped_column(String(512))
    call_id: Mapped[str] = mapped_column(String(255), default="")
    transport: Mapped[str] = mapped_column(String(8), default="udp")
    network_ip: Mapped[str] = mapped_column(String(64), default="")
    network_port: Mapped[int | None] = mapped_column(Integer)
    user_agent: Mapped[str] = mapped_column(String(255), default="")
    registered_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()


PROMPT_KINDS = ("prompt", "music")
AUDIO_FORMATS = ("wav", "mp3")
RECORDING_POLICIES = ("always", "never", "on_demand")
STORED_STATES = ("recording", "stored", "failed")
SUPERVISION_MODES = ("listen", "whisper", "barge")


class Prompt(TenantOwned, Base):
    """An audio file a tenant uploaded: a prompt for flows and queues, or music on hold."""

    __tablename__ = "voice_prompts"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint(f"kind IN {PROMPT_KINDS!r}", name="kind"),
        CheckConstraint(f"format IN {AUDIO_FORMATS!r}", name="format"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(8))
    format: Mapped[str] = mapped_column(String(4))
    storage_key: Mapped[str] = mapped_column(String(300))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    duration_ms: Mapped[int] = mapped_column(BigInteger)
    sample_rate: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(SmallInteger)
    created_by: Mapped[uuid.UUID | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class QueueVoiceSettings(Base):
    """What a queue's callers hear and keep: music on hold, announcements, recording policy, voicemail."""

    __tablename__ = "voice_queue_settings"
    __table_args__ = (
        CheckConstraint(f"recording_policy IN {RECORDING_POLICIES!r}", name="recording_policy"),
        ForeignKeyConstraint(["tenant_id", "queue_id"], ["queues.tenant_id", "queues.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "music_on_hold_id"], ["voice_prompts.tenant_id", "voice_prompts.id"]),
        ForeignKeyConstraint(["tenant_id", "announcement_id"], ["voice_prompts.tenant_id", "voice_prompts.id"]),
        ForeignKeyConstraint(["tenant_id", "voicemail_greeting_id"], ["voice_prompts.tenant_id", "voice_prompts.id"]),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    queue_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    music_on_hold_id: Mapped[uuid.UUID | None] = mapped_column()
    announcement_id: Mapped[uuid.UUID | None] = mapped_column()
    """Played at the queue's announcement interval, before the position and estimated wait."""
    recording_policy: Mapped[str] = mapped_column(String(12), default="never")
    voicemail_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    voicemail_greeting_id: Mapped[uuid.UUID | None] = mapped_column()
    voicemail_max_seconds: Mapped[int] = mapped_column(Integer, default=120)
    voicemail_creates_ticket: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class Recording(TenantOwned, Base):
    """A call recording: begun by call control, uploaded by the switch node once the file is closed."""

    __tablename__ = "voice_recordings"
    __table_args__ = (
        CheckConstraint(f"status IN {STORED_STATES!r}", name="status"),
        CheckConstraint("policy IN ('always','on_demand')", name="policy"),
        CheckConstraint(f"format IN {AUDIO_FORMATS!r}", name="format"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        Index("ix_voice_recordings_interaction", "tenant_id", "interaction_id"),
        Index("ix_voice_recordings_started", "tenant_id", "started_at", "id"),
    )

    interaction_id: Mapped[uuid.UUID | None] = mapped_column()
    call_uuid: Mapped[uuid.UUID | None] = mapped_column()
    leg_uuid: Mapped[uuid.UUID | None] = mapped_column()
    """The CDR leg that was recorded."""
    queue_id: Mapped[uuid.UUID | None] = mapped_column()
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    policy: Mapped[str] = mapped_column(String(12))
    status: Mapped[str] = mapped_column(String(12), default="recording")
    format: Mapped[str] = mapped_column(String(4), default="wav")
    storage_key: Mapped[str | None] = mapped_column(String(300))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    paused_intervals: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    """[{"paused_at": iso, "resumed_at": iso or null}] in UTC, in order."""
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    stored_at: Mapped[datetime | None] = mapped_column()


class Voicemail(TenantOwned, Base):
    """A voicemail message left in a queue's or an agent's box."""

    __tablename__ = "voice_voicemails"
    __table_args__ = (
        CheckConstraint(f"status IN {STORED_STATES!r}", name="status"),
        CheckConstraint(
            "(box = 'queue' AND queue_id IS NOT NULL) OR (box = 'agent' AND agent_id IS NOT NULL)", name="box"
        ),
        CheckConstraint(f"format IN {AUDIO_FORMATS!r}", name="format"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        Index("ix_voice_voicemails_created", "tenant_id", "created_at", "id"),
    )

    box: Mapped[str] = mapped_column(String(8))
    queue_id: Mapped[uuid.UUID | None] = mapped_column()
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    interaction_id: Mapped[uuid.UUID | None] = mapped_column()
    call_uuid: Mapped[uuid.UUID | None] = mapped_column()
    caller_number: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(12), default="recording")
    format: Mapped[str] = mapped_column(String(4), default="wav")
    storage_key: Mapped[str | None] = mapped_column(String(300))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    ticket_id: Mapped[str | None] = mapped_column(String(80))
    stored_at: Mapped[datetime | None] = mapped_column()
    announced_at: Mapped[datetime | None] = mapped_column()
    """When the message became an interaction (and a ticket, if its queue asks): done once."""


class CarrierGateway(GlobalRow, Base):
    """A SIP trunk to a carrier (a sofia gateway on every node) that outbound calls leave through."""

    __tablename__ = "carrier_gateways"

    name: Mapped[str] = mapped_column(String(64), unique=True)
    """The sofia gateway's name: calls leave as `sofia/gateway/<name>/<number>`."""
    description: Mapped[str] = mapped_column(String(300), default="")
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class OutboundRoute(GlobalRow, Base):
    """Which gateway carries calls to numbers starting with a prefix (longest prefix wins, then priority)."""

    __tablename__ = "outbound_routes"
    __table_args__ = (
        UniqueConstraint("prefix", "gateway_id"),
        CheckConstraint("prefix ~ '^\\+[0-9]{0,15}$'", name="prefix"),
        ForeignKeyConstraint(["gateway_id"], ["carrier_gateways.id"], ondelete="CASCADE"),
    )

    prefix: Mapped[str] = mapped_column(String(16))
    gateway_id: Mapped[uuid.UUID] = mapped_column()
    priority: Mapped[int] = mapped_column(SmallInteger, default=50)
    """Among routes of the same prefix, the lowest number is tried first."""


class OutboundPolicy(Base):
    """Where a tenant's calls may go, set by provider operations (toll-fraud protection)."""

    __tablename__ = "voice_outbound_policies"
    __table_args__ = (ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    home_regions: Mapped[list[str]] = mapped_column(ARRAY(String(2)), default=list)
    """ISO 3166 regions that are national for this tenant (empty: the regions of its numbers)."""
    allow_international: Mapped[bool] = mapped_column(Boolean, default=False)
    allowed_regions: Mapped[list[str]] = mapped_column(ARRAY(String(2)), default=list)
    """Foreign regions allowed even without `allow_international`."""
    allow_premium: Mapped[bool] = mapped_column(Boolean, default=False)
    max_concurrent_calls: Mapped[int | None] = mapped_column(Integer)
    """A cap below the plan's; null: the plan's."""
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow, onupdate=utcnow)


class SupervisionSession(TenantOwned, Base):
    """A supervisor listening, whispering or barging into an agent's call: who, whom, when, how."""

    __tablename__ = "voice_supervision_sessions"
    __table_args__ = (
        CheckConstraint(f"mode IN {SUPERVISION_MODES!r}", name="mode"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        Index("ix_voice_supervision_started", "tenant_id", "started_at", "id"),
    )

    supervisor_id: Mapped[uuid.UUID] = mapped_column()
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    interaction_id: Mapped[uuid.UUID | None] = mapped_column()
    call_uuid: Mapped[uuid.UUID | None] = mapped_column()
    mode: Mapped[str] = mapped_column(String(8))
    modes: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    """Every mode the session was in, with when it started: [{"mode", "at"}]."""
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
