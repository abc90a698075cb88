"""The request's database transaction, scoped to the caller's tenant, and after-commit hooks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.db.tenancy import set_tenant

AFTER_COMMIT = "after_commit"


def after_commit(session: AsyncSession, callback: Callable[[], Awaitable[Any]]) -> None:
    """Run `callback` once the request's transaction has committed (cache invalidation, pub/sub)."""
    session.info.setdefault(AFTER_COMMIT, []).append(callback)


async def run_after_commit(session: AsyncSession) -> None:
    """Run and clear the callbacks registered with `after_commit`."""
    callbacks = session.info.pop(AFTER_COMMIT, [])
    for callback in callbacks:
        await callback()


async def provide_db_session(request: Request[Any, Any, Any]) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed before the response is sent.

    For a tenant caller the transaction is scoped with `SET LOCAL app.tenant_id`,
    so row-level security shows it nothing of any other tenant.
    """
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    principal = request.scope.get("user")
    async with sessionmaker() as session:
        async with session.begin():
            if isinstance(principal, Principal) and principal.tenant_id is not None and principal.kind != "provider":
                await set_tenant(session, principal.tenant_id)
            yield session
        await run_after_commit(session)
