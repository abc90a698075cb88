"""The API side of call control: who may hold, transfer or record a live call, and passing the request on.

Any API process may receive the request; the call is controlled by one
call-control process (its record names it). The desk checks the request here,
in the caller's tenant (a queue or agent of another tenant is simply not found:
404, nothing changes), then hands it to the owner through Redis and waits for
its answer. Only the agent handling the call, or a supervisor (`queues:write`,
the same right that lets a supervisor end someone else's interaction), may act
on a call; a refusal is logged with who asked.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice.call_control.records import CallRecord, CallStore
from backend.channels.voice.call_control.schemas import CallTransfer, LiveCallOut, RecordingControl
from backend.config import Settings
from backend.db.engine import tenant_transaction
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound, Problem
from backend.routing import service as routing_service
from backend.tenants import service as tenants

log = structlog.get_logger("voice.call_control")

SUPERVISOR_PERMISSION = "queues:write"


class CallControlUnavailable(Problem):
    """The process controlling the call did not answer (it is being taken over): try again shortly."""

    status = 503
    kind = "call-control-unavailable"
    title = "Call control unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "3"})


class CallDesk:
    """Live calls as the agent workspace and supervisors act on them."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], store: CallStore, settings: Settings) -> None:
        self.sessionmaker = sessionmaker
        self.store = store
        self.settings = settings

    async def _record(self, principal: Principal, interaction_id: uuid.UUID, operation: str) -> CallRecord:
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            interaction = await routing_service.interaction_for_customer_store(session, interaction_id)
        handling = interaction.agent_id is not None and interaction.agent_id == principal.user_id
        if not handling and not principal.can(SUPERVISOR_PERMISSION):
            log.warning(
                "call_request_forbidden",
                tenant_id=str(principal.tenant_id),
                interaction_id=str(interaction_id),
                operation=operation,
                user_id=str(principal.user_id),
                reason="neither the handling agent nor a supervisor",
            )
            raise Forbidden(
                "Only the agent handling this call, or a supervisor, may do this",
                extra={"permission": SUPERVISOR_PERMISSION},
            )
        if interaction.channel not in ("voice", "callback"):
            raise Conflict("This interaction is not a call", kind="not-a-call")
        record = await self.store.for_interaction(principal.tenant_id, interaction_id)
        if record is None or interaction.state in ("ended", "wrap_up"):
            raise Conflict("There is no live call for this interaction", kind="no-live-call")
        return record

    async def live(self, principal: Principal, interaction_id: uuid.UUID) -> LiveCallOut:
        """The live call behind an interaction, as call control sees it."""
        record = await self._record(principal, interaction_id, "read")
        return _view(interaction_id, record)

    async def _ask(
        self, principal: Principal, interaction_id: uuid.UUID, operation: str, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        record = await self._record(principal, interaction_id, operation)
        if not await self.store.lease_alive(record.tenant_id, record.call_uuid):
            raise CallControlUnavailable("The call is being taken over by another call-control process")
        reply = await self.store.ask(
            record,
            operation,
            {**arguments, "by": str(principal.user_id) if principal.user_id else None},
            self.settings.call_control_request_timeout_seconds,
        )
        if reply is None:
            raise CallControlUnavailable("Call control did not answer in time")
        if not reply.ok:
            raise Problem(reply.detail, status=reply.status, kind=reply.kind or "refused", title="Call not changed")
        return reply.data

    async def hold(self, principal: Principal, interaction_id: uuid.UUID, hold: bool) -> LiveCallOut:
        """Put the caller on hold (they hear the queue's music) or take them back."""
        await self._ask(principal, interaction_id, "hold" if hold else "unhold", {})
        return await self.live(principal, interaction_id)

    async def _consultee_of_queue(
        self, principal: Principal, interaction_id: uuid.UUID, data: CallTransfer
    ) -> CallTransfer:
        """An attended transfer to a queue consults one of its free agents now (the longest idle with its skills);
        with nobody free the agent is told so, and may transfer blind to let the caller wait in the queue."""
        assert principal.tenant_id is not None
        if data.queue_id is None:
            raise InvalidInput.field("queue_id", "is required for a queue")
        call = await self.live(principal, interaction_id)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            agent_id = await routing_service.free_agent_for_consultation(
                session, data.queue_id, excluding=[a for a in (call.agent_id, principal.user_id) if a is not None]
            )
        if agent_id is None:
            log.info(
                "call_transfer_refused",
                tenant_id=str(principal.tenant_id),
                interaction_id=str(interaction_id),
                queue_id=str(data.queue_id),
                reason="no agent of the queue is free to consult",
            )
            raise Conflict(
                "No agent of that queue is free to consult; a blind transfer queues the caller", kind="no-free-agent"
            )
        return CallTransfer(target="agent", agent_id=agent_id, queue_id=data.queue_id, mode="attended")

    async def transfer(self, principal: Principal, interaction_id: uuid.UUID, data: CallTransfer) -> LiveCallOut:
        """Send the caller to another queue or agent of the tenant (blind: the agent's leg ends now; attended: the
        consulted agent's phone rings while the caller waits on hold)."""
        assert principal.tenant_id is not None
        if data.mode == "attended" and data.target == "queue":
            data = await self._consultee_of_queue(principal, interaction_id, data)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            if data.target == "queue":
                if data.queue_id is None:
                    raise Problem("queue_id is required", status=422, kind="invalid-input")
                try:
                    await routing_service.get_queue(session, data.queue_id)
                except NotFound:
                    log.warning(
                        "call_transfer_refused",
                        tenant_id=str(principal.tenant_id),
                        interaction_id=str(interaction_id),
                        queue_id=str(data.queue_id),
                        reason="no such queue in the tenant",
                    )
                    raise
            else:
                if data.agent_id is None:
                    raise Problem("agent_id is required", status=422, kind="invalid-input")
                await tenants.get_user(session, data.agent_id)
        await self._ask(principal, interaction_id, "transfer", msgspec.to_builtins(data))
        return await self.live(principal, interaction_id)

    async def complete_transfer(self, principal: Principal, interaction_id: uuid.UUID) -> LiveCallOut:
        """Complete the attended transfer: the caller is bridged to the consulted agent; the agent leaves."""
        await self._ask(principal, interaction_id, "transfer_complete", {})
        assert principal.tenant_id is not None
        # The call is the other agent's now: what the transfer left is shown to the one who made it.
        record = await self.store.for_interaction(principal.tenant_id, interaction_id)
        if record is None:
            raise Conflict("There is no live call for this interaction", kind="no-live-call")
        return _view(interaction_id, record)

    async def cancel_transfer(self, principal: Principal, interaction_id: uuid.UUID) -> LiveCallOut:
        """Cancel the attended transfer: the consulted agent's leg is hung up; the caller is back with the agent."""
        await self._ask(principal, interaction_id, "transfer_cancel", {})
        return await self.live(principal, interaction_id)

    async def recording(self, principal: Principal, interaction_id: uuid.UUID, data: RecordingControl) -> LiveCallOut:
        """Start (on-demand policy), pause, resume or stop the call's recording."""
        await self._ask(principal, interaction_id, "recording", {"action": data.action})
        return await self.live(principal, interaction_id)


def _view(interaction_id: uuid.UUID, record: CallRecord) -> LiveCallOut:
    consult = record.pending if record.pending is not None and record.pending.mode == "attended" else None
    return LiveCallOut(
        interaction_id=interaction_id,
        call_uuid=record.call_uuid,
        phase=record.phase,
        queue_id=record.queue_id,
        agent_id=record.agent_id,
        held=record.held,
        recording_id=record.recording_id,
        recording_paused=record.recording_paused,
        transfer_pending=record.pending is not None,
        consult_agent_id=consult.agent_id if consult is not None else None,
        consult_state=consult.consult_state if consult is not None else None,
    )
