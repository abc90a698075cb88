"""Test set-up: a private database on the real PostgreSQL, the real Redis, the app and its clients.

The test command (scripts/test.sh) starts PostgreSQL and Redis and exports how
to reach them. Each test run (and each xdist worker) gets a fresh database
created by the superuser, migrated by the owner role, and used by the
application role, exactly as in production.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from litestar import Litestar
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tests.factories import Factory


def _require(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run the tests with `bash scripts/test.sh`")
    return value


@pytest.fixture(scope="session")
def database_name() -> Iterator[str]:
    """Create a fresh database for this run and drop it afterwards."""
    superuser = _require("CC_TEST_PG_SUPERUSER_DSN")
    hostport = _require("CC_TEST_PG_HOSTPORT")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"cc_test_{worker}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(superuser)
        try:
            await connection.execute(f'CREATE DATABASE "{name}" OWNER cc_owner')
        finally:
            await connection.close()
        connection = await asyncpg.connect(superuser.replace("/postgres?", f"/{name}?"))
        try:
            await connection.execute(
                f"""
                REVOKE ALL ON SCHEMA public FROM PUBLIC;
                ALTER SCHEMA public OWNER TO cc_owner;
                GRANT USAGE ON SCHEMA public TO cc_app;
                GRANT CONNECT ON DATABASE "{name}" TO cc_app;
                CREATE EXTENSION IF NOT EXISTS citext;
                CREATE EXTENSION IF NOT EXISTS pg_trgm;
                """
            )
        finally:
            await connection.close()

    async def drop() -> None:
        connection = await asyncpg.connect(superuser)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    asyncio.run(create())
    os.environ["DATABASE_URL"] = f"postgresql+asyncpg://cc_app:cc_app@{hostport}/{name}"
    os.environ["DATABASE_OWNER_URL"] = f"postgresql+asyncpg://cc_owner:cc_owner@{hostport}/{name}"
    os.environ["CC_ENV"] = "test"
    os.environ["CC_LOG_JSON"] = "0"
    os.environ["CC_LOG_LEVEL"] = "WARNING"
    os.environ.setdefault("CC_DB_POOL_SIZE", "30")
    # Deadlines shortened by settings, never waited out.
    os.environ.setdefault("CC_AGENT_DISCONNECT_GRACE", "0.5")
    # Prompts, recordings and voicemail of this run, in a folder of its own.
    os.environ.setdefault("CC_MEDIA_LOCAL_ROOT", tempfile.mkdtemp(prefix="cc-media-"))
    from backend.config import get_settings
    from backend.db.migrate import upgrade

    get_settings.cache_clear()
    upgrade()
    yield name
    asyncio.run(drop())


@pytest.fixture(scope="session")
async def redis(database_name: str) -> AsyncIterator[Redis]:
    """The real Redis, emptied at the start of the run."""
    from backend.lib.redis_client import make_redis

    client = make_redis(_require("REDIS_URL"))
    await client.flushdb()
    # A fresh database has no routing state to rebuild: mark Redis as complete, as the first rebuild would.
    from backend.routing.matcher import STATE_MARKER

    await client.set(STATE_MARKER, "test")
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def app(database_name: str, redis: Redis) -> AsyncIterator[Litestar]:
    """The application, built from the test settings."""
    from backend.app import create_app

    application = create_app()
    await application.state.hub.start()
    yield application
    await application.state.hub.stop()
    await application.state.redis.aclose()
    await application.state.engine.dispose()


@pytest.fixture(scope="session")
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process HTTP client for the application, in the test's event loop."""
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield http


@pytest.fixture(scope="session")
def engine(app: Litestar) -> AsyncEngine:
    """The application role's engine."""
    engine: AsyncEngine = app.state.engine
    return engine


@pytest.fixture(scope="session")
def sessionmaker(app: Litestar) -> async_sessionmaker[AsyncSession]:
    """Sessions as the application role."""
    maker: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    return maker


@pytest.fixture(scope="session")
def factory(app: Litestar, client: httpx.AsyncClient) -> Factory:
    """Builds tenants, users, teams, seats and tokens through the real services and routes."""
    return Factory(app, client)


@pytest.fixture(scope="session")
def settings_obj(app: Litestar):
    """The settings the application was built with."""
    return app.state.settings
