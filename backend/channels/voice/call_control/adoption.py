"""Calls whose controlling process died, taken over by another process without their socket.

What FreeSWITCH does when the controlling socket closes (mod_event_socket.c,
`listener_run` and the `socket` application in async mode): the listener clears
the channel's CF_CONTROLLED and closes; the application running on the channel
(a `bridge`, a `playback`) is not interrupted. When it returns, `switch_ivr_park`
sees the channel is no longer controlled and returns, the `socket` application
ends and the dialplan goes on with its next action (no `socket_resume` is set,
so nothing is re-run). Our dialplan's next action is a second `socket` to call
control, so a call that was waiting is picked up by a live process, which finds
its record and resumes it. A call talking to an agent stays bridged; with
`hangup_after_bridge=true` it ends with the conversation.

Such a bridged call is adopted here: its record's lease lapsed, a surviving
process claimed it, and now follows it through the node command path
(`uuid_exists` until it is gone), answers API requests for it with API commands
(hold, blind transfer, recording), and when it is over closes the recording
(the upload is checked) and ends the interaction if the CDR has not already.
A call that reconnects through the dialplan's second `socket` is handed back to
the process it reached (the record's owner changes; the adopter lets go).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import structlog

from backend.channels.voice.call_control.operations import (
    ConsultOutcome,
    back_to_agent,
    carry_out,
    close_recording,
    consult_outcome,
    start_recording,
)
from backend.channels.voice.call_control.records import CallRecord, CallReply, CallRequest
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.call_control.switch import NodeLine, SwitchLine
from backend.channels.voice.recordings import recording_policy
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction

log = structlog.get_logger("voice.call_control")


class AdoptedCall:
    """A call another process controlled, followed and served through its node."""

    def __init__(self, services: CallServices, record: CallRecord) -> None:
        self.s = services
        self.record = record
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        assert record.node_id is not None
        self.line: SwitchLine = NodeLine(services.voice.commands, record.node_id)
        self.log = log.bind(tenant_id=str(record.tenant_id), call=str(record.call_uuid))
        self.superseded = False

    def notify(self, message: object) -> None:
        """Hand a message to the call's own task."""
        self.inbox.put_nowait(message)

    def bridged_elsewhere(self) -> None:
        """Nothing to stop: no application of ours runs on an adopted call."""

    def supersede(self) -> None:
        """The caller reached call control again through the dialplan's next `socket` (in this process)."""
        self.superseded = True

    async def run(self) -> None:
        """Follow the call until it is gone or someone else took it; then finish it."""
        self.log.warning(
            "call_adopted",
            previous_owner=self.record.owner,
            phase=self.record.phase,
            interaction_id=str(self.record.interaction_id),
            agent_id=str(self.record.agent_id),
        )
        await self.s.store.save(self.record)
        await self._reconcile()
        await self._keep_recording_policy()
        poll = self.s.settings.call_control_adopted_poll_seconds
        while True:
            exists = await self.line.api(f"uuid_exists {self.record.call_uuid}")
            if exists.ok and exists.text.strip() == "false":
                break
            current = await self.s.store.load(self.record.tenant_id, self.record.call_uuid)
            if self.superseded or current is None or current.owner != self.s.store.owner:
                # It reconnected through the dialplan's second socket (or ended there): not ours any more.
                self.log.info("adopted_call_handed_over", owner=current.owner if current else None)
                return
            self.record = current
            await self._serve(poll)
        await self._finish()

    async def _serve(self, seconds: float) -> None:
        """Answer requests for a while (asyncio.wait: a cancellation is never mistaken for the time running out)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            getter = asyncio.ensure_future(self.inbox.get())
            try:
                done, _ = await asyncio.wait({getter}, timeout=left)
            finally:
                getter.cancel()
            if getter not in done:
                return
            message = getter.result()
            if isinstance(message, CallRequest):
                reply = await carry_out(self, message)
                await self.s.store.answer(message, reply)
            elif isinstance(message, ConsultOutcome):
                await consult_outcome(self, message)

    async def _dump(self, leg: uuid.UUID) -> dict[str, Any] | None:
        answer = await self.line.api(f"uuid_dump {leg} json")
        if not answer.ok or not answer.text.startswith("{"):
            return None
        try:
            found = json.loads(answer.text)
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    async def _reconcile(self) -> None:
        """The record says what the dead process knew; FreeSWITCH says what is true now (`uuid_dump`).

        A process that died while agents' phones rang may have missed the answer: if one of the rung legs is
        up and answered, the call is bridged to it, and routing hears of it now.
        """
        record = self.record
        pending = record.pending
        if pending is not None and pending.mode == "attended" and pending.consult_state == "ringing":
            # The consulted agent's phone was ringing for the dead process: nobody hears that outcome any more.
            if pending.consult_leg is not None:
                await self.line.api(f"uuid_kill {pending.consult_leg} ORIGINATOR_CANCEL")
            await back_to_agent(self, "consult_abandoned_by_takeover")
            return
        if record.phase != "ringing":
            return
        for ringing in record.ringing:
            dump = await self._dump(ringing.leg)
            if dump is None or dump.get("Answer-State") != "answered":
                continue
            record.phase = "bridged"
            record.agent_id = ringing.agent_id
            record.agent_leg = ringing.leg
            record.ringing = []
            await self.s.store.save(record)
            self.log.info("adopted_call_found_bridged", agent_id=str(ringing.agent_id), leg=str(ringing.leg))
            if record.interaction_id is not None:
                await self.s.routing.connect_from_channel(record.tenant_id, record.interaction_id, ringing.agent_id)
            return

    async def _keep_recording_policy(self) -> None:
        """A queue that records always has its bridged call recorded, even when the dead process had not yet
        started the recording on the node (its database row aside): better a second file than none."""
        record = self.record
        if record.phase != "bridged" or record.recording_id is not None or record.queue_id is None:
            return
        async with tenant_transaction(self.s.sessionmaker, record.tenant_id) as session:
            policy = await recording_policy(session, record.queue_id)
        if policy != "always":
            return
        try:
            await start_recording(self.s, record, self.line, on_demand=False)
        except Exception:
            self.log.exception("adopted_call_recording_not_started")
            return
        self.log.warning("adopted_call_recording_started", recording_id=str(record.recording_id))

    async def _finish(self) -> None:
        record = self.record
        if record.recording_id is not None:
            await close_recording(self.s, record)
        if record.interaction_id is not None and record.phase != "voicemail":
            try:
                await self.s.routing.end_from_channel(record.tenant_id, record.interaction_id, at=utcnow())
            except Exception:
                self.log.exception("adopted_call_end_not_recorded")
        while not self.inbox.empty():
            message = self.inbox.get_nowait()
            if isinstance(message, CallRequest):
                await self.s.store.answer(message, CallReply(False, 409, "The call has ended", "call-ended"))
        await self.s.store.forget(record)
        self.log.info("adopted_call_ended", interaction_id=str(record.interaction_id))
