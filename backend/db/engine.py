"""Async engine and session factory for the application role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from backend.config import Settings
from backend.db.tenancy import set_tenant


def make_engine(settings: Settings, url: str | None = None) -> AsyncEngine:
    """An engine for the application role (or `url`), with a bounded pool."""
    return create_async_engine(
        url or settings.database_url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_max_overflow,
        pool_pre_ping=False,
        pool_recycle=1800,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (responses are built after it)."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


@asynccontextmanager
async def tenant_transaction(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID | None
) -> AsyncIterator[AsyncSession]:
    """One transaction, scoped to `tenant_id` (or to no tenant, which sees no tenant rows)."""
    async with sessionmaker() as session, session.begin():
        if tenant_id is not None:
            await set_tenant(session, tenant_id)
        yield session


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A pooled connection's asyncpg connection, outside any transaction: each statement commits on its own.

    For the hottest reads and writes, made by one call of a SQL function that sets the tenant itself
    (`customer_screen_pop`, `seat_by_sip_address`, `record_offers`): this skips the BEGIN, `set_config` and
    COMMIT round trips and the ORM's per-request cost. A plain SELECT of tenant rows here sees nothing, since
    no tenant is set outside such a function.
    """
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        try:
            yield raw.driver_connection
        except BaseException:
            # After an error or a cancellation in the middle of a statement, the connection's state is not worth
            # trusting: the pool gets a fresh one instead.
            await connection.invalidate()
            raise


async def session_driver(session: AsyncSession) -> Any:
    """The asyncpg connection under the session's transaction (begun already): a SQL function called on it takes
    part in that transaction, and in the row locks it holds."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    return raw.driver_connection
