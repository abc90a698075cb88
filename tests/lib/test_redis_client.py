"""The one Redis client: its pool grows past redis-py's default of 100 connections in flight."""

from __future__ import annotations

import asyncio
import os

import pytest

from backend.lib.redis_client import make_redis
from tests.factories import unique

pytestmark = pytest.mark.integration


async def test_more_than_a_hundred_blocking_reads_at_once_are_served():
    """Call control with hundreds of live calls keeps many blocking reads in flight: none is refused."""
    client = make_redis(os.environ["REDIS_URL"])
    key = unique("test:blocking-")
    try:
        waits = [asyncio.create_task(client.blpop([f"{key}:{n}"], timeout=1)) for n in range(150)]
        await asyncio.sleep(0.2)
        await asyncio.gather(*(client.rpush(f"{key}:{n}", "x") for n in range(150)))
        answers = await asyncio.gather(*waits)
        assert all(answer is not None and answer[1] == "x" for answer in answers)
    finally:
        await client.aclose()


def test_the_limit_is_a_setting():
    client = make_redis("redis://127.0.0.1:1/0", max_connections=7)
    assert client.connection_pool.max_connections == 7
    assert make_redis("redis://127.0.0.1:1/0").connection_pool.max_connections >= 1000
