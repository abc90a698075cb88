"""Tables of the auth domain: one-time tokens, refresh tokens, API keys, SSO settings."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, ForeignKeyConstraint, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from backend.db.base import Base, TenantOwned


class OneTimeToken(TenantOwned, Base):
    """An e-mailed link's secret (verification, invitation, password reset), stored hashed."""

    __tablename__ = "one_time_tokens"
    __table_args__ = (
        UniqueConstraint("tenant_id", "token_hash"),
        CheckConstraint("purpose IN ('verify_email','invite','password_reset')", name="purpose"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    user_id: Mapped[uuid.UUID] = mapped_column()
    purpose: Mapped[str] = mapped_column(String(20))
    token_hash: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()


class RefreshToken(TenantOwned, Base):
    """One link of a session's rotating refresh-token chain ("family"), stored hashed."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (
        UniqueConstraint("tenant_id", "token_hash"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    family_id: Mapped[uuid.UUID] = mapped_column(index=True)
    user_id: Mapped[uuid.UUID] = mapped_column()
    token_hash: Mapped[str] = mapped_column(String(64))
    session_started_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class ApiKey(TenantOwned, Base):
    """A scoped key for machine clients: shown once, stored hashed, prefix visible."""

    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("tenant_id", "prefix"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "created_by"], ["users.tenant_id", "users.id"], ondelete="CASCADE"),
    )

    name: Mapped[str] = mapped_column(String(120))
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(String(60)))
    created_by: Mapped[uuid.UUID] = mapped_column()
    """The key acts for this user and dies with their rights."""
    last_used_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    expires_at: Mapped[datetime | None] = mapped_column()


class SsoConfig(TenantOwned, Base):
    """A tenant's OpenID Connect identity provider."""

    __tablename__ = "sso_configs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "issuer"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    issuer: Mapped[str] = mapped_column(String(500))
    client_id: Mapped[str] = mapped_column(String(300))
    client_secret: Mapped[str] = mapped_column(Text)
    """Encrypted with the application key."""
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    auto_provision: Mapped[bool] = mapped_column(Boolean, default=False)
    """Create unknown users on first sign-in (with the `agent` role) rather than refuse them."""
