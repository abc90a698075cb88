"""The audit logs: the tenant's (who changed what, with before and after) and the provider's (what operators did)."""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

import structlog
from sqlalchemy import case, cast, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.lib.context import client_ip_var, request_id_var
from backend.tenants.models import AuditEntry, ProviderAuditEntry

log = structlog.get_logger("audit")


def _ip() -> str | None:
    value = client_ip_var.get()
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


async def record(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    actor_type: str,
    actor_id: uuid.UUID | None,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Add one audit entry to the current transaction, so it lands with the change or not at all."""
    entry = AuditEntry(
        tenant_id=tenant_id,
        actor_type=actor_type,
        actor_id=actor_id,
        action=action,
        target_type=target_type,
        target_id=str(target_id) if target_id is not None else None,
        before=before,
        after=after,
        ip=_ip(),
        request_id=request_id_var.get(),
    )
    session.add(entry)
    written(tenant_id=tenant_id, action=action, target_type=target_type, target_id=entry.target_id)


def origin() -> tuple[str | None, str | None]:
    """Where the current change comes from (client IP, request id): for an entry a SQL function writes itself."""
    return _ip(), request_id_var.get()


def written(*, tenant_id: uuid.UUID, action: str, target_type: str, target_id: str | None) -> None:
    """The log line of an entry, whether `record` added it or a SQL function wrote it."""
    log.info("audit", tenant_id=str(tenant_id), action=action, target_type=target_type, target_id=target_id)


async def record_by(
    session: AsyncSession,
    principal: Principal,
    *,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """`record` what a tenant's member or API key did, in their own tenant."""
    if principal.tenant_id is None:
        raise ValueError(f"a {principal.kind} principal has no tenant to audit in")
    await record(
        session,
        tenant_id=principal.tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action=action,
        target_type=target_type,
        target_id=target_id,
        before=before,
        after=after,
    )


async def record_provider(
    session: AsyncSession,
    *,
    provider_user_id: uuid.UUID | None,
    action: str,
    target_tenant_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one entry to the provider's audit log (what an operator did, to which tenant) in the current transaction."""
    session.add(
        ProviderAuditEntry(
            provider_user_id=provider_user_id,
            action=action,
            target_tenant_id=target_tenant_id,
            detail=dict(detail or {}),
        )
    )
    log.info("provider_audit", action=action, target_tenant_id=str(target_tenant_id) if target_tenant_id else None)


async def redact(session: AsyncSession, *, target_type: str, target_id: uuid.UUID | str) -> int:
    """Blank the before and after values of one target's entries (erasure); who did what, and when, stays."""
    marker = {"redacted": True}
    result = await session.execute(
        update(AuditEntry)
        .where(AuditEntry.target_type == target_type, AuditEntry.target_id == str(target_id))
        .values(
            before=case((AuditEntry.before.is_(None), None), else_=cast(marker, JSONB)),
            after=case((AuditEntry.after.is_(None), None), else_=cast(marker, JSONB)),
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
