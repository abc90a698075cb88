"""Login throttling in Redis: per account and per client address (ASVS 5.0 V6.3.1)."""

from __future__ import annotations

import hashlib
import uuid

from redis.asyncio import Redis

from backend.config import Settings
from backend.lib.problems import TooManyRequests
from backend.lib.redis_keys import global_key, tenant_key


def _account_key(tenant_id: uuid.UUID | None, email: str) -> str:
    hashed = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    if tenant_id is None:
        return global_key("loginfail", "provider", hashed)
    return tenant_key(tenant_id, "loginfail", hashed)


def _address_key(address: str) -> str:
    return global_key("loginfail", "addr", address)


class LoginThrottle:
    """Counts failed sign-ins in fixed windows and refuses further attempts with 429."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    async def check(self, tenant_id: uuid.UUID | None, email: str, address: str) -> None:
        """Raise 429 with Retry-After if this account or address has failed too often."""
        account, by_address = _account_key(tenant_id, email), _address_key(address)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(account)
            pipe.ttl(account)
            pipe.get(by_address)
            pipe.ttl(by_address)
            account_count, account_ttl, address_count, address_ttl = await pipe.execute()
        if address_count is not None and int(address_count) >= self._settings.login_failures_per_address:
            raise TooManyRequests("Too many failed sign-ins from this address", int(address_ttl))
        if account_count is not None and int(account_count) >= self._settings.login_failures_per_account:
            raise TooManyRequests("Too many failed sign-ins for this account", int(account_ttl))

    async def failed(self, tenant_id: uuid.UUID | None, email: str, address: str) -> None:
        """Count one failure against the account and the address."""
        account, by_address = _account_key(tenant_id, email), _address_key(address)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(account)
            pipe.expire(account, self._settings.login_account_window_seconds, nx=True)
            pipe.incr(by_address)
            pipe.expire(by_address, self._settings.login_address_window_seconds, nx=True)
            await pipe.execute()

    async def succeeded(self, tenant_id: uuid.UUID | None, email: str) -> None:
        """A successful sign-in clears the account's count (not the address's)."""
        await self._redis.delete(_account_key(tenant_id, email))
