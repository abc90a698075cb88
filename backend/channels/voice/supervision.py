"""Supervision sessions: who listened to, whispered to or barged into whose call, checked and recorded.

Each mode is its own permission (`calls:listen`, `calls:whisper`,
`calls:barge`); supervisors hold all three. Call control (phase 2) opens a
session here before it asks the switch for `eavesdrop`, changes its mode
(FreeSWITCH's eavesdrop DTMF keys switch between listen, whisper and barge),
and ends it when the supervisor leaves or the call ends. A refusal is audited
in its own transaction and raised as 403 problem+json.
"""

from __future__ import annotations

import uuid
from typing import Literal

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice.models import SupervisionSession
from backend.channels.voice.schemas import SupervisionSessionOut
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, Forbidden, NotFound
from backend.routing import interactions
from backend.tenants import audit

log = structlog.get_logger("voice.supervision")

Mode = Literal["listen", "whisper", "barge"]


def permission_for(mode: Mode) -> str:
    """The permission a mode needs."""
    return f"calls:{mode}"


def session_out(row: SupervisionSession) -> SupervisionSessionOut:
    """The API's view of a supervision session."""
    return SupervisionSessionOut(
        row.id, row.supervisor_id, row.agent_id, row.interaction_id, row.call_uuid, row.mode, row.modes,
        row.started_at, row.ended_at,
    )  # fmt: skip


class SupervisionDesk:
    """Opens, switches and closes supervision sessions, checking the mode's permission each time."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def _refuse(self, principal: Principal, mode: Mode, interaction_id: uuid.UUID | None) -> Forbidden:
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
                action="supervision.refused",
                target_type="interaction",
                target_id=interaction_id,
                after={"mode": mode, "missing": permission_for(mode)},
            )
        log.warning(
            "supervision_refused",
            tenant_id=str(principal.tenant_id),
            user_id=str(principal.user_id),
            mode=mode,
            interaction=str(interaction_id),
        )
        return Forbidden(
            f"Requires permission {permission_for(mode)}",
            kind="supervision-forbidden",
            extra={"permission": permission_for(mode)},
        )

    async def start(
        self, principal: Principal, interaction_id: uuid.UUID, mode: Mode, call_uuid: uuid.UUID | None = None
    ) -> SupervisionSessionOut:
        """A supervisor joins a connected call in a mode."""
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        if not principal.can(permission_for(mode)):
            raise await self._refuse(principal, mode, interaction_id)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            interaction, _ = await interactions.get(session, interaction_id)  # 404 for another tenant's
            if interaction.state != "connected" or interaction.channel not in ("voice", "callback"):
                raise Conflict("Only a connected call can be supervised", kind="not-a-live-call")
            if interaction.agent_id == principal.user_id:
                raise Conflict("You are the agent on this call", kind="own-call")
            now = utcnow()
            row = SupervisionSession(
                tenant_id=principal.tenant_id,
                supervisor_id=principal.user_id,
                agent_id=interaction.agent_id,
                interaction_id=interaction_id,
                call_uuid=call_uuid,
                mode=mode,
                modes=[{"mode": mode, "at": now.isoformat()}],
                started_at=now,
            )
            session.add(row)
            await session.flush()
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
                action="supervision.start",
                target_type="interaction",
                target_id=interaction_id,
                after={"mode": mode, "agent_id": str(interaction.agent_id), "session_id": str(row.id)},
            )
            return session_out(row)

    async def change_mode(self, principal: Principal, session_id: uuid.UUID, mode: Mode) -> SupervisionSessionOut:
        """Switch an open session to another mode (listen → whisper → barge), with that mode's permission."""
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            interaction_id = row.interaction_id
        if not principal.can(permission_for(mode)):
            raise await self._refuse(principal, mode, interaction_id)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            if row.mode != mode:
                row.modes = [*row.modes, {"mode": mode, "at": utcnow().isoformat()}]
                await audit.record(
                    session,
                    tenant_id=principal.tenant_id,
                    actor_type=principal.actor_type,
                    actor_id=principal.actor_id,
                    action="supervision.mode",
                    target_type="interaction",
                    target_id=row.interaction_id,
                    before={"mode": row.mode},
                    after={"mode": mode, "session_id": str(row.id)},
                )
                row.mode = mode
            return session_out(row)

    async def end(self, principal: Principal, session_id: uuid.UUID) -> SupervisionSessionOut:
        """The supervisor left (or the call ended)."""
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            row.ended_at = utcnow()
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
                action="supervision.end",
                target_type="interaction",
                target_id=row.interaction_id,
                after={"session_id": str(row.id)},
            )
            return session_out(row)

    @staticmethod
    async def _own_open(session: AsyncSession, principal: Principal, session_id: uuid.UUID) -> SupervisionSession:
        row = await session.scalar(
            select(SupervisionSession).where(SupervisionSession.id == session_id).with_for_update()
        )
        if row is None or row.supervisor_id != principal.user_id:
            raise NotFound("No such supervision session")
        if row.ended_at is not None:
            raise Conflict("The supervision session has ended", kind="supervision-ended")
        return row


async def list_sessions(
    session: AsyncSession,
    page: PageRequest,
    *,
    agent_id: uuid.UUID | None = None,
    supervisor_id: uuid.UUID | None = None,
) -> tuple[list[SupervisionSessionOut], str | None]:
    """Supervision sessions, newest first; filter by agent or supervisor."""
    statement = select(SupervisionSession)
    if agent_id is not None:
        statement = statement.where(SupervisionSession.agent_id == agent_id)
    if supervisor_id is not None:
        statement = statement.where(SupervisionSession.supervisor_id == supervisor_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"started_at": SupervisionSession.started_at},
        default_sort="-started_at",
        id_column=SupervisionSession.id,
    )
    return [session_out(r) for r in rows], cursor
