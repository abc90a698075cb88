"""A call that came in to a tenant's number, under call control from answer to hang-up.

The call goes through phases, each kept in its record (`records.py`) so another
process can pick it up: `ivr` (the pinned flow version, run by the sans-IO
interpreter), `queued` (music, announcements, the callback offer), `ringing`
(agents' legs rung by one `bridge`), `bridged` (talking; hold, transfers and
recording on request), `voicemail`. Everything that happens to the call while it
waits for the switch (routing signals, channel events, API requests) arrives in
one inbox and is handled by the call's own task, between or during the switch's
applications (`_perform`), so a call's state is only ever changed by one task.

How FreeSWITCH is set up for resilience: every call runs with
`hangup_after_bridge=true` and `continue_on_fail=true`. If this process dies while
the caller talks to an agent, the socket closes, `mod_event_socket` clears the
channel's CF_CONTROLLED and leaves the running `bridge` alone: the conversation
goes on; when the agent hangs up the caller is hung up by the bridge, and when the
caller hangs up the agent's leg goes with it. Either way the CDR (with
`cc_interaction_id` and `cc_agent_id`) ends the interaction and sends the agent to
wrap-up, and another process adopts the record to close the recording (see
`adoption.py`). A call that was waiting when its process died finishes the
current prompt (music plays in stretches of `call_control_music_seconds`, since a
`local_stream://` never ends), leaves the `socket` application and meets the
dialplan's second `socket`: another call-control process resumes it from its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import structlog

from backend.channels.voice.call_control.dialing import agent_leg, decline_reason, ring_all
from backend.channels.voice.call_control.inbox import perform_while_serving
from backend.channels.voice.call_control.operations import (
    ConsultOutcome,
    carry_out,
    close_recording,
    consult_outcome,
    finish_consult,
    media_folder,
    reconnect_agent,
    start_recording,
    upload_command,
)
from backend.channels.voice.call_control.records import CallRecord, CallRequest, PendingTransfer, Ringing
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.call_control.switch import (
    CallChannel,
    CallerGone,
    SocketLine,
    SwitchLine,
    seconds_left,
    terminators_for,
)
from backend.channels.voice.esl import Event, OutboundSession
from backend.channels.voice.legs import (
    VAR_CALL,
    VAR_DID,
    VAR_INTERACTION,
    VAR_IVR_FLOW,
    VAR_IVR_FLOW_VERSION,
    VAR_NODE,
    VAR_NUMBER,
    VAR_QUEUE,
    VAR_TENANT,
    as_uuid,
    e164,
)
from backend.channels.voice.media import QueueAudio
from backend.channels.voice.outbound import OutboundRequest
from backend.channels.voice.recordings import recording_policy
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.problems import Conflict, InvalidInput, NotFound, Problem
from backend.routing.ivr import CallbackOfferNode, MenuNode
from backend.routing.ivr_interpreter import (
    Action,
    CallerHungUp,
    CheckHours,
    Collect,
    CustomerAnswer,
    DigitsEntered,
    Enqueue,
    FlowInterpreter,
    Hangup,
    HoursAnswer,
    InterpreterError,
    LookUpCustomer,
    NoInput,
    Play,
    PlaybackDone,
    RequestCallback,
    Speech,
    Step,
    Transfer,
    Voicemail,
)
from backend.routing.ivr_interpreter import Event as FlowEvent
from backend.routing.matcher import Offer
from backend.routing.schemas import InteractionOut, QueueOut
from backend.routing.signals import RoutingSignal

log = structlog.get_logger("voice.call_control")

T = TypeVar("T")

APOLOGY = "We are sorry, we cannot take your call right now. Please call again later."
CALLBACK_CONFIRMATION = "Thank you. We will call you back and you keep your place in line. Goodbye."
CALLBACK_FAILED = "We are sorry, we cannot call you back on this number."
VOICEMAIL_THANKS = "Thank you for your message. Goodbye."
BEEP = "tone_stream://%(500,0,800)"
HANDLED_EVENTS = frozenset({"CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP"})
MUSIC_TIMEOUT_IS_SUCCESS = {"playback_timeout_as_success": "true"}
"""A stretch of music that reaches `playback_timeout_sec` is FILE PLAYED, not PLAYBACK ERROR."""
MAX_QUEUE_HOPS = 3
"""A queue whose closed or no-agent action sends the call to another queue may chain this many times."""


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the dialplan told us about the call (exported channel variables), checked."""

    tenant_id: uuid.UUID
    call_uuid: uuid.UUID
    node_id: uuid.UUID | None
    did: str | None
    number_id: uuid.UUID | None
    queue_id: uuid.UUID | None
    flow_id: uuid.UUID | None
    flow_version: int | None
    """The flow version the dialplan pinned when the call arrived (None: call control reads the published one)."""
    caller_number: str
    caller_name: str


def facts_of(session: OutboundSession) -> CallFacts | None:
    """The call's facts from its channel data; None (and a log line) when they do not describe our call."""
    tenant_id = as_uuid(session.variable(VAR_TENANT))
    call_uuid = as_uuid(session.uuid) or as_uuid(session.variable(VAR_CALL))
    if tenant_id is None or call_uuid is None:
        log.warning(
            "call_control_unknown_call",
            uuid=session.uuid,
            tenant=(session.variable(VAR_TENANT) or "")[:40],
            reason="no tenant or call id on the channel",
        )
        return None
    number = session.channel.get("Caller-Caller-ID-Number") or session.variable("caller_id_number") or ""
    name = session.channel.get("Caller-Caller-ID-Name") or ""
    return CallFacts(
        tenant_id=tenant_id,
        call_uuid=call_uuid,
        node_id=as_uuid(session.variable(VAR_NODE)),
        did=session.variable(VAR_DID),
        number_id=as_uuid(session.variable(VAR_NUMBER)),
        queue_id=as_uuid(session.variable(VAR_QUEUE)),
        flow_id=as_uuid(session.variable(VAR_IVR_FLOW)),
        flow_version=_version(session.variable(VAR_IVR_FLOW_VERSION)),
        caller_number=number[:64],
        caller_name=name[:120],
    )


