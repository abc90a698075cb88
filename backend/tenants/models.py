"""Tables of the tenants domain."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import ARRAY, CITEXT, INET, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.db.base import Base, GlobalRow, TenantOwned


class Plan(GlobalRow, Base):
    """A provider-defined offer: how many seats, which features."""

    __tablename__ = "plans"

    code: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(120))
    seat_cap: Mapped[int] = mapped_column(Integer)
    features: Mapped[list[str]] = mapped_column(ARRAY(String(60)), default=list)
    public: Mapped[bool] = mapped_column(Boolean, default=True)
    """Offered at self-service signup."""
    outbound_call_cap: Mapped[int | None] = mapped_column(Integer)
    """Concurrent outbound calls a tenant on this plan may have; null: `CC_OUTBOUND_CONCURRENT_CALLS`."""


class Tenant(GlobalRow, Base):
    """A company leasing contact-center capacity. Global: found by slug and SIP domain."""

    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("status IN ('trial','active','suspended')", name="status"),)

    slug: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="trial")
    plan_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("plans.id"))
    time_zone: Mapped[str] = mapped_column(String(64))
    sip_domain: Mapped[str] = mapped_column(String(255), unique=True)
    require_mfa: Mapped[bool] = mapped_column(Boolean, default=False)
    status_reason: Mapped[str | None] = mapped_column(Text)


class ProviderUser(GlobalRow, Base):
    """A member of the provider's operations staff; belongs to no tenant."""

    __tablename__ = "provider_users"

    email: Mapped[str] = mapped_column(CITEXT, unique=True)
    name: Mapped[str] = mapped_column(String(200))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class ProviderAuditEntry(GlobalRow, Base):
    """What a provider operator did, to which tenant."""

    __tablename__ = "provider_audit_log"

    provider_user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("provider_users.id"))
    action: Mapped[str] = mapped_column(String(80))
    target_tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id"))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)


class Role(TenantOwned, Base):
    """A named set of `resource:action` permissions; built-in or custom to the tenant."""

    __tablename__ = "roles"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(60))
    description: Mapped[str] = mapped_column(String(300), default="")
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)
    permissions: Mapped[list[str]] = mapped_column(ARRAY(String(60)), default=list)


class User(TenantOwned, Base):
    """A person who signs in to one tenant's workspace."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("tenant_id", "email"),
        CheckConstraint("status IN ('invited','active','disabled')", name="status"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "role_id"], ["roles.tenant_id", "roles.id"]),
    )

    email: Mapped[str] = mapped_column(CITEXT)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="active")
    role_id: Mapped[uuid.UUID] = mapped_column()
    password_hash: Mapped[str | None] = mapped_column(Text)
    email_verified_at: Mapped[datetime | None] = mapped_column()
    totp_secret: Mapped[str | None] = mapped_column(Text)
    """Encrypted with the application key; set while enrolling, trusted once `totp_enabled`."""
    totp_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    totp_last_step: Mapped[int | None] = mapped_column(Integer)
    """The last accepted TOTP time step: a code is never accepted twice (ASVS V6.5.1)."""
    password_changed_at: Mapped[datetime | None] = mapped_column()
    tokens_revoked_at: Mapped[datetime | None] = mapped_column()
    """Access tokens issued before this instant are refused (role change, deactivation)."""


class Team(TenantOwned, Base):
    """A business unit that groups users; routing, customers and reports use it."""

    __tablename__ = "teams"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(120))
    description: Mapped[str] = mapped_column(String(300), default="")


class TeamMember(Base):
    """A user's membership of a team."""

    __tablename__ = "team_members"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "team_id"], ["teams.tenant_id", "teams.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    team_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)


class Seat(TenantOwned, Base):
    """An agent licence bound to a user, with SIP credentials in the tenant's domain."""

    __tablename__ = "seats"
    __table_args__ = (
        UniqueConstraint("tenant_id", "user_id"),
        UniqueConstraint("tenant_id", "sip_username"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column()
    sip_username: Mapped[str] = mapped_column(String(64))
    sip_a1_hash: Mapped[str] = mapped_column(String(32))
    """md5(user:domain:password), FreeSWITCH's `a1-hash`; the password itself is never stored."""
    credentials_rotated_at: Mapped[datetime | None] = mapped_column()


class AuditEntry(TenantOwned, Base):
    """One recorded change or sign-in inside a tenant."""

    __tablename__ = "audit_log"
    __table_args__ = (ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),)

    actor_type: Mapped[str] = mapped_column(String(16))
    """`user`, `api_key`, `provider`, `system` or `anonymous`."""
    actor_id: Mapped[uuid.UUID | None] = mapped_column()
    action: Mapped[str] = mapped_column(String(80))
    target_type: Mapped[str] = mapped_column(String(40))
    target_id: Mapped[str | None] = mapped_column(String(80))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    ip: Mapped[str | None] = mapped_column(INET)
    request_id: Mapped[str | None] = mapped_column(String(64))


class OutboxMail(TenantOwned, Base):
    """An e-mail waiting to be sent; in development the outbox and the log are the mail server."""

    __tablename__ = "mail_outbox"
    __table_args__ = (ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),)

    to_address: Mapped[str] = mapped_column(CITEXT)
    subject: Mapped[str] = mapped_column(String(300))
    body: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(40))
    sent_at: Mapped[datetime | None] = mapped_column()
