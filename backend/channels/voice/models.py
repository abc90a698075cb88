"""Tables of the voice channel: switch nodes and the number pool (global), CDRs and registrations (per tenant)."""

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
        # ON DELETE SET NULL (queue_id) is added by the migration: a deleted queue leaves the number unrouted.
        ForeignKeyConstraint(["tenant_id", "queue_id"], ["queues.tenant_id", "queues.id"]),
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