def _version(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and 0 < len(value) < 10 else None


def _tag(value: Any) -> str:
    config = getattr(type(value), "__struct_config__", None)
    tag = getattr(config, "tag", None)
    return str(tag) if tag else type(value).__name__


class InboundCall:
    """One inbound call under control: its record, its channel, its inbox."""

    def __init__(
        self, services: CallServices, session: OutboundSession, facts: CallFacts, record: CallRecord | None
    ) -> None:
        self.s = services
        self.session = session
        self.channel = CallChannel(session)
        self.line: SwitchLine = SocketLine(self.channel)
        self.facts = facts
        self.resumed = record is not None
        self.record = record or CallRecord(
            tenant_id=facts.tenant_id,
            call_uuid=facts.call_uuid,
            node_id=facts.node_id,
            caller_number=facts.caller_number,
            did=facts.did,
            started_ms=int(time.time() * 1000),
        )
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.answered: tuple[uuid.UUID, uuid.UUID] | None = None
        self.direct_by: uuid.UUID | None = None
        """Set while a call is put straight through to an agent (not through a routing offer)."""
        self.direct = False
        self.routing_ended: RoutingSignal | None = None
        self.queue_moved = False
        self.waiting_audio: tuple[uuid.UUID, QueueAudio] | None = None
        """The queue the caller waits in and its voice settings, as read when the wait began."""
        self.in_music = False
        self.interaction_closed = False
        """We ended the interaction ourselves (voicemail, transfer out, the flow hung up)."""
        self.keep_interaction = False
        """The interaction outlives the call (a callback keeps its place)."""
        self.hung_up = False
        self._domain: str | None = None
        self._recordings_dir: str | None = None
        self.bind_interaction: Callable[[uuid.UUID, InboundCall], None] | None = None
        """Set by the server: tells it which interaction the call carries (routing signals name it)."""
        self.elsewhere = False
        """The caller was bridged by `uuid_bridge` (an attended transfer): our socket runs no application on it."""
        self.superseded = asyncio.Event()
        """The caller reached call control again through the dialplan's next `socket`: that connection has it now."""
        self.finished = False
        self.log = log.bind(tenant_id=str(facts.tenant_id), call=str(facts.call_uuid))

    # --- identity ------------------------------------------------------------------------------------

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.record.tenant_id

    def notify(self, message: object) -> None:
        """Hand a message to the call's own task (a consulted phone answering after the call ended is hung up)."""
        if self.finished and isinstance(message, ConsultOutcome) and message.ok and self.record.node_id is not None:
            self.s.spawn(self.s.voice.commands.hangup(self.record.node_id, message.leg, "ORIGINATOR_CANCEL"))
            return
        self.inbox.put_nowait(message)

    def bridged_elsewhere(self) -> None:
        """`uuid_bridge` took the caller out of our socket's applications (the current one is broken off)."""
        self.elsewhere = True

    def supersede(self) -> None:
        """Another connection of the same channel controls it now (the dialplan's next `socket`)."""
        self.superseded.set()

    @property
    def interaction_id(self) -> uuid.UUID:
        assert self.record.interaction_id is not None
        return self.record.interaction_id

    @property
    def caller_e164(self) -> str | None:
        return e164(self.record.caller_number)

    # --- the call's life ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Control the call until it ends (or this process gives it up to another)."""
        pump = asyncio.create_task(self._pump(), name=f"call-events-{self.record.call_uuid}")
        try:
            await self._begin()
            await self._control()
        except CallerGone:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("call_control_failed", phase=self.record.phase)
            if self.record.phase not in ("bridged",) and not self.channel.down:
                # Anywhere but in a conversation, a call we cannot carry on is ended, not left in silence.
                with contextlib.suppress(Exception):
                    await self._say_and_hang_up(APOLOGY, "NORMAL_TEMPORARY_FAILURE")
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await self._finish()

    async def _pump(self) -> None:
        async for event in self.session.events():
            if event.name in HANDLED_EVENTS and event.unique_id == self.channel.uuid:
                self.inbox.put_nowait(event)

    async def _begin(self) -> None:
        if self.resumed:
            self.log.info("call_resumed", phase=self.record.phase, interaction_id=str(self.record.interaction_id))
            await self.s.store.save(self.record)
            return
        await self.channel.execute("answer")
        opened = await self.s.routing.open(
            self.tenant_id,
            channel="voice",
            customer_ref=self.caller_e164 or (self.record.caller_number or None),
            attributes={
                k: v
                for k, v in {
                    "caller_number": self.record.caller_number,
                    "caller_name": self.facts.caller_name,
                    "did": self.record.did or "",
                    "call_uuid": str(self.record.call_uuid),
                }.items()
                if v
            },
        )
        self.record.interaction_id = opened.id
        self.record.queue_id = self.facts.queue_id
        if self.bind_interaction is not None:
            self.bind_interaction(opened.id, self)
        await self.s.store.save(self.record)
        await self.channel.set_many({"hangup_after_bridge": "true", "continue_on_fail": "true"})
        # Exported: every leg bridged from here carries it, so CDRs find the interaction.
        await self.channel.export(VAR_INTERACTION, str(opened.id))
        self.log = self.log.bind(interaction_id=str(opened.id))
        self.log.info(
            "call_answered", did=self.record.did, flow=str(self.facts.flow_id), queue=str(self.facts.queue_id)
        )

    async def _control(self) -> None:
        phase = self.record.phase
        if phase == "ivr":
            if self.facts.flow_id is not None or self.record.flow is not None:
                await self._terminal(await self._ivr())
            elif self.facts.queue_id is not None:
                # A number pointed straight at a queue skips the IVR.
                await self._enter_queue(self.facts.queue_id, None, {})
            else:
                self.log.warning("call_without_target")
                await self._say_and_hang_up(APOLOGY, "NO_ROUTE_DESTINATION")
        elif phase in ("queued", "ringing"):
            self.record.phase = "queued"
            self.record.ringing = []
            await self._wait()
        elif phase == "bridged" and self.record.pending is not None:
            await self._do_pending()
        else:
            self.log.info("call_resumed_with_nothing_to_do", phase=phase)
            await self._hang_up()

    async def _finish(self) -> None:
        """The call is over (or given up): the interaction ends, the recording closes, the record goes."""
        self.finished = True
        if self.superseded.is_set():
            self.log.info("call_control_handed_to_next_socket", phase=self.record.phase)
            return
        pending = self.record.pending
        if pending is not None and pending.mode == "attended" and self.channel.down:
            # The caller hung up during a consultation: the agents' legs go too (the agent's would stay parked).
            await self._end_consultation_legs(pending.consult_leg, self.record.agent_leg)
        if not self.channel.down and not self.hung_up:
            # We stop controlling a call that is still up (an error while bridged): keep its record; its
            # claim lapses and another process adopts it.
            self.log.warning("call_control_left_live_call", phase=self.record.phase)
            return
        cause = None
        if self.session.hangup_event is not None:
            cause = self.session.hangup_event.get("Hangup-Cause")
        if self.record.recording_id is not None:
            await self._close_recording()
        if self.record.interaction_id is not None and not self.interaction_closed and not self.keep_interaction:
            if self.record.phase == "ivr":
                with contextlib.suppress(Exception):
                    await self.s.routing.note(self.tenant_id, self.interaction_id, "ivr_step", event="caller_hung_up")
            try:
                await self.s.routing.end_from_channel(
                    self.tenant_id,
                    self.interaction_id,
                    at=utcnow(),
                    hangup_cause=cause,
                    leg_uuid=str(self.record.call_uuid),
                )
            except Exception:
                self.log.exception("call_end_not_recorded")
        await self.s.store.forget(self.record)
        if not self.hung_up and self.record.phase in ("ivr", "queued", "ringing"):
            # The caller left before an agent took the call (abandoned, or in the IVR).
            self.log.warning("caller_hung_up", phase=self.record.phase, node=self._node(), hangup_cause=cause)
        else:
            self.log.info("call_ended", phase=self.record.phase, hangup_cause=cause)

    async def _end_consultation_legs(self, *legs: uuid.UUID | None) -> None:
        if self.record.node_id is None:
            return
        for leg in legs:
            if leg is not None:
                with contextlib.suppress(Exception):
                    await self.s.voice.commands.hangup(self.record.node_id, leg)

    def _node(self) -> str | None:
        return self.record.flow.node if self.record.flow is not None and self.record.phase == "ivr" else None

    # --- waiting on the switch while handling the inbox ----------------------------------------------

    async def _perform(self, operation: Awaitable[T]) -> T:
        """Wait for a switch operation, handling signals, channel events and requests meanwhile."""
        return await perform_while_serving(operation, self.inbox, self._handle)

    async def drain(self) -> None:
        """Handle whatever is waiting in the inbox now."""
        while not self.inbox.empty():
            await self._handle(self.inbox.get_nowait())

    async def _handle(self, message: object) -> None:
        try:
            if isinstance(message, RoutingSignal):
                await self._on_signal(message)
            elif isinstance(message, Event):
                await self._on_event(message)
            elif isinstance(message, CallRequest):
                await self._on_request(message)
            elif isinstance(message, ConsultOutcome):
                await consult_outcome(self, message)
        except CallerGone:
            pass
        except Exception:
            self.log.exception("call_message_failed", message=type(message).__name__)

    async def _on_signal(self, signal: RoutingSignal) -> None:
        phase = self.record.phase
        if signal.kind == "offered" and phase == "queued" and self.in_music:
            await self.channel.break_media()
        elif signal.kind == "offer_ended" and phase == "ringing" and self.answered is None:
            # Declined in the workspace, or routing's own timer: stop ringing those phones.
            for ringing in self.record.ringing:
                if ringing.agent_id in signal.agents:
                    await self.line.api(f"uuid_kill {ringing.leg} ORIGINATOR_CANCEL")
        elif signal.kind == "queued" and signal.queue_id is not None and signal.queue_id != self.record.queue_id:
            if phase == "queued":
                self.record.queue_id = signal.queue_id
                self.queue_moved = True
                if self.in_music:
                    await self.channel.break_media()
        elif signal.kind == "ended" and not self.interaction_closed and not self.keep_interaction:
            self.routing_ended = signal
            if phase == "queued" and self.in_music:
                await self.channel.break_media()
            elif phase == "ringing" and self.answered is None:
                for ringing in self.record.ringing:
                    await self.line.api(f"uuid_kill {ringing.leg} ORIGINATOR_CANCEL")
            elif phase == "bridged":
                self.log.info("interaction_ended_during_call", outcome=signal.outcome)
                self.interaction_closed = True
                await self._hang_up()

    async def _on_event(self, event: Event) -> None:
        if event.name == "CHANNEL_BRIDGE" and self.record.phase == "ringing":
            other = as_uuid(event.get("Bridge-B-Unique-ID") or event.get("Other-Leg-Unique-ID"))
            for ringing in self.record.ringing:
                if ringing.leg == other:
                    await self._on_answered(ringing.agent_id, ringing.leg)

    # --- the IVR ---------------------------------------------------------------------------------------

    async def _ivr(self) -> Action:
        state = self.record.flow
        flow_id = state.flow_id if state is not None else self.facts.flow_id
        assert flow_id is not None
        try:
            version = state.version if state is not None else self.facts.flow_version
            pinned = await self.s.pinned_flow(self.tenant_id, flow_id, version)
        except (NotFound, msgspec.ValidationError, msgspec.DecodeError) as exc:
            self.log.warning("ivr_flow_unavailable", flow_id=str(flow_id), error=str(exc)[:200])
            return Hangup(Speech(_tts_prompt(APOLOGY), None, None), "NORMAL_CLEARING", "flow")
        interpreter = pinned.interpreter(self.s.settings)
        if state is not None and self.record.action is not None:
            step = Step(state, self.record.action, ())
        else:
            step = interpreter.start(
                {"caller_number": self.caller_e164 or self.record.caller_number, "did": self.record.did or ""}
            )
        while True:
            await self._trace(interpreter, step)
            self.record.flow = step.state
            self.record.action = step.action
            self.record.language = step.state.language
            self.record.voice = step.state.voice
            await self.s.store.save(self.record)
            if step.finished:
                return step.action
            try:
                event = await self._carry_out(interpreter, step)
            except CallerGone:
                gone = interpreter.advance(step.state, CallerHungUp())
                self.log.warning("caller_left_ivr", node=gone.state.node)
                raise
            before = step.state
            try:
                step = interpreter.advance(step.state, event)
            except InterpreterError as exc:
                self.log.warning("ivr_flow_error", node=before.node, error=str(exc)[:200])
                return Hangup(Speech(_tts_prompt(APOLOGY), None, None), "NORMAL_CLEARING", "flow")
            if isinstance(event, DigitsEntered | NoInput) and step.state.attempt > before.attempt:
                self.log.warning(
                    "ivr_input_not_accepted",
                    node=before.node,
                    digits=event.digits if isinstance(event, DigitsEntered) else None,
                    attempt=step.state.attempt,
                )
                await self.s.routing.note(
                    self.tenant_id,
                    self.interaction_id,
                    "ivr_step",
                    node=before.node,
                    rejected=event.digits if isinstance(event, DigitsEntered) else "",
                    attempt=step.state.attempt,
                )
            elif isinstance(event, DigitsEntered | NoInput) and step.finished and not step.trace:
                self.log.warning("ivr_retries_exhausted", node=before.node)

    async def _trace(self, interpreter: FlowInterpreter, step: Step) -> None:
        for node_id in step.trace:
            node = interpreter.graph.nodes.get(node_id)
            await self.s.routing.note(
                self.tenant_id,
                self.interaction_id,
                "ivr_step",
                node=node_id,
                type=_tag(node) if node is not None else "",
                flow_id=str(interpreter.flow_id),
                version=interpreter.version,
            )

    async def _carry_out(self, interpreter: FlowInterpreter, step: Step) -> FlowEvent:
        action = step.action
        if isinstance(action, Play):
            files = await self.s.files(self.tenant_id, action.speech)
            if files:
                await self._perform(self.channel.play(files))
            return PlaybackDone()
        if isinstance(action, Collect):
            files = await self.s.files(self.tenant_id, action.speech)
            node = interpreter.graph.nodes.get(step.state.node)
            if isinstance(node, MenuNode):
                terminators = terminators_for(list(node.options))
            elif isinstance(node, CallbackOfferNode):
                terminators = terminators_for([node.accept_digit])
            else:
                terminators = action.terminators or "#"
            digits = await self._perform(
                self.channel.collect(
                    files,
                    min_digits=action.min_digits,
                    max_digits=action.max_digits,
                    timeout_ms=action.timeout_ms,
                    terminators=terminators,
                )
            )
            return DigitsEntered(digits) if digits else NoInput()
        if isinstance(action, CheckHours):
            return HoursAnswer(await self.s.hours_open(self.tenant_id, action.business_hours_id, utcnow()))
        if isinstance(action, LookUpCustomer):
            return CustomerAnswer(await self.s.caller_attributes(self.tenant_id, self.caller_e164 or ""))
        raise InterpreterError(f"no way to carry out {type(action).__name__}")

    async def _terminal(self, action: Action) -> None:
        language = self.record.language
        if isinstance(action, Enqueue):
            await self._enter_queue(action.queue_id, action.priority, {**action.attributes, **_language(language)})
        elif isinstance(action, Voicemail):
            files = await self.s.files(self.tenant_id, (action.greeting,) if action.greeting else ())
            await self._voicemail(action.queue_id, action.agent_id, files, action.max_seconds)
        elif isinstance(action, RequestCallback):
            await self._ivr_callback(action)
        elif isinstance(action, Transfer):
            if action.target == "queue" and action.queue_id is not None:
                await self._enter_queue(action.queue_id, None, _language(language))
            elif action.target == "agent" and action.agent_id is not None:
                if not await self._direct(action.agent_id):
                    await self._say_and_hang_up(APOLOGY)
            elif action.target == "external" and action.number:
                await self._external(action.number)
        elif isinstance(action, Hangup):
            files = await self.s.files(self.tenant_id, (action.speech,) if action.speech else ())
            await self._close_interaction("ivr", reason=action.reason)
            if files:
                await self._perform(self.channel.play(files))
            await self._hang_up(action.cause)
        else:  # CallerGone
            raise CallerGone("flow")

    # --- the queue ---------------------------------------------------------------------------------------

    async def _enter_queue(
        self, queue_id: uuid.UUID, priority: int | None, attributes: dict[str, str], hops: int = 0
    ) -> None:
        try:
            result = await self.s.routing.enqueue(
                self.tenant_id, self.interaction_id, queue_id, priority=priority, attributes=attributes
            )
        except (InvalidInput, NotFound, Conflict) as exc:
            self.log.warning("queue_unavailable", queue_id=str(queue_id), error=str(exc)[:200])
            await self._say_and_hang_up(APOLOGY)
            return
        self.record.queue_id = queue_id
        if result.state == "ended":
            await self._queue_refused(queue_id, result, hops)
            return
        self.record.phase = "queued"
        await self.s.store.save(self.record)
        self.log.info("call_queued", queue_id=str(queue_id))
        await self._wait()

    async def _queue_refused(self, queue_id: uuid.UUID, result: InteractionOut, hops: int) -> None:
        """The queue is closed, or nobody is logged in: its action says what the caller gets."""
        queue, audio = await self.s.queue(self.tenant_id, queue_id)
        action = queue.closed_action if result.outcome == "closed" else queue.no_agents_action
        self.interaction_closed = True
        self.log.info("queue_refused_call", queue_id=str(queue_id), outcome=result.outcome, action=action.type)
        if action.message:
            await self._perform(self.channel.play([self.s.tts(action.message, self.record.voice)]))
        if action.type == "voicemail" and audio.voicemail_enabled:
            greeting = [audio.voicemail_greeting] if audio.voicemail_greeting else []
            await self._voicemail(queue_id, None, greeting, audio.voicemail_max_seconds)
        elif action.type == "queue" and action.queue_id is not None and hops < MAX_QUEUE_HOPS:
            # The first interaction ended with the queue's outcome; the call goes on as a new one.
            opened = await self.s.routing.open(
                self.tenant_id,
                channel="voice",
                customer_ref=self.caller_e164,
                attributes={"call_uuid": str(self.record.call_uuid)},
            )
            self.record.interaction_id = opened.id
            if self.bind_interaction is not None:
                self.bind_interaction(opened.id, self)
            self.interaction_closed = False
            await self.channel.export(VAR_INTERACTION, str(opened.id))
            await self._enter_queue(action.queue_id, None, {}, hops + 1)
        else:
            await self._hang_up()

    async def _wait(self) -> None:
        """Music on hold, announcements and the callback offer, until an agent takes the call or it ends."""
        assert self.record.queue_id is not None
        queue, audio = await self.s.queue(self.tenant_id, self.record.queue_id)
        self.waiting_audio = (self.record.queue_id, audio)
        loop = asyncio.get_running_loop()
        interval = queue.announcements.interval_seconds * self.s.settings.call_control_announcement_scale
        next_announcement = loop.time()
        digit = self.s.settings.call_control_callback_digit if self.caller_e164 else ""
        await self.channel.set_many({"playback_terminators": digit or "none"})
        while True:
            await self.drain()
            if self.routing_ended is not None:
                await self._routing_ended()
                return
            if self.queue_moved:
                self.queue_moved = False
                assert self.record.queue_id is not None
                queue, audio = await self.s.queue(self.tenant_id, self.record.queue_id)
                self.waiting_audio = (self.record.queue_id, audio)
                await self.s.store.save(self.record)
            offer = await self.s.routing.current_offer(self.tenant_id, self.interaction_id)
            if offer is not None:
                if await self._ring(offer, audio.music_on_hold):
                    return
                continue
            if loop.time() >= next_announcement:
                pressed = await self._announce(queue, audio.announcement, digit)
                next_announcement = loop.time() + interval
                if pressed:
                    await self._queue_callback()
                    return
                continue
            # Bounded: if this process dies meanwhile, the stretch still ends and the dialplan's second `socket`
            # takes the caller to another process (FreeSWITCH does not break media when the socket drops).
            await self.channel.set_many(
                {"playback_timeout_sec": str(self.s.settings.call_control_music_seconds), **MUSIC_TIMEOUT_IS_SUCCESS}
            )
            self.in_music = True
            waker = asyncio.create_task(self._waker(next_announcement))
            try:
                done = await self._perform(
                    self.channel.play([audio.music_on_hold or self.s.settings.call_control_default_music])
                )
            finally:
                self.in_music = False
                waker.cancel()
            await self.channel.set_many({"playback_timeout_sec": "0"})  # prompts and announcements play whole
            if digit and done.variable("playback_terminator_used") == digit:
                await self._queue_callback()
                return

    async def _waker(self, deadline: float) -> None:
        """Break the music when the next announcement is due, or when routing has an offer we missed."""
        loop = asyncio.get_running_loop()
        poll = self.s.settings.call_control_offer_poll_seconds
        while True:
            await asyncio.sleep(max(0.0, min(poll, deadline - loop.time())))
            due = loop.time() >= deadline
            if due or await self.s.routing.current_offer(self.tenant_id, self.interaction_id) is not None:
                if self.in_music:
                    await self.channel.break_media()
                return

    async def _announce(self, queue: QueueOut, announcement: str | None, digit: str) -> bool:
        """The queue's announcement, the caller's place and expected wait, the callback offer; True if the
        caller pressed the callback key."""
        files = [announcement] if announcement else []
        sentences: list[str] = []
        if queue.announcements.position or queue.announcements.estimated_wait:
            place = await self.s.routing.place(self.tenant_id, self.interaction_id)
            if queue.announcements.position and place.position:
                sentences.append(f"You are number {place.position} in line.")
            if queue.announcements.estimated_wait and place.estimated_wait_seconds is not None:
                minutes = max(1, round(place.estimated_wait_seconds / 60))
                sentences.append(f"Your expected wait is about {minutes} minute{'s' if minutes != 1 else ''}.")
        if digit:
            sentences.append(f"To be called back instead, press {digit}.")
        if sentences:
            files.append(self.s.tts(" ".join(sentences), self.record.voice))
        if not files:
            return False
        done = await self._perform(self.channel.play(files))
        return bool(digit) and done.variable("playback_terminator_used") == digit

    async def _queue_callback(self) -> None:
        number = self.caller_e164
        try:
            if number is None:
                raise InvalidInput.field("number", "the caller's number cannot be called back")
            await self.s.routing.request_callback(self.tenant_id, self.interaction_id, number, None)
        except (InvalidInput, Conflict) as exc:
            self.log.warning("callback_refused", error=str(exc)[:200])
            await self._perform(self.channel.play([self.s.tts(CALLBACK_FAILED, self.record.voice)]))
            await self._wait()
            return
        self.keep_interaction = True
        self.log.info("callback_requested")
        await self._say_and_hang_up(CALLBACK_CONFIRMATION)

    async def _ivr_callback(self, action: RequestCallback) -> None:
        number = e164(action.number) if action.number else self.caller_e164
        try:
            result = await self.s.routing.enqueue(
                self.tenant_id, self.interaction_id, action.queue_id, priority=action.priority
            )
            if result.state == "ended" or number is None:
                raise InvalidInput.field("number", "no callback possible")
            await self.s.routing.request_callback(self.tenant_id, self.interaction_id, number, None)
        except (InvalidInput, Conflict, NotFound) as exc:
            self.log.warning("callback_refused", error=str(exc)[:200])
            await self._say_and_hang_up(CALLBACK_FAILED)
            return
        self.keep_interaction = True
        files = await self.s.files(self.tenant_id, (action.confirmation,) if action.confirmation else ())
        await self._perform(self.channel.play(files or [self.s.tts(CALLBACK_CONFIRMATION, self.record.voice)]))
        await self._hang_up()

    async def _routing_ended(self) -> None:
        """Routing ended the waiting interaction (overflow, a supervisor): the action says what follows."""
        signal = self.routing_ended
        assert signal is not None
        self.interaction_closed = True
        action = signal.action or {}
        self.log.info("interaction_ended_while_waiting", outcome=signal.outcome, action=action.get("type"))
        if action.get("message"):
            await self._perform(self.channel.play([self.s.tts(str(action["message"]), self.record.voice)]))
        if action.get("type") == "voicemail" and self.record.queue_id is not None:
            _, audio = await self.s.queue(self.tenant_id, self.record.queue_id)
            if audio.voicemail_enabled:
                greeting = [audio.voicemail_greeting] if audio.voicemail_greeting else []
                await self._voicemail(self.record.queue_id, None, greeting, audio.voicemail_max_seconds)
                return
        await self._hang_up()

    # --- ringing agents -----------------------------------------------------------------------------------

    async def _ring(self, offer: Offer, hold_music: str | None) -> bool:
        """Ring the offered agents' phones at once; True once the call is over or has moved on."""
        dials: list[str] = []
        legs: list[Ringing] = []
        timeout = seconds_left(offer.timeout_ms)
        for agent_id in offer.agents:
            dial = await self._dial(agent_id, timeout, hold_music, legs)
            if dial is None:
                await self.s.routing.decline_from_channel(
                    self.tenant_id, self.interaction_id, agent_id, "unreachable", cause="USER_NOT_REGISTERED"
                )
                continue
            dials.append(dial)
        if not dials:
            return False
        return await self._bridge(dials, legs, timeout)

    async def _dial(
        self, agent_id: uuid.UUID, ring_seconds: int, hold_music: str | None, legs: list[Ringing]
    ) -> str | None:
        where = await self.s.voice.where_registered(self.tenant_id, agent_id)
        if where is None:
            self.log.warning("agent_unreachable", agent_id=str(agent_id), reason="no registered phone on a live node")
            return None
        if self._domain is None:
            self._domain = await self.s.sip_domain(self.tenant_id)
        leg = uuid.uuid4()
        legs.append(Ringing(agent_id, leg))
        return agent_leg(
            where,
            caller_node=self.record.node_id,
            sip_domain=self._domain,
            leg=leg,
            agent_id=agent_id,
            timeout_seconds=ring_seconds,
            caller_id_name=self.facts.caller_name,
            caller_id_number=self.record.caller_number,
            hold_music=hold_music or self.s.settings.call_control_default_music,
            profile=self.s.settings.switch_sip_profile,
        )

    async def _bridge(self, dials: list[str], legs: list[Ringing], ring_seconds: int) -> bool:
        self.record.phase = "ringing"
        self.record.ringing = legs
        self.answered = None
        await self.s.store.save(self.record)
        await self.channel.set_many(
            {"call_timeout": str(ring_seconds), "hangup_after_bridge": "true", "continue_on_fail": "true"}
        )
        done = await self._perform(self.channel.bridge(ring_all(dials)))
        if self.answered is None:
            # The CHANNEL_BRIDGE event may not have been handled yet: the completion names the leg too.
            bridged = as_uuid(done.variable("last_bridge_to") or done.variable("bridge_uuid"))
            for ringing in legs:
                if ringing.leg == bridged and done.variable("originate_disposition") == "SUCCESS":
                    await self._on_answered(ringing.agent_id, ringing.leg)
        if self.answered is None:
            await self._not_answered(done, legs)
            return False
        await self.drain()
        if self.channel.down:
            raise CallerGone("bridge ended")
        if self.record.pending is not None:
            await self._do_pending()
            return True
        # The agent left and the caller is still here without a transfer: nothing more to do.
        await self._hang_up()
        return True

    async def _not_answered(self, done: Event, legs: list[Ringing]) -> None:
        if self.channel.down:
            raise CallerGone("bridge")
        overall = done.variable("originate_disposition") or done.get("Application-Response") or "NO_ANSWER"
        causes = _leg_causes(done.variable("originate_causes"))
        for ringing in legs:
            cause = causes.get(ringing.leg, overall)
            reason = decline_reason(cause)
            self.log.warning("agent_did_not_answer", agent_id=str(ringing.agent_id), cause=cause, reason=reason)
            if not self.direct:
                await self.s.routing.decline_from_channel(
                    self.tenant_id, self.interaction_id, ringing.agent_id, reason, cause=cause
                )
        self.record.phase = "queued"
        self.record.ringing = []
        await self.s.store.save(self.record)

    async def _on_answered(self, agent_id: uuid.UUID, leg: uuid.UUID) -> None:
        if self.answered is not None:
            return
        self.answered = (agent_id, leg)
        self.record.phase = "bridged"
        self.record.agent_id = agent_id
        self.record.agent_leg = leg
        self.record.held = False
        self.record.ringing = []
        await self.s.store.save(self.record)
        if self.direct:
            result = await self.s.routing.connect_direct(
                self.tenant_id, self.interaction_id, agent_id, by=str(self.direct_by) if self.direct_by else None
            )
        else:
            result = await self.s.routing.connect_from_channel(self.tenant_id, self.interaction_id, agent_id)
        if result is None:
            self.log.info("interaction_ended_before_answer", agent_id=str(agent_id))
            self.interaction_closed = True
            await self._hang_up()
            return
        self.log.info("call_connected", agent_id=str(agent_id), leg=str(leg))
        if self.record.recording_id is None and self.record.queue_id is not None:
            if self.waiting_audio is not None and self.waiting_audio[0] == self.record.queue_id:
                policy = self.waiting_audio[1].recording_policy  # read when the wait in this queue began
            else:
                async with tenant_transaction(self.s.sessionmaker, self.tenant_id) as session:
                    policy = await recording_policy(session, self.record.queue_id)
            if policy == "always":
                await self._start_recording(on_demand=False)

    async def _direct(self, agent_id: uuid.UUID, by: uuid.UUID | None = None) -> bool:
        """Put the call straight through to one agent (an IVR transfer, a blind transfer); True when it was
        answered (and is now over)."""
        legs: list[Ringing] = []
        timeout = self.s.settings.call_control_transfer_ring_seconds
        music = None
        if self.record.queue_id is not None:
            _, audio = await self.s.queue(self.tenant_id, self.record.queue_id)
            music = audio.music_on_hold
        dial = await self._dial(agent_id, timeout, music, legs)
        if dial is None:
            return False
        self.direct, self.direct_by = True, by
        try:
            return await self._bridge([dial], legs, timeout)
        finally:
            self.direct, self.direct_by = False, None

    # --- transfers -------------------------------------------------------------------------------------------

    async def _do_pending(self) -> None:
        pending = self.record.pending
        assert pending is not None
        if pending.mode == "attended":
            await self._consulting()
            return
        self.record.pending = None
        self.record.agent_id = None
        self.record.agent_leg = None
        self.record.held = False
        await self.channel.set_many({"hangup_after_bridge": "true"})
        if pending.target == "queue" and pending.queue_id is not None:
            try:
                result = await self.s.routing.transfer_to_queue(
                    self.tenant_id, self.interaction_id, pending.queue_id, mode=pending.mode, by=_text(pending.by)
                )
            except (NotFound, Conflict) as exc:
                self.log.warning("transfer_failed", error=str(exc)[:200])
                await self._hang_up()
                return
            self.record.queue_id = pending.queue_id
            self.log.info("call_transferred", to_queue=str(pending.queue_id), by=_text(pending.by))
            if result.state == "ended":
                await self._queue_refused(pending.queue_id, result, 0)
                return
            self.record.phase = "queued"
            await self.s.store.save(self.record)
            await self._wait()
            return
        if pending.target == "agent" and pending.agent_id is not None:
            self.record.phase = "queued"
            self.log.info("call_transferred", to_agent=str(pending.agent_id), by=_text(pending.by))
            if await self._direct(pending.agent_id, by=pending.by):
                return
            # Nobody answered: the caller is not lost, they wait in the call's queue again.
            if self.record.queue_id is not None:
                self.log.info("transfer_not_answered_back_to_queue", queue_id=str(self.record.queue_id))
                await self.s.routing.transfer_to_queue(
                    self.tenant_id, self.interaction_id, self.record.queue_id, mode="fallback", by=_text(pending.by)
                )
                self.record.phase = "queued"
                await self.s.store.save(self.record)
                await self._wait()
                return
        await self._say_and_hang_up(APOLOGY)

    async def _consulting(self) -> None:
        """The agent talks to the consulted agent: the caller hears the queue's music until the agent completes or
        cancels (requests, handled meanwhile), or one of the agents hangs up."""
        pending = self.record.pending
        if pending is None or pending.consult_state != "talking" or pending.consult_leg is None:
            # Only a consultation whose agents talk takes the caller out of the bridge; anything else is lost.
            self.log.warning("consultation_lost", state=pending.consult_state if pending else None)
            await self._end_consultation_legs(pending.consult_leg if pending else None, self.record.agent_leg)
            await self._say_and_hang_up(APOLOGY)
            return
        music = self.s.settings.call_control_default_music
        if self.record.queue_id is not None:
            _, audio = await self.s.queue(self.tenant_id, self.record.queue_id)
            music = audio.music_on_hold or music
        await self.s.store.save(self.record)
        self.log.info("caller_waits_for_consultation", consult_leg=str(pending.consult_leg))
        while not self.elsewhere:
            await self.drain()
            if self.elsewhere:
                break
            pending = self.record.pending
            if pending is None or pending.consult_leg is None:
                break
            left = await self._consultation_left(pending.consult_leg)
            if left:
                continue
            self.in_music = True
            waker = asyncio.create_task(self._consultation_waker(pending.consult_leg))
            try:
                await self._perform(self.channel.play([music]))
            finally:
                self.in_music = False
                waker.cancel()
        if self.elsewhere:
            await self._follow()
        else:
            await self._hang_up()

    async def _gone(self, leg: uuid.UUID | None) -> bool:
        if leg is None:
            return True
        answer = await self.line.api(f"uuid_exists {leg}")
        return answer.ok and answer.text.strip() == "false"

    async def _consultation_left(self, consult_leg: uuid.UUID) -> bool:
        """One of the agents hung up during the consultation: the caller goes to the one who stayed."""
        pending = self.record.pending
        assert pending is not None and pending.agent_id is not None
        consultee_gone = await self._gone(consult_leg)
        agent_gone = await self._gone(self.record.agent_leg)
        if consultee_gone and agent_gone:
            self.log.warning("consultation_both_agents_left")
            self.record.pending = None
            await self._say_and_hang_up(APOLOGY)
            return True
        if agent_gone:
            # As att_xfer does when the transferring agent hangs up: the transfer completes.
            self.log.info("agent_left_consultation_transfer_completes")
            await finish_consult(self, consult_leg, pending.agent_id, by=pending.by)
            return True
        if consultee_gone:
            self.log.info("consulted_agent_left", consult_agent_id=str(pending.agent_id))
            await reconnect_agent(self, "consulted_agent_hung_up")
            return True
        return False

    async def _consultation_waker(self, consult_leg: uuid.UUID) -> None:
        """Break the music when one of the agents has hung up (their legs are not ours to hear about)."""
        poll = self.s.settings.call_control_offer_poll_seconds
        while True:
            await asyncio.sleep(poll)
            if await self._gone(consult_leg) or await self._gone(self.record.agent_leg):
                if self.in_music:
                    await self.channel.break_media()
                return

    async def _follow(self) -> None:
        """The caller is bridged by `uuid_bridge`: serve requests until the call ends, or until the caller reaches
        call control again through the dialplan's next `socket` (its bridge ended without hanging it up)."""
        self.record.phase = "bridged"
        await self.s.store.save(self.record)
        self.log.info("call_followed_outside_the_socket", agent_id=str(self.record.agent_id))
        hangup = asyncio.ensure_future(self.session.wait_for_hangup())
        superseded = asyncio.ensure_future(self.superseded.wait())
        try:
            await self._perform(asyncio.wait({hangup, superseded}, return_when=asyncio.FIRST_COMPLETED))
        finally:
            hangup.cancel()
            superseded.cancel()
        if self.superseded.is_set():
            return
        raise CallerGone("followed call ended")

    async def _external(self, number: str) -> None:
        """The flow hands the call to an outside number: through the tenant's outbound rules and a gateway."""
        decision = await self.s.outbound.authorize_outbound(
            self.tenant_id,
            OutboundRequest(
                destination=number, caller_id=self.record.did, purpose="transfer", call_id=self.record.call_uuid
            ),
        )
        if not decision.allowed:
            self.log.info("external_transfer_refused", reason=decision.reason)
            await self._close_interaction("transfer_refused", reason=decision.reason)
            await self._say_and_hang_up(APOLOGY)
            return
        try:
            await self._close_interaction("transferred", to_number=decision.destination)
            await self.channel.set_many(
                {"call_timeout": "60", "hangup_after_bridge": "true", "effective_caller_id_number": decision.caller_id}
            )
            renewing = asyncio.create_task(self._renew_outbound())
            try:
                await self._perform(self.channel.bridge(decision.dial_string()))
            finally:
                renewing.cancel()
            await self._hang_up()
        finally:
            await self.s.outbound.release(self.tenant_id, self.record.call_uuid)

    async def _renew_outbound(self) -> None:
        while True:
            await asyncio.sleep(self.s.settings.outbound_lease_seconds / 3)
            await self.s.outbound.renew(self.tenant_id, self.record.call_uuid)

    # --- voicemail ---------------------------------------------------------------------------------------------

    async def _voicemail(
        self, queue_id: uuid.UUID | None, agent_id: uuid.UUID | None, greeting: list[str], max_seconds: int
    ) -> None:
        try:
            target = await self.s.voicemail.begin(
                self.tenant_id,
                queue_id=queue_id,
                agent_id=agent_id,
                caller_number=self.caller_e164 or self.record.caller_number,
                call_uuid=self.record.call_uuid,
                interaction_id=self.record.interaction_id,
            )
        except (InvalidInput, NotFound) as exc:
            self.log.warning("voicemail_unavailable", error=str(exc)[:200])
            await self._say_and_hang_up(APOLOGY)
            return
        path = f"{await self._media_dir()}/voicemail-{target.id}.wav"
        self.record.phase = "voicemail"
        self.record.voicemail_id = target.id
        await self.s.store.save(self.record)
        # Ended as a voicemail now, so the caller's hang-up cannot make it an abandoned call; the upload joins it.
        await self._close_interaction("voicemail", voicemail_id=str(target.id))
        await self.channel.set_many(
            {
                "playback_terminators": "#",
                "record_post_process_exec_api": upload_command(self.s.settings, target.upload_url, path),
            }
        )
        await self._perform(self.channel.play([*greeting, BEEP]))
        limit = min(max_seconds, self.s.settings.voicemail_max_seconds)
        self.log.info("voicemail_recording", voicemail_id=str(target.id), limit=limit)
        await self._perform(self.channel.execute("record", f"{path} {limit}"))
        self.s.spawn(
            self.s.ensure_uploaded("voicemail", self.tenant_id, target.id, self.record.node_id, target.upload_url, path)
        )
        await self._say_and_hang_up(VOICEMAIL_THANKS)

    # --- recording ---------------------------------------------------------------------------------------------

    async def _media_dir(self) -> str:
        if self._recordings_dir is None:
            self._recordings_dir = await media_folder(self.s.settings, self.record, self.line)
        return self._recordings_dir

    async def _start_recording(self, *, on_demand: bool) -> None:
        await start_recording(self.s, self.record, self.line, on_demand=on_demand)

    async def _close_recording(self) -> None:
        await close_recording(self.s, self.record)

    # --- requests from the API -----------------------------------------------------------------------------------

    async def _on_request(self, request: CallRequest) -> None:
        reply = await carry_out(self, request)
        await self.s.store.answer(request, reply)

    # --- helpers -------------------------------------------------------------------------------------------------

    async def _close_interaction(self, outcome: str, **data: Any) -> None:
        if self.record.interaction_id is None or self.interaction_closed:
            return
        self.interaction_closed = True
        await self.s.routing.end_from_channel(self.tenant_id, self.interaction_id, outcome=outcome, **data)

    async def _say_and_hang_up(self, text: str, cause: str = "NORMAL_CLEARING") -> None:
        with contextlib.suppress(CallerGone):
            await self._perform(self.channel.play([self.s.tts(text, self.record.voice)]))
        await self._hang_up(cause)

    async def _hang_up(self, cause: str = "NORMAL_CLEARING") -> None:
        self.hung_up = True
        self.record.phase = "ending"
        with contextlib.suppress(CallerGone):
            await self.channel.hangup(cause)
        raise CallerGone("hung up")


def _tts_prompt(text: str) -> Any:
    from backend.routing.ivr import TtsPrompt

    return TtsPrompt(text=text)


def _language(language: str | None) -> dict[str, str]:
    return {"language": language} if language else {}


def _text(value: uuid.UUID | None) -> str | None:
    return str(value) if value is not None else None


def _leg_causes(value: str | None) -> dict[uuid.UUID, str]:
    """`originate_causes` (`ARRAY::<uuid>;<cause>|:<uuid>;<cause>`) as leg -> cause."""
    if not value:
        return {}
    causes: dict[uuid.UUID, str] = {}
    for item in value.removeprefix("ARRAY::").split("|:"):
        leg, _, cause = item.partition(";")
        found = as_uuid(leg)
        if found is not None and cause:
            causes[found] = cause.strip()
    return causes


__all__ = ["CallFacts", "InboundCall", "PendingTransfer", "Problem", "facts_of"]
