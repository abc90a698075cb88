"""The one way the backend opens Redis: decoded strings, and retries that ride out a Redis restart."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

RETRIES = 3


def make_redis(
    url: str,
    *,
    decode_responses: bool = True,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
) -> Redis:
    """A client whose pooled connections reconnect after the server restarted, instead of failing the request.

    The pool is bounded (`CC_REDIS_MAX_CONNECTIONS`) and a command waits for a free connection (up to
    `CC_REDIS_POOL_TIMEOUT` seconds) instead of failing at once: redis-py's default pool raises "Too many
    connections" past 100, which under load (hundreds of calls in one call-control process) failed calls.
    """
    if max_connections is None or pool_timeout is None:
        from backend.config import get_settings

        settings = get_settings()
        max_connections = max_connections or settings.redis_max_connections
        pool_timeout = pool_timeout if pool_timeout is not None else settings.redis_pool_timeout_seconds
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        decode_responses=decode_responses,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return Redis.from_pool(pool)
