"""Revoking a user's standing credentials in the database: refresh-token families and API keys."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.models import ApiKey, RefreshToken
from backend.db.base import utcnow


@dataclass(frozen=True, slots=True)
class RevokedCredentials:
    """What was revoked, so caches can be told once the transaction commits."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    api_key_prefixes: list[str] = field(default_factory=list)


async def revoke_user_credentials(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID
) -> RevokedCredentials:
    """End every session and revoke every API key of the user, in the caller's transaction."""
    now = utcnow()
    await session.execute(
        update(RefreshToken)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    prefixes = (
        await session.scalars(
            update(ApiKey)
            .where(ApiKey.created_by == user_id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(ApiKey.prefix)
        )
    ).all()
    return RevokedCredentials(tenant_id, user_id, list(prefixes))
