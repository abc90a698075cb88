"""Tables of the routing domain's configuration: skills, queues, agent profiles, hours, codes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKeyConstraint,
    Index,
    Integer,
    SmallInteger,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from backend.db.base import Base, TenantOwned, utcnow


class Skill(TenantOwned, Base):
    """Something an agent can do, at a level from 1 to 10 (a language, a product, a tier)."""

    __tablename__ = "skills"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(String(300), default="")


class BusinessHours(TenantOwned, Base):
    """Weekly opening ranges, holidays and one-off exceptions, in a time zone."""

    __tablename__ = "business_hours"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(120))
    time_zone: Mapped[str] = mapped_column(String(64))
    weekly: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    """[{"day": 0-6 (Monday=0), "start": "HH:MM", "end": "HH:MM"}], end may be "24:00"."""
    holidays: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    """[{"date": "YYYY-MM-DD", "name": "..."}]: closed all day."""
    exceptions: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    """[{"date": "YYYY-MM-DD", "ranges": [{"start", "end"}]}]: that day's hours instead of the weekly ones."""


class Queue(TenantOwned, Base):
    """Where interactions wait for an agent, and the rules they wait by."""

    __tablename__ = "queues"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        CheckConstraint(
            "strategy IN ('longest_idle','round_robin','fewest_interactions','best_skill','ring_all')",
            name="strategy",
        ),
        CheckConstraint("priority BETWEEN 0 AND 100", name="priority"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "business_hours_id"], ["business_hours.tenant_id", "business_hours.id"]),
    )

    name: Mapped[str] = mapped_column(String(120))
    strategy: Mapped[str] = mapped_column(String(24), default="longest_idle")
    priority: Mapped[int] = mapped_column(SmallInteger, default=50)
    max_wait_seconds: Mapped[int] = mapped_column(Integer, default=600)
    offer_timeout_seconds: Mapped[int] = mapped_column(Integer, default=20)
    wrap_up_seconds: Mapped[int] = mapped_column(Integer, default=30)
    service_level_percent: Mapped[int] = mapped_column(SmallInteger, default=80)
    service_level_seconds: Mapped[int] = mapped_column(Integer, default=20)
    business_hours_id: Mapped[uuid.UUID | None] = mapped_column()
    overflow_action: Mapped[dict[str, Any]] = mapped_column(JSONB)
    closed_action: Mapped[dict[str, Any]] = mapped_column(JSONB)
    no_agents_action: Mapped[dict[str, Any]] = mapped_column(JSONB)
    announcements: Mapped[dict[str, Any]] = mapped_column(JSONB)
    """{"position": bool, "estimated_wait": bool, "interval_seconds": int}."""


