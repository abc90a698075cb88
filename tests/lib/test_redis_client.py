"""The backend's Redis client: a bounded pool whose commands wait for a free connection under load."""

from __future__ import annotations

import asyncio
import os

import pytest

from backend.lib.redis_client import make_redis

pytestmark = pytest.mark.integration


async def test_more_concurrent_commands_than_connections_wait_for_one_instead_of_failing(redis):
    # redis-py's default pool refuses past 100 connections ("Too many connections"): a call-control
    # process with hundreds of calls failed some of them. Ours waits for a connection to be free.
    client = make_redis(os.environ["REDIS_URL"], max_connections=2, pool_timeout=10)
    try:
        results = await asyncio.gather(*(client.incr("test:redis-client:waits") for _ in range(50)))
        assert sorted(results)[-1] - sorted(results)[0] == 49
        pool = client.connection_pool
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 2
    finally:
        await client.delete("test:redis-client:waits")
        await client.aclose()


async def test_a_command_that_waits_too_long_for_a_connection_fails_with_a_connection_error(redis):
    from redis.exceptions import ConnectionError as RedisConnectionError

    client = make_redis(os.environ["REDIS_URL"], max_connections=1, pool_timeout=0.05)
    try:
        blocked = asyncio.create_task(client.blpop(["test:redis-client:never"], timeout=1))
        await asyncio.sleep(0.1)
        with pytest.raises(RedisConnectionError):
            await client.get("test:redis-client:other")
        await blocked
    finally:
        await client.aclose()
