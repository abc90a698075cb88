"""What the API may ask of a call in conversation: hold, resume, blind transfer, recording controls.

The process controlling the call carries the request out with API commands on
the call's node, so the same code serves a call controlled through its own
socket and one adopted after its process died (`NodeLine`):

* hold: `uuid_hold <agent leg>`. FreeSWITCH marks the agent's leg held and
  broadcasts that leg's `hold_music` (the queue's music, set when it was dialled)
  to its partner, the caller (switch_ivr_hold); `uuid_hold off` stops it.
* blind transfer: the transfer is written into the call's record first, the
  caller's `hangup_after_bridge` is turned off, then the agent's leg is killed:
  the caller's `bridge` returns to call control, which routes the call on (or,
  for an adopted call, the caller leaves the `socket` application, reaches the
  dialplan's second `socket` and the process that takes it reads the record).
* recording: `uuid_record start|mask|unmask|stop`, with the upload command in
  `record_post_process_exec_api`.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import structlog

from backend.channels.voice.call_control.records import CallRecord, CallReply, CallRequest, PendingTransfer
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.call_control.switch import SwitchLine
from backend.channels.voice.recordings import (
    begin_recording,
    end_recording,
    pause_recording,
    resume_recording,
    upload_url,
)
from backend.config import Settings
from backend.db.engine import tenant_transaction
from backend.lib.problems import Problem

log = structlog.get_logger("voice.call_control")


class ControlledCall(Protocol):
    """A call this process controls, through its socket or through its node."""

    s: CallServices
    record: CallRecord
    line: SwitchLine


def _refused(status: int, detail: str, kind: str) -> CallReply:
    return CallReply(False, status, detail, kind)


async def carry_out(call: ControlledCall, request: CallRequest) -> CallReply:
    """Run one request; refusals are replies (status and reason), never exceptions."""
    record = call.record
    arguments = request.arguments
    operation = request.operation
    bound = log.bind(
        tenant_id=str(record.tenant_id), call=str(record.call_uuid), operation=operation, by=arguments.get("by")
    )
    try:
        if operation in ("hold", "unhold"):
            reply = await _hold(call, operation == "hold", arguments)
        elif operation == "transfer":
            reply = await _transfer(call, arguments)
        elif operation == "recording":
            reply = await _recording(call, str(arguments.get("action", "")))
        else:
            reply = _refused(400, f"unknown operation {operation!r}", "unknown-operation")
    except Problem as problem:
        reply = _refused(problem.status, problem.detail, problem.kind or "refused")
    except Exception:
        bound.exception("call_request_failed")
        reply = _refused(502, "The switch did not carry the request out", "switch-failed")
    if reply.ok:
        bound.info("call_request_done")
    else:
        bound.info("call_request_refused", status=reply.status, reason=reply.detail)
    return reply


def _bridged(record: CallRecord) -> CallReply | None:
    if record.phase != "bridged" or record.agent_leg is None or record.agent_id is None:
        return _refused(409, "The call is not connected to an agent", "not-connected")
    if record.pending is not None:
        return _refused(409, "A transfer of this call is under way", "transfer-pending")
    return None


async def _hold(call: ControlledCall, hold: bool, arguments: dict[str, Any]) -> CallReply:
    record = call.record
    refusal = _bridged(record)
    if refusal is not None:
        return refusal
    if record.held == hold:
        return _refused(409, "The call is already on hold" if hold else "The call is not on hold", "hold-state")
    answer = await call.line.api(f"uuid_hold {'' if hold else 'off '}{record.agent_leg}")
    if not answer.ok:
        return _refused(502, f"The switch refused: {answer.text[:120]}", "switch-refused")
    record.held = hold
    await call.s.store.save(record)
    if record.interaction_id is not None:
        await call.s.routing.note(
            record.tenant_id,
            record.interaction_id,
            "held" if hold else "resumed",
            agent_id=record.agent_id,
            by=arguments.get("by"),
        )
    return CallReply(True, data={"held": hold})


async def _transfer(call: ControlledCall, arguments: dict[str, Any]) -> CallReply:
    record = call.record
    refusal = _bridged(record)
    if refusal is not None:
        return refusal
    if record.direction == "outbound":
        return _refused(409, "An outbound call cannot be transferred yet", "outbound-not-transferable")
    target = arguments.get("target")
    if target not in ("queue", "agent"):
        return _refused(422, "A transfer goes to a queue or an agent", "bad-target")
    queue_id = _uuid(arguments.get("queue_id"))
    agent_id = _uuid(arguments.get("agent_id"))
    if (target == "queue" and queue_id is None) or (target == "agent" and agent_id is None):
        return _refused(422, f"A transfer to {target} names it", "bad-target")
    if target == "agent" and agent_id == record.agent_id:
        return _refused(409, "The call is already with this agent", "same-agent")
    record.pending = PendingTransfer(
        target=target,
        queue_id=queue_id,
        agent_id=agent_id,
        mode="blind",
        by=_uuid(arguments.get("by")),
    )
    await call.s.store.save(record)
    call_uuid, leg = record.call_uuid, record.agent_leg
    # Written down before anything moves: a process that takes the call over finds the transfer to finish.
    answer = await call.line.api(f"uuid_setvar {call_uuid} hangup_after_bridge false")
    if answer.ok:
        answer = await call.line.api(f"uuid_kill {leg} NORMAL_CLEARING")
    if not answer.ok:
        record.pending = None
        await call.s.store.save(record)
        await call.line.api(f"uuid_setvar {call_uuid} hangup_after_bridge true")
        return _refused(502, f"The switch refused: {answer.text[:120]}", "switch-refused")
    return CallReply(True, 202, data={"target": target})


async def _recording(call: ControlledCall, action: str) -> CallReply:
    record = call.record
    if action == "start":
        if record.phase != "bridged":
            return _refused(409, "Only a call connected to an agent is recorded", "not-connected")
        if record.recording_id is not None:
            return _refused(409, "The call is being recorded already", "recording-exists")
        await start_recording(call.s, record, call.line, on_demand=True)
        return CallReply(True, data={"recording_id": str(record.recording_id)})
    if record.recording_id is None or record.recording_path is None:
        return _refused(409, "The call is not being recorded", "no-recording")
    verb = {"pause": "mask", "resume": "unmask", "stop": "stop"}.get(action)
    if verb is None:
        return _refused(422, "The action is start, pause, resume or stop", "bad-action")
    if (action == "pause") == record.recording_paused and action in ("pause", "resume"):
        return _refused(
            409, "The recording is already " + ("paused" if record.recording_paused else "running"), "recording-state"
        )
    answer = await call.line.api(f"uuid_record {record.call_uuid} {verb} {record.recording_path}")
    if not answer.ok:
        return _refused(502, f"The switch refused: {answer.text[:120]}", "switch-refused")
    async with tenant_transaction(call.s.sessionmaker, record.tenant_id) as session:
        if action == "pause":
            await pause_recording(session, record.recording_id)
        elif action == "resume":
            await resume_recording(session, record.recording_id)
        else:
            await end_recording(session, record.recording_id)
    recording_id = record.recording_id
    if action == "stop":
        url = upload_url(call.s.settings, "recordings", record.tenant_id, recording_id, "wav")
        call.s.spawn(
            call.s.ensure_uploaded(
                "recording", record.tenant_id, recording_id, record.node_id, url, record.recording_path
            )
        )
        record.recording_id = None
        record.recording_path = None
    record.recording_paused = action == "pause"
    await call.s.store.save(record)
    return CallReply(True, data={"recording_id": str(recording_id), "paused": record.recording_paused})


def upload_command(settings: Settings, url: str, path: str) -> str:
    """What FreeSWITCH runs as a recording closes: `http_put` of the file through the switch's profile."""
    return f"http_put:{{profile={settings.switch_http_cache_profile}}}{url} {path}"


