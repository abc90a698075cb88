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
* attended transfer (to an agent): the consultation. The caller's `hangup_after_bridge`
  is turned off and the agent's leg gets `park_after_bridge`; the agent's leg is held
  (the caller hears the queue's music) while the consulted agent's phone is rung by an
  `originate ... &park()` on the call's node (through its holder, in the background:
  the call's inbox hears the outcome). Answered: `uuid_hold off` and `uuid_bridge
  <agent leg> <consult leg>`, which takes the agent's leg out of the caller's bridge;
  the caller's `bridge` returns to call control, which plays the queue's music until
  the agent completes or cancels. Completing is `uuid_bridge <caller> <consult leg>`
  (the consulted agent's leg leaves the agents' bridge) and the first agent's leg is
  hung up; cancelling is `uuid_bridge <caller> <agent leg>` and the consult leg is hung
  up. Either way the caller is bridged by `uuid_bridge`, outside the socket's
  applications, and call control follows it from then on (as `adoption.py` does). Not
  answered: `uuid_hold off`, the caller is back with the agent. Why not FreeSWITCH's
  `att_xfer`: see `docs/decisions.md`.
* recording: `uuid_record start|mask|unmask|stop`, with the upload command in
  `record_post_process_exec_api`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog

from backend.channels.voice.call_control.records import CallRecord, CallReply, CallRequest, PendingTransfer
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.call_control.switch import SwitchLine
from backend.channels.voice.commands import SwitchCommandError
from backend.channels.voice.legs import VAR_AGENT, VAR_CALL, VAR_INTERACTION, VAR_TENANT
from backend.channels.voice.recordings import (
    begin_recording,
    end_recording,
    pause_recording,
    resume_recording,
    upload_url,
)
from backend.channels.voice.registrations import contact_uri
from backend.config import Settings
from backend.db.engine import tenant_transaction
from backend.lib.problems import Problem

log = structlog.get_logger("voice.call_control")


class ControlledCall(Protocol):
    """A call this process controls, through its socket or through its node."""

    s: CallServices
    record: CallRecord
    line: SwitchLine

    def notify(self, message: object) -> None:
        """Hand a message to the call's own task (its inbox)."""
        ...

    def bridged_elsewhere(self) -> None:
        """The caller was bridged with `uuid_bridge`: no application of ours runs on it any more."""
        ...


@dataclass(frozen=True, slots=True)
class ConsultOutcome:
    """The consulted agent's phone answered, or not (the originate's result), for the call's own task."""

    leg: uuid.UUID
    ok: bool
    cause: str | None = None


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
        elif operation == "transfer" and arguments.get("mode") == "attended":
            reply = await _consult(call, arguments)
        elif operation == "transfer":
            reply = await _transfer(call, arguments)
        elif operation == "transfer_complete":
            reply = await _complete(call, arguments)
        elif operation == "transfer_cancel":
            reply = await _cancel(call, arguments)
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


async def _consult(call: ControlledCall, arguments: dict[str, Any]) -> CallReply:
    """Start an attended transfer: the caller on hold, the consulted agent's phone rung (202; the outcome follows)."""
    record = call.record
    refusal = _bridged(record)
    if refusal is not None:
        return refusal
    if record.direction == "outbound":
        return _refused(409, "An outbound call cannot be transferred yet", "outbound-not-transferable")
    agent_id = _uuid(arguments.get("agent_id"))
    if arguments.get("target") != "agent" or agent_id is None:
        return _refused(422, "An attended transfer goes to an agent", "bad-target")
    if agent_id == record.agent_id:
        return _refused(409, "The call is already with this agent", "same-agent")
    assert record.agent_leg is not None and record.interaction_id is not None
    if record.node_id is None:
        return _refused(409, "The call's switch node is unknown", "no-node")
    where = await call.s.voice.where_registered(record.tenant_id, agent_id)
    if where is None:
        return _refused(409, "The agent's phone is not registered", "agent-unreachable")
    if where.node_id == record.node_id:
        destination = f"user/{where.sip_username}@{await call.s.sip_domain(record.tenant_id)}"
    else:
        destination = f"sofia/{call.s.settings.switch_sip_profile}/{contact_uri(where.contact)}"
    consult_leg = uuid.uuid4()
    record.pending = PendingTransfer(
        target="agent", agent_id=agent_id, mode="attended", by=_uuid(arguments.get("by")), consult_leg=consult_leg
    )
    await call.s.store.save(record)
    caller, agent_leg = record.call_uuid, record.agent_leg
    # The caller stays when the agent's leg leaves its bridge; the agent's leg stays when the consult leg leaves.
    steps = [
        f"uuid_setvar {caller} hangup_after_bridge false",
        f"uuid_setvar {agent_leg} park_after_bridge true",
    ]
    if not record.held:
        steps.append(f"uuid_hold {agent_leg}")  # the caller hears the agent leg's hold_music: the queue's music
    for command in steps:
        answer = await call.line.api(command)
        if not answer.ok:
            await _restore(call)
            record.pending = None
            await call.s.store.save(record)
            return _refused(502, f"The switch refused: {answer.text[:120]}", "switch-refused")
    record.held = True
    await call.s.store.save(record)
    await call.s.routing.note(
        record.tenant_id,
        record.interaction_id,
        "held",
        agent_id=record.agent_id,
        by=arguments.get("by"),
        reason="consultation",
        consult_agent_id=str(agent_id),
    )
    ring = call.s.settings.call_control_transfer_ring_seconds
    variables = {
        VAR_TENANT: str(record.tenant_id),
        VAR_CALL: str(caller),
        VAR_INTERACTION: str(record.interaction_id),
        VAR_AGENT: str(agent_id),
        "originate_timeout": str(ring),
        "park_after_bridge": "true",
        "origination_caller_id_name": "Consultation",
        "origination_caller_id_number": re.sub(r"[^0-9+]", "", record.caller_number)[:32] or "0",
    }
    node_id = record.node_id

    async def ring_consultee() -> None:
        try:
            origination = await call.s.voice.commands.originate(
                destination,
                "&park()",
                variables=variables,
                node_id=node_id,
                leg_uuid=consult_leg,
                within=ring + call.s.settings.switch_command_timeout_seconds,
            )
            outcome = ConsultOutcome(consult_leg, origination.ok, origination.cause)
        except SwitchCommandError as exc:
            log.warning("consult_not_rung", consult_leg=str(consult_leg), error=str(exc))
            outcome = ConsultOutcome(consult_leg, False, "SWITCH_UNAVAILABLE")
        call.notify(outcome)

    call.s.spawn(ring_consultee())
    log.info("consult_ringing", call=str(caller), consult_agent_id=str(agent_id), consult_leg=str(consult_leg))
    return CallReply(True, 202, data={"consult_leg": str(consult_leg)})


async def _restore(call: ControlledCall) -> None:
    """Undo what a consultation set on the legs: the caller back with the agent, as before."""
    record = call.record
    if record.agent_leg is not None:
        await call.line.api(f"uuid_setvar {record.agent_leg} park_after_bridge false")
        if record.held:
            await call.line.api(f"uuid_hold off {record.agent_leg}")
    await call.line.api(f"uuid_setvar {record.call_uuid} hangup_after_bridge true")


async def back_to_agent(call: ControlledCall, reason: str, cause: str | None = None) -> None:
    """The consultation is over before the two agents talked: the caller is taken off hold, back with the agent."""
    record = call.record
    pending = record.pending
    await _restore(call)
    if record.interaction_id is not None:
        await call.s.routing.note(
            record.tenant_id,
            record.interaction_id,
            "resumed",
            agent_id=record.agent_id,
            reason=reason,
            cause=cause,
            consult_agent_id=str(pending.agent_id) if pending and pending.agent_id else None,
        )
    record.pending = None
    record.held = False
    await call.s.store.save(record)
    log.info("consult_ended", call=str(record.call_uuid), reason=reason, cause=cause)


async def consult_outcome(call: ControlledCall, outcome: ConsultOutcome) -> None:
    """The consulted agent answered (the agents are bridged; the caller leaves the agent) or did not."""
    record = call.record
    pending = record.pending
    current = pending is not None and pending.mode == "attended" and pending.consult_leg == outcome.leg
    if not current or record.phase != "bridged" or record.agent_leg is None:
        if outcome.ok:  # cancelled meanwhile: the late answer is hung up
            await call.line.api(f"uuid_kill {outcome.leg} ORIGINATOR_CANCEL")
        return
    assert pending is not None
    if not outcome.ok:
        log.warning("consult_not_answered", call=str(record.call_uuid), cause=outcome.cause)
        await back_to_agent(call, "consult_not_answered", outcome.cause)
        return
    record.pending = msgspec.structs.replace(pending, consult_state="talking")
    await call.s.store.save(record)
    await call.line.api(f"uuid_hold off {record.agent_leg}")
    # The agent's leg leaves the caller's bridge for the consult leg; the caller's `bridge` returns to call control.
    answer = await call.line.api(f"uuid_bridge {record.agent_leg} {outcome.leg}")
    if not answer.ok:
        log.warning("consult_not_bridged", call=str(record.call_uuid), answer=answer.text[:120])
        await call.line.api(f"uuid_kill {outcome.leg} NORMAL_CLEARING")
        await back_to_agent(call, "consult_failed", answer.text[:60])
        return
    log.info("consult_connected", call=str(record.call_uuid), consult_leg=str(outcome.leg))


def _consulting(record: CallRecord) -> CallReply | None:
    pending = record.pending
    if pending is None or pending.mode != "attended" or pending.consult_leg is None:
        return _refused(409, "No attended transfer is under way", "no-consultation")
    return None


async def _complete(call: ControlledCall, arguments: dict[str, Any]) -> CallReply:
    """The agent completes the attended transfer: the caller is bridged to the consulted agent, the agent leaves."""
    record = call.record
    refusal = _consulting(record)
    if refusal is not None:
        return refusal
    pending = record.pending
    assert pending is not None and pending.consult_leg is not None and pending.agent_id is not None
    if pending.consult_state != "talking":
        return _refused(409, "The consulted agent has not answered yet", "consult-ringing")
    return await finish_consult(call, pending.consult_leg, pending.agent_id, by=_uuid(arguments.get("by")))


async def finish_consult(
    call: ControlledCall, consult_leg: uuid.UUID, agent_id: uuid.UUID, *, by: uuid.UUID | None
) -> CallReply:
    """The caller goes to the consulted agent (completion, or the first agent hung up during the consultation)."""
    record = call.record
    caller, first_leg = record.call_uuid, record.agent_leg
    await call.line.api(f"uuid_setvar {caller} hangup_after_bridge true")
    await call.line.api(f"uuid_setvar {consult_leg} park_after_bridge false")
    answer = await call.line.api(f"uuid_bridge {caller} {consult_leg}")
    if not answer.ok:
        return _refused(409, "The consulted agent's line is gone", "consult-gone")
    if first_leg is not None:
        await call.line.api(f"uuid_kill {first_leg} NORMAL_CLEARING")
    record.pending = None
    record.held = False
    record.agent_id = agent_id
    record.agent_leg = consult_leg
    await call.s.store.save(record)
    call.bridged_elsewhere()
    assert record.interaction_id is not None
    result = await call.s.routing.connect_direct(
        record.tenant_id, record.interaction_id, agent_id, by=str(by) if by else None, mode="attended"
    )
    log.info("call_transferred", to_agent=str(agent_id), mode="attended", ended=result is None)
    return CallReply(True, data={"agent_id": str(agent_id)})


async def _cancel(call: ControlledCall, arguments: dict[str, Any]) -> CallReply:
    """The agent cancels: the consult leg is hung up, the caller is back with the agent."""
    record = call.record
    refusal = _consulting(record)
    if refusal is not None:
        return refusal
    pending = record.pending
    assert pending is not None and pending.consult_leg is not None
    if pending.consult_state == "ringing":
        await call.line.api(f"uuid_kill {pending.consult_leg} ORIGINATOR_CANCEL")
        await back_to_agent(call, "consult_cancelled")
        return CallReply(True)
    return await reconnect_agent(call, "consult_cancelled")


async def reconnect_agent(call: ControlledCall, reason: str) -> CallReply:
    """After the agents talked: the caller is bridged back to the first agent, the consult leg hung up."""
    record = call.record
    pending = record.pending
    assert record.agent_leg is not None
    caller, agent_leg = record.call_uuid, record.agent_leg
    await call.line.api(f"uuid_setvar {caller} hangup_after_bridge true")
    await call.line.api(f"uuid_setvar {agent_leg} park_after_bridge false")
    answer = await call.line.api(f"uuid_bridge {caller} {agent_leg}")
    if not answer.ok:
        return _refused(409, "The agent's line is gone", "agent-gone")
    if pending is not None and pending.consult_leg is not None:
        await call.line.api(f"uuid_kill {pending.consult_leg} NORMAL_CLEARING")
    record.pending = None
    record.held = False
    await call.s.store.save(record)
    call.bridged_elsewhere()
    if record.interaction_id is not None:
        await call.s.routing.note(
            record.tenant_id,
            record.interaction_id,
            "resumed",
            agent_id=record.agent_id,
            reason=reason,
            consult_agent_id=str(pending.agent_id) if pending and pending.agent_id else None,
        )
    log.info("consult_ended", call=str(caller), reason=reason)
    return CallReply(True)


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
