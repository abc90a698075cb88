"""Whether a token still stands: tenant status, user revocation and ended sessions, cached in Redis.

PostgreSQL is the truth (tenants.status, users.status, users.tokens_revoked_at,
refresh_tokens.revoked_at); Redis holds a short-lived copy read on every request,
so a revocation takes effect at once and survives a Redis flush.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.redis_keys import REVOCATION_CHANNEL, tenant_key
from backend.tenants.models import Tenant, User

_CACHE_SECONDS = 300


@dataclass(frozen=True, slots=True)
class Standing:
    """What the request path needs to know about a caller's tenant and user."""

    tenant_status: str
    user_active: bool
    revoked_after_ms: int


def _tenant_status_key(tenant_id: uuid.UUID) -> str:
    return tenant_key(tenant_id, "tenant", "status")


def _user_key(tenant_id: uuid.UUID, user_id: uuid.UUID) -> str:
    return tenant_key(tenant_id, "auth", "user", str(user_id))


def _session_key(tenant_id: uuid.UUID, session_id: uuid.UUID) -> str:
    return tenant_key(tenant_id, "auth", "session", str(session_id))


class Revocations:
    """Reads and writes the revocation state of tenants, users and sessions."""

    def __init__(self, redis: Redis, sessionmaker: async_sessionmaker[AsyncSession], access_token_ttl: int) -> None:
        self._redis = redis
        self._sessionmaker = sessionmaker
        self._session_ttl = access_token_ttl + 60

    async def standing(self, tenant_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID | None) -> Standing | None:
        """The caller's standing, or None when their session has ended. One Redis round trip when warm."""
        keys = [_tenant_status_key(tenant_id), _user_key(tenant_id, user_id)]
        if session_id is not None:
            keys.append(_session_key(tenant_id, session_id))
        values = await self._redis.mget(keys)
        if session_id is not None and values[2] is not None:
            return None
        if values[0] is None or values[1] is None:
            return await self._load(tenant_id, user_id)
        status, revoked = str(values[1]).split(":", 1)
        return Standing(str(values[0]), status == "active", int(revoked))

    async def _load(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Standing | None:
        async with tenant_transaction(self._sessionmaker, tenant_id) as session:
            row = (
                await session.execute(
                    select(Tenant.status, User.status, User.tokens_revoked_at)
                    .join(User, User.tenant_id == Tenant.id)
                    .where(Tenant.id == tenant_id, User.id == user_id)
                )
            ).first()
        if row is None:
            return None
        tenant_status, user_status, revoked_at = row
        revoked_ms = int(revoked_at.timestamp() * 1000) if revoked_at else 0
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(_tenant_status_key(tenant_id), tenant_status, ex=_CACHE_SECONDS)
            pipe.set(_user_key(tenant_id, user_id), f"{user_status}:{revoked_ms}", ex=_CACHE_SECONDS)
            await pipe.execute()
        return Standing(tenant_status, user_status == "active", revoked_ms)

    async def tenant_status(self, tenant_id: uuid.UUID) -> str | None:
        """The tenant's status (trial, active, suspended), cached."""
        cached = await self._redis.get(_tenant_status_key(tenant_id))
        if cached is not None:
            return str(cached)
        async with self._sessionmaker() as session:
            status = await session.scalar(select(Tenant.status).where(Tenant.id == tenant_id))
        if status is not None:
            await self._redis.set(_tenant_status_key(tenant_id), status, ex=_CACHE_SECONDS)
        return status

    async def forget_tenant(self, tenant_id: uuid.UUID) -> None:
        """Drop the cached status after it changed in PostgreSQL."""
        await self._redis.delete(_tenant_status_key(tenant_id))

    async def revoke_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """After the database recorded the revocation: refuse the user's older tokens now, and tell every process."""
        await self._redis.delete(_user_key(tenant_id, user_id))
        await self._announce(tenant_id, user_id=user_id)

    async def end_session(self, tenant_id: uuid.UUID, user_id: uuid.UUID, session_id: uuid.UUID) -> None:
        """Refuse the access tokens of one session (logout, refresh-token reuse)."""
        await self._redis.set(_session_key(tenant_id, session_id), "1", ex=self._session_ttl)
        await self._announce(tenant_id, user_id=user_id, session_id=session_id)

    async def _announce(self, tenant_id: uuid.UUID, *, user_id: uuid.UUID, session_id: uuid.UUID | None = None) -> None:
        message = {
            "tenant_id": str(tenant_id),
            "user_id": str(user_id),
            "at_ms": int(utcnow().timestamp() * 1000),
        }
        if session_id is not None:
            message["session_id"] = str(session_id)
        await self._redis.publish(REVOCATION_CHANNEL, json.dumps(message))
