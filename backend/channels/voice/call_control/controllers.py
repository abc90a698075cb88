"""Routes on live calls: read the call, hold and resume, transfer, control the recording (thin: `CallDesk`); a
supervisor listening, whispering or barging in (thin: `LiveSupervision`)."""

from __future__ import annotations

import uuid
from typing import Any

from litestar import Controller, Request, delete, get, post, put

from backend.auth.guards import ANY_MEMBER
from backend.auth.principal import Principal
from backend.channels.voice.call_control.desk import CallDesk
from backend.channels.voice.call_control.schemas import CallTransfer, LiveCallOut, RecordingControl, SupervisionMode
from backend.channels.voice.schemas import SupervisionSessionOut
from backend.channels.voice.supervision import LiveSupervision


def _desk(request: Request[Any, Any, Any]) -> CallDesk:
    desk: CallDesk = request.app.state.calls
    return desk


def _supervision(request: Request[Any, Any, Any]) -> LiveSupervision:
    live: LiveSupervision = request.app.state.live_supervision
    return live


class LiveCallController(Controller):
    """A call in progress, by its interaction: only its agent or a supervisor acts on it."""

    path = "/api/v1/voice/calls"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @get("/{interaction_id:uuid}", permission="agent:workspace", operation_id="get_live_call")
    async def live(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> LiveCallOut:
        """Where the call is (waiting, ringing, bridged), on hold or not, recorded or not."""
        return await _desk(request).live(request.user, interaction_id)

    @post("/{interaction_id:uuid}/hold", permission="agent:workspace", operation_id="hold_call", status_code=200)
    async def hold(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> LiveCallOut:
        """Put the caller on hold: they hear the queue's music (a `held` event on the timeline)."""
        return await _desk(request).hold(request.user, interaction_id, True)

    @post("/{interaction_id:uuid}/unhold", permission="agent:workspace", operation_id="unhold_call", status_code=200)
    async def unhold(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> LiveCallOut:
        """Take the caller back from hold (a `resumed` event)."""
        return await _desk(request).hold(request.user, interaction_id, False)

    @post(
        "/{interaction_id:uuid}/transfer", permission="agent:workspace", operation_id="transfer_call", status_code=202
    )
    async def transfer(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, data: CallTransfer
    ) -> LiveCallOut:
        """Blind transfer to a queue or an agent (a `transferred` event; the agent's leg ends), or attended to an agent
        (the caller on hold with the queue's music while the agent consults; then complete or cancel)."""
        return await _desk(request).transfer(request.user, interaction_id, data)

    @post(
        "/{interaction_id:uuid}/transfer/complete",
        permission="agent:workspace",
        operation_id="complete_call_transfer",
        status_code=200,
    )
    async def complete_transfer(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> LiveCallOut:
        """Complete an attended transfer: the caller goes to the consulted agent (`transferred`, `connected`)."""
        return await _desk(request).complete_transfer(request.user, interaction_id)

    @post(
        "/{interaction_id:uuid}/transfer/cancel",
        permission="agent:workspace",
        operation_id="cancel_call_transfer",
        status_code=200,
    )
    async def cancel_transfer(self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID) -> LiveCallOut:
        """Cancel an attended transfer: the consulted agent's leg is hung up, the caller is back (`resumed`)."""
        return await _desk(request).cancel_transfer(request.user, interaction_id)

    @post(
        "/{interaction_id:uuid}/recording",
        permission="agent:workspace",
        operation_id="control_call_recording",
        status_code=200,
    )
    async def recording(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, data: RecordingControl
    ) -> LiveCallOut:
        """Start (on-demand queues), pause, resume or stop the recording; pauses are kept with it."""
        return await _desk(request).recording(request.user, interaction_id, data)

    # Supervision: the route admits any member; the mode's own permission (calls:listen, calls:whisper,
    # calls:barge) is checked by the service, so that a refusal is audited.

    @post(
        "/{interaction_id:uuid}/supervision",
        permission=ANY_MEMBER,
        operation_id="start_call_supervision",
        status_code=201,
    )
    async def supervise(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, data: SupervisionMode
    ) -> SupervisionSessionOut:
        """Listen, whisper or barge in: your registered softphone rings and, once answered, joins the call."""
        return await _supervision(request).start(request.user, interaction_id, data.mode)

    @put(
        "/{interaction_id:uuid}/supervision/{session_id:uuid}",
        permission=ANY_MEMBER,
        operation_id="change_call_supervision",
    )
    async def change_supervision(
        self,
        request: Request[Principal, Any, Any],
        interaction_id: uuid.UUID,
        session_id: uuid.UUID,
        data: SupervisionMode,
    ) -> SupervisionSessionOut:
        """Switch your running session between listen, whisper and barge (the new mode's permission applies)."""
        return await _supervision(request).change_mode(request.user, interaction_id, session_id, data.mode)

    @delete(
        "/{interaction_id:uuid}/supervision/{session_id:uuid}",
        permission=ANY_MEMBER,
        operation_id="end_call_supervision",
        status_code=200,
    )
    async def end_supervision(
        self, request: Request[Principal, Any, Any], interaction_id: uuid.UUID, session_id: uuid.UUID
    ) -> SupervisionSessionOut:
        """Leave the call: your phone's leg is hung up and the session ends."""
        return await _supervision(request).end(request.user, interaction_id, session_id)