class QueueSkill(Base):
    """A skill a queue requires, with the minimum level relaxing in steps as the wait grows."""

    __tablename__ = "queue_skills"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "queue_id"], ["queues.tenant_id", "queues.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "skill_id"], ["skills.tenant_id", "skills.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    queue_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    skill_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    steps: Mapped[list[dict[str, int]]] = mapped_column(JSONB)
    """[{"after_seconds": 0, "min_level": 7}, {"after_seconds": 30, "min_level": 3}], ascending."""


class AgentProfile(Base):
    """An agent's routing profile: capacity per channel. One per user."""

    __tablename__ = "agent_profiles"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    capacity: Mapped[dict[str, int]] = mapped_column(JSONB)
    """{"voice": 1, "webchat": 3, "wechat": 3, "callback": 1}."""


class AgentSkill(Base):
    """An agent's level (1 to 10) in one skill."""

    __tablename__ = "agent_skills"
    __table_args__ = (
        CheckConstraint("level BETWEEN 1 AND 10", name="level"),
        ForeignKeyConstraint(
            ["tenant_id", "user_id"], ["agent_profiles.tenant_id", "agent_profiles.user_id"], ondelete="CASCADE"
        ),
        ForeignKeyConstraint(["tenant_id", "skill_id"], ["skills.tenant_id", "skills.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    skill_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger)


class WrapUpCode(TenantOwned, Base):
    """A disposition an agent records after an interaction."""

    __tablename__ = "wrap_up_codes"
    __table_args__ = (
        UniqueConstraint("tenant_id", "code"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    code: Mapped[str] = mapped_column(String(40))
    label: Mapped[str] = mapped_column(String(120))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class PauseReason(TenantOwned, Base):
    """Why an agent is away (`away:<code>`)."""

    __tablename__ = "pause_reasons"
    __table_args__ = (
        UniqueConstraint("tenant_id", "code"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    code: Mapped[str] = mapped_column(String(40))
    label: Mapped[str] = mapped_column(String(120))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class AgentState(Base):
    """An agent's current state: the durable copy routing rebuilds Redis from."""

    __tablename__ = "agent_states"
    __table_args__ = (
        CheckConstraint("state IN ('offline','available','away','busy','wrap_up')", name="state"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(40))
    since: Mapped[datetime] = mapped_column()
    voice_registered: Mapped[bool] = mapped_column(Boolean, default=False)
    """The agent's softphone is registered: they can take voice (reported by the voice channel)."""


class AgentStatePeriod(TenantOwned, Base):
    """One stretch of time an agent spent in a state: the source of time-in-state reports."""

    __tablename__ = "agent_state_periods"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
        Index("ix_agent_state_periods_user", "tenant_id", "user_id", "started_at"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column()
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(40))
    started_at: Mapped[datetime] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()


INTERACTION_EVENTS = (
    "created",
    "ivr_step",
    "queued",
    "offered",
    "offer_accepted",
    "offer_rejected",
    "offer_timed_out",
    "connected",
    "held",
    "resumed",
    "transferred",
    "overflowed",
    "callback_requested",
    "abandoned",
    "ended",
    "wrap_up_done",
)
CHANNELS = ("voice", "webchat", "wechat", "callback", "email", "sms")


DEFAULT_PRIORITY = 50
"""An interaction's priority until a queue gives it its own."""


class Interaction(TenantOwned, Base):
    """One customer contact on any channel, from creation to its end: the unit routing moves."""

    __tablename__ = "interactions"
    __table_args__ = (
        CheckConstraint(f"channel IN {CHANNELS!r}", name="channel"),
        CheckConstraint("state IN ('new','queued','offered','connected','wrap_up','ended')", name="state"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "queue_id"], ["queues.tenant_id", "queues.id"]),
        Index("ix_interactions_queue_state", "tenant_id", "queue_id", "state"),
        Index("ix_interactions_created", "tenant_id", "created_at", "id"),
        Index("ix_interactions_customer", "tenant_id", "customer_ref", "created_at"),
    )

    channel: Mapped[str] = mapped_column(String(16))
    queue_id: Mapped[uuid.UUID | None] = mapped_column()
    customer_ref: Mapped[str | None] = mapped_column(String(120))
    """The customer's id in the customer store (linked by that capability), or the channel's own address."""
    team_id: Mapped[uuid.UUID | None] = mapped_column()
    priority: Mapped[int] = mapped_column(SmallInteger, default=DEFAULT_PRIORITY)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="new")
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(24))
    """How it ended: handled, abandoned, overflowed, callback, closed, no_agents, cancelled."""
    queued_at: Mapped[datetime | None] = mapped_column()
    connected_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    last_seq: Mapped[int] = mapped_column(Integer, default=0)


class InteractionEvent(Base):
    """One step of an interaction's timeline; reports and billing read these."""

    __tablename__ = "interaction_events"
    __table_args__ = (
        CheckConstraint(f"name IN {INTERACTION_EVENTS!r}", name="name"),
        ForeignKeyConstraint(
            ["tenant_id", "interaction_id"], ["interactions.tenant_id", "interactions.id"], ondelete="CASCADE"
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    interaction_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(24))
    at: Mapped[datetime] = mapped_column()
    agent_id: Mapped[uuid.UUID | None] = mapped_column()
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)


class IvrFlow(TenantOwned, Base):
    """An IVR flow: a draft graph being edited, and the number of its current published version.

    Flows are archived, never deleted: calls in progress stay pinned to the version they started on.
    """

    __tablename__ = "ivr_flows"
    __table_args__ = (
        Index("uq_ivr_flows_live_name", "tenant_id", "name", unique=True, postgresql_where="archived_at IS NULL"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(String(300), default="")
    draft: Mapped[dict[str, Any]] = mapped_column(JSONB)
    """The graph being edited (validated on every save)."""
    draft_revision: Mapped[int] = mapped_column(Integer, default=1)
    published_version: Mapped[int | None] = mapped_column(Integer)
    """The version new calls start on; null until the first publication."""
    referenced_queues: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), default=list)
    """Queues the draft or the current version sends calls to (so a queue in use is not deleted)."""
    referenced_hours: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), default=list)
    referenced_prompts: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), default=list)
    referenced_agents: Mapped[list[uuid.UUID]] = mapped_column(ARRAY(UUID(as_uuid=True)), default=list)
    archived_at: Mapped[datetime | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class IvrFlowVersion(TenantOwned, Base):
    """A published, immutable version of a flow (the application role may insert and read, never change)."""

    __tablename__ = "ivr_flow_versions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "flow_id", "version"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "flow_id"], ["ivr_flows.tenant_id", "ivr_flows.id"], ondelete="CASCADE"),
    )

    flow_id: Mapped[uuid.UUID] = mapped_column()
    version: Mapped[int] = mapped_column(Integer)
    graph: Mapped[dict[str, Any]] = mapped_column(JSONB)
    published_by: Mapped[uuid.UUID | None] = mapped_column()
