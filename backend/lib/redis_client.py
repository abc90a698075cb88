"""The one way the backend opens Redis: decoded strings, and retries that ride out a Redis restart."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backend.config import get_settings

RETRIES = 3


def make_redis(url: str, *, decode_responses: bool = True, max_connections: int | None = None) -> Redis:
    """A client whose pooled connections reconnect after the server restarted, instead of failing the request,
    and whose pool grows to `CC_REDIS_MAX_CONNECTIONS` rather than redis-py's default of 100."""
    return Redis.from_url(
        url,
        decode_responses=decode_responses,
        max_connections=max_connections or get_settings().redis_max_connections,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), RETRIES),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
