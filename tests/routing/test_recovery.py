"""Recovery: the test Redis server is really stopped and started without its data; routing comes back from PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.routing.test_engine import _available, _create

pytestmark = pytest.mark.integration


def _restart_redis_without_data() -> None:
    directory = os.environ.get("CC_TEST_REDIS_DIR")
    if not directory:
        raise RuntimeError("CC_TEST_REDIS_DIR is not set: run the tests with `bash scripts/test.sh`")
    port = str(urlsplit(os.environ["REDIS_URL"]).port)
    subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], check=False, capture_output=True)
    for _ in range(100):
        if subprocess.run(["redis-cli", "-p", port, "ping"], check=False, capture_output=True).returncode != 0:
            break
    shutil.rmtree(Path(directory) / "appendonlydir", ignore_errors=True)
    subprocess.run(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            port,
            "--dir",
            directory,
            "--daemonize",
            "yes",
            "--pidfile",
            f"{directory}/redis.pid",
            "--logfile",
            f"{directory}/redis.log",
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        check=True,
    )


async def _until_redis_answers(*clients) -> None:
    for _ in range(100):
        try:
            for client in clients:
                await client.ping()
            return
        except Exception:
            await asyncio.sleep(0.05)
    raise RuntimeError("Redis did not come back")


async def test_restart_loses_nothing_and_offers_nothing_twice(client, factory, app, redis):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    agent = await _available(client, factory, ctx, capacity={"webchat": 1})
    away = await _available(client, factory, ctx, capacity={"webchat": 1})
    with_agent = await _create(client, ctx, queue)
    await client.post(f"/api/v1/interactions/{with_agent['id']}/accept", headers=agent["headers"])
    offered = await _create(client, ctx, queue)
    assert offered["agent_id"] == str(away["id"])
    waiting = [await _create(client, ctx, queue) for _ in range(3)]
    matcher = app.state.routing.matcher
    order = await matcher.waiting(ctx.tenant_id, uuid.UUID(str(queue)))

    _restart_redis_without_data()
    await _until_redis_answers(redis, app.state.redis)
    assert await matcher.waiting(ctx.tenant_id, uuid.UUID(str(queue))) == []

    restored = await app.state.routing.ensure_state()
    assert restored >= 5
    assert await app.state.routing.ensure_state() == 0  # once is enough
    # The open offer was lost with Redis: it is back in line at its old place (first), then offered again.
    after = await matcher.waiting(ctx.tenant_id, uuid.UUID(str(queue)))
    detail = (await client.get(f"/api/v1/interactions/{offered['id']}", headers=ctx.headers)).json()
    assert detail["state"] == "offered"
    assert after == order
    assert after == [uuid.UUID(w["id"]) for w in waiting]
    # The connected chat still uses the agent's capacity: nothing was offered to them twice.
    assert await matcher.load(ctx.tenant_id, agent["id"]) == {"webchat": 1}
    assert await matcher.load(ctx.tenant_id, away["id"]) == {"webchat": 1}
    states = [
        (await client.get("/api/v1/routing/me/state", headers=a["headers"])).json()["state"] for a in (agent, away)
    ]
    assert states == ["busy", "available"]
    # The timeline shows what happened to the lost offer.
    assert "offer_timed_out" in [e["name"] for e in detail["timeline"]]
