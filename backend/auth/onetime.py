"""One-time secrets sent by e-mail: verification, invitation, password reset.

A token reads `<tenant id>.<secret>`: the tenant part lets us set the tenant
context before looking the secret up, so no lookup crosses tenants. Only the
secret's SHA-256 is stored; a token is used once and expires.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.crypto import digest, new_secret
from backend.auth.models import OneTimeToken
from backend.db.base import utcnow
from backend.db.tenancy import set_tenant
from backend.lib.problems import InvalidInput


def split_token(token: str, field: str = "token") -> tuple[uuid.UUID, str]:
    """The tenant id and the secret of a one-time token (or a refresh token, same shape)."""
    tenant_part, _, secret = token.partition(".")
    try:
        tenant_id = uuid.UUID(hex=tenant_part)
    except ValueError as exc:
        raise InvalidInput.field(field, "is not a valid token") from exc
    if not secret or len(secret) > 200:
        raise InvalidInput.field(field, "is not a valid token")
    return tenant_id, secret


async def issue(
    session: AsyncSession, *, tenant_id: uuid.UUID, user_id: uuid.UUID, purpose: str, ttl_seconds: int
) -> str:
    """A new token for `purpose`; earlier unused ones of the same purpose for the user stop working."""
    now = utcnow()
    await session.execute(
        update(OneTimeToken)
        .where(OneTimeToken.user_id == user_id, OneTimeToken.purpose == purpose, OneTimeToken.used_at.is_(None))
        .values(used_at=now)
    )
    secret = new_secret()
    session.add(
        OneTimeToken(
            tenant_id=tenant_id,
            user_id=user_id,
            purpose=purpose,
            token_hash=digest(secret),
            expires_at=now + timedelta(seconds=ttl_seconds),
        )
    )
    return f"{tenant_id.hex}.{secret}"


async def redeem(session: AsyncSession, token: str, purpose: str) -> tuple[uuid.UUID, uuid.UUID]:
    """Use a token once: sets the tenant context and returns (tenant id, user id)."""
    tenant_id, secret = split_token(token)
    await set_tenant(session, tenant_id)
    row = await session.scalar(
        select(OneTimeToken)
        .where(OneTimeToken.token_hash == digest(secret), OneTimeToken.purpose == purpose)
        .with_for_update()
    )
    if row is None or row.used_at is not None or row.expires_at <= utcnow():
        raise InvalidInput.field("token", "is invalid, used or expired")
    row.used_at = utcnow()
    return tenant_id, row.user_id