async def media_folder(settings: Settings, record: CallRecord, line: SwitchLine) -> str:
    """Where the call's node writes this tenant's recordings and messages (`${recordings_dir}` asked of it)."""
    folder = settings.switch_recordings_dir
    if "${recordings_dir}" in folder:
        answer = await line.api("global_getvar recordings_dir")
        folder = folder.replace("${recordings_dir}", answer.text if answer.ok and answer.text else ".")
    return f"{folder.rstrip('/')}/{record.tenant_id}"


async def start_recording(s: CallServices, record: CallRecord, line: SwitchLine, *, on_demand: bool) -> None:
    """Record the caller's leg (both directions) to a file on the node, uploaded by the node when it closes."""
    async with tenant_transaction(s.sessionmaker, record.tenant_id) as session:
        target = await begin_recording(
            session,
            s.settings,
            record.tenant_id,
            queue_id=record.queue_id,
            interaction_id=record.interaction_id,
            call_uuid=record.call_uuid,
            leg_uuid=record.call_uuid,
            agent_id=record.agent_id,
            on_demand=on_demand,
        )
    path = f"{await media_folder(s.settings, record, line)}/recording-{target.id}.wav"
    call = record.call_uuid
    await line.api(
        f"uuid_setvar {call} record_post_process_exec_api {upload_command(s.settings, target.upload_url, path)}"
    )
    answer = await line.api(f"uuid_record {call} start {path}")
    if not answer.ok:
        log.warning("recording_not_started", call=str(call), answer=answer.text[:120])
    record.recording_id = target.id
    record.recording_path = path
    record.recording_paused = False
    await s.store.save(record)
    log.info("recording_started", tenant_id=str(record.tenant_id), recording_id=str(target.id), on_demand=on_demand)


async def close_recording(s: CallServices, record: CallRecord) -> None:
    """The call is over: the recording's end is written, and its upload is watched for."""
    recording_id = record.recording_id
    if recording_id is None:
        return
    try:
        async with tenant_transaction(s.sessionmaker, record.tenant_id) as session:
            out = await end_recording(session, recording_id)
    except Exception:
        log.exception("recording_end_not_recorded", recording_id=str(recording_id))
        return
    if record.recording_path:
        url = upload_url(s.settings, "recordings", record.tenant_id, recording_id, out.format)
        s.spawn(
            s.ensure_uploaded("recording", record.tenant_id, recording_id, record.node_id, url, record.recording_path)
        )


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None
