"""Outgoing e-mail, written to the outbox in the sender's transaction (in development: the outbox and the log)."""

from __future__ import annotations

import uuid

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from backend.config import get_settings
from backend.tenants.models import OutboxMail

log = structlog.get_logger("mail")


async def queue_mail(
    session: AsyncSession, *, tenant_id: uuid.UUID, to: str, subject: str, body: str, kind: str
) -> None:
    """Queue one e-mail; it is sent only if the surrounding transaction commits."""
    session.add(OutboxMail(tenant_id=tenant_id, to_address=to, subject=subject, body=body, kind=kind))
    # Links in bodies are credentials: only development prints them.
    shown = body if get_settings().environment != "production" else "<redacted>"
    log.info("mail_queued", tenant_id=str(tenant_id), to=to, kind=kind, subject=subject, body=shown)
