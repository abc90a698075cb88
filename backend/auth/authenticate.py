"""Turns the credentials on a request into a `Principal`: JWTs, API keys, WebSocket tickets, switch secrets."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.crypto import digest, new_secret, same
from backend.auth.models import ApiKey
from backend.auth.principal import Principal
from backend.auth.revocation import Revocations
from backend.auth.tokens import InvalidToken, TokenSigner
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.problems import Unauthenticated
from backend.lib.redis_keys import global_key
from backend.tenants import service as tenants

API_KEY_PREFIX = "cck_"
_API_KEY_CACHE_SECONDS = 60


def api_key_cache_key(prefix: str) -> str:
    """Where a verified API key's facts are cached."""
    return global_key("apikey", prefix)


def ws_ticket_key(ticket: str) -> str:
    """Where a WebSocket ticket waits to be redeemed."""
    return global_key("wsticket", digest(ticket))


class Authenticator:
    """Verifies credentials; every check that can fail answers 401 with a reason."""

    def __init__(
        self,
        settings: Settings,
        signer: TokenSigner,
        revocations: Revocations,
        redis: Redis,
        sessionmaker: async_sessionmaker[AsyncSession],
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.revocations = revocations
        self.redis = redis
        self.sessionmaker = sessionmaker

    async def tenant_bearer(self, token: str) -> Principal:
        """A tenant user's access token or a tenant API key."""
        if token.startswith(API_KEY_PREFIX):
            return await self.api_key(token)
        try:
            claims = self.signer.verify(token)
        except InvalidToken as exc:
            raise Unauthenticated("The access token is invalid or expired") from exc
        if claims.audience != "tenant" or claims.tenant_id is None:
            raise Unauthenticated("Not a tenant access token")
        standing = await self.revocations.standing(claims.tenant_id, claims.subject, claims.session_id)
        if standing is None:
            raise Unauthenticated("The session has ended")
        if not standing.user_active or claims.issued_at_ms <= standing.revoked_after_ms:
            raise Unauthenticated("The access token has been revoked")
        return Principal(
            kind="user",
            tenant_id=claims.tenant_id,
            user_id=claims.subject,
            permissions=claims.permissions,
            session_id=claims.session_id,
            tenant_status=standing.tenant_status,
            issued_at_ms=claims.issued_at_ms,
            mfa_pending=claims.mfa_pending,
        )

    async def provider_bearer(self, token: str) -> Principal:
        """A provider operator's access token."""
        try:
            claims = self.signer.verify(token)
        except InvalidToken as exc:
            raise Unauthenticated("The access token is invalid or expired") from exc
        if claims.audience != "provider":
            raise Unauthenticated("Not a provider access token")
        return Principal(kind="provider", tenant_id=None, user_id=claims.subject, permissions=claims.permissions)

    async def api_key(self, key: str) -> Principal:
        """A tenant API key `cck_<prefix>_<secret>`: its scopes, capped by its creator's current rights."""
        prefix, _, secret = key.removeprefix(API_KEY_PREFIX).partition("_")
        if not prefix or not secret or len(key) > 200:
            raise Unauthenticated("The API key is malformed")
        cached = await self.redis.get(api_key_cache_key(prefix))
        facts: dict[str, Any] | None = json.loads(cached) if cached else await self._load_api_key(prefix)
        if facts is None or not same(facts["hash"], digest(secret)):
            raise Unauthenticated("The API key is invalid or revoked")
        if facts["expires_at"] and datetime.fromisoformat(facts["expires_at"]) <= utcnow():
            raise Unauthenticated("The API key has expired")
        tenant_id, creator = uuid.UUID(facts["tenant_id"]), uuid.UUID(facts["created_by"])
        standing = await self.revocations.standing(tenant_id, creator, None)
        if standing is None or not standing.user_active:
            raise Unauthenticated("The API key is invalid or revoked")
        if not cached:
            await self.redis.set(api_key_cache_key(prefix), json.dumps(facts), ex=_API_KEY_CACHE_SECONDS)
        await self._touch(tenant_id, uuid.UUID(facts["id"]), prefix)
        return Principal(
            kind="api_key",
            tenant_id=tenant_id,
            user_id=creator,
            permissions=frozenset(facts["permissions"]),
            api_key_id=uuid.UUID(facts["id"]),
            tenant_status=standing.tenant_status,
            issued_at_ms=int(time.time() * 1000),
        )

    async def _load_api_key(self, prefix: str) -> dict[str, Any] | None:
        async with self.sessionmaker() as session, session.begin():
            # The audited cross-tenant path: a SECURITY DEFINER function that returns only the tenant id.
            tenant_id = await session.scalar(text("SELECT xt_api_key_tenant(:p)"), {"p": prefix})
        if tenant_id is None:
            return None
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            key = await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
            if key is None:
                return None
            found = await tenants.user_permissions(session, key.created_by)
        if found is None:
            return None
        _, creator_permissions = found
        return {
            "id": str(key.id),
            "tenant_id": str(tenant_id),
            "created_by": str(key.created_by),
            "hash": key.secret_hash,
            "permissions": sorted(set(key.scopes) & creator_permissions),
            "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        }

    async def _touch(self, tenant_id: uuid.UUID, key_id: uuid.UUID, prefix: str) -> None:
        # Record the last use at most once per interval, not on every request.
        if await self.redis.set(
            global_key("apikey", prefix, "touched"),
            "1",
            nx=True,
            ex=self.settings.api_key_touch_interval_seconds,
        ):
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))

    async def forget_api_key(self, prefix: str) -> None:
        """Drop a key's cached facts (after revocation)."""
        await self.redis.delete(api_key_cache_key(prefix))

    async def issue_ws_ticket(self, principal: Principal) -> str:
        """A single-use ticket for opening a WebSocket (browsers cannot set headers on one)."""
        ticket = new_secret(24)
        payload = {
            "kind": principal.kind,
            "tenant_id": str(principal.tenant_id),
            "user_id": str(principal.user_id),
            "session_id": str(principal.session_id) if principal.session_id else None,
            "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
            "permissions": sorted(principal.permissions),
            "issued_at_ms": principal.issued_at_ms,
        }
        await self.redis.set(ws_ticket_key(ticket), json.dumps(payload), ex=self.settings.ws_ticket_ttl_seconds)
        return ticket

    async def redeem_ws_ticket(self, ticket: str) -> Principal:
        """The principal a ticket was issued to; the ticket is consumed."""
        raw = await self.redis.getdel(ws_ticket_key(ticket))
        if raw is None:
            raise Unauthenticated("The WebSocket ticket is invalid, used or expired")
        data = json.loads(raw)
        tenant_id, user_id = uuid.UUID(data["tenant_id"]), uuid.UUID(data["user_id"])
        session_id = uuid.UUID(data["session_id"]) if data["session_id"] else None
        principal = Principal(
            kind=data["kind"],
            tenant_id=tenant_id,
            user_id=user_id,
            permissions=frozenset(data["permissions"]),
            session_id=session_id,
            api_key_id=uuid.UUID(data["api_key_id"]) if data["api_key_id"] else None,
            issued_at_ms=int(data["issued_at_ms"]),
        )
        return await self.recheck(principal)

    async def recheck(self, principal: Principal) -> Principal:
        """Whether a long-lived connection's principal still stands; 401 if revoked since."""
        assert principal.tenant_id is not None and principal.user_id is not None
        standing = await self.revocations.standing(principal.tenant_id, principal.user_id, principal.session_id)
        if standing is None or not standing.user_active or principal.issued_at_ms <= standing.revoked_after_ms:
            raise Unauthenticated("The credentials have been revoked")
        if principal.api_key_id is not None:
            async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
                revoked = await session.scalar(select(ApiKey.revoked_at).where(ApiKey.id == principal.api_key_id))
            if revoked is not None:
                raise Unauthenticated("The API key has been revoked")
        return Principal(
            kind=principal.kind,
            tenant_id=principal.tenant_id,
            user_id=principal.user_id,
            permissions=principal.permissions,
            session_id=principal.session_id,
            api_key_id=principal.api_key_id,
            tenant_status=standing.tenant_status,
            issued_at_ms=principal.issued_at_ms,
        )

    def switch_secret_ok(self, presented: str | None) -> bool:
        """Whether a switch node presented the shared secret."""
        return presented is not None and same(presented, self.settings.switch_shared_secret)
