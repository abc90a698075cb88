"""Async engine and session factory for the application role."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


def make_lookup_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions without a transaction: each statement commits alone, so a lookup is one round trip.

    Only for reads that need no atomicity across statements (the switch's directory, asked on every
    REGISTER); the pool is the engine's, the isolation level is put back when a connection returns.
    """
    return async_sessionmaker(
        engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False, autoflush=False
    )


@asynccontextmanager
async def tenant_transaction(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID | None
) -> AsyncIterator[AsyncSession]:
    """One transaction, scoped to `tenant_id` (or to no tenant, which sees no tenant rows)."""
    async with sessionmaker() as session, session.begin():
        if tenant_id is not None:
            await set_tenant(session, tenant_id)
        yield session
