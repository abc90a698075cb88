"""Calls the contact center places: an agent's click-to-call and routing's callbacks, agent leg first.

How a call goes out (the same for both):

1. The call is authorised by `OutboundGuard` (destination policy, a caller id the tenant owns, a carrier
   gateway, a concurrent-call slot leased in Redis) and has an interaction with its agent (click-to-call:
   `RoutingEngine.open_outbound`, the agent busy from now on; a callback: the one the agent accepted).
2. One call-control process dials it (`OutboundCalls.dial`): a click-to-call reaches exactly one process
   through a Redis list (`BLPOP`); an accepted callback is claimed by one of the processes that heard the
   routing signal (`SET NX`, kept a day, so a repeated signal or a restarted process never dials twice).
   The dial's details are written to Redis under the agent leg's UUID, then the agent's registered
   softphone is rung on the node it registered with (through that node's holder, `commands.py`):
   `originate {origination_uuid=<leg>,cc_direction=outbound,cc_tenant_id,cc_interaction_id,cc_agent_id,
   cc_call_id=<leg>,origination_caller_id_number=<customer>,originate_timeout}user/<seat>@<domain>
   &socket(<CC_CALL_CONTROL_ADDRESS> async full)`.
3. When the agent answers, FreeSWITCH runs `socket` on the agent's leg: a call-control process (any of
   them) gets it as a call of direction `outbound` (`OutboundCall`), sets `effective_caller_id_number`, and
   `bridge`s `{origination_uuid=<customer leg>,origination_caller_id_number=<caller id>,cc_*}
   sofia/gateway/<gateway>/<E.164>`. The agent hears the ringback; when the customer answers the
   interaction is connected (click-to-call) and the queue's recording policy applies.
4. From then on the call is controlled like an inbound bridged call: `call_uuid` (the controlled
   channel) and `agent_leg` are the agent's leg, so hold (`uuid_hold` of the agent's leg, the customer
   hears the music), recording and `/api/v1/voice/calls/{interaction_id}` work unchanged; a blind transfer
   is refused (it would hang the customer up). The CDR path ends the interaction from the agent leg's
   `cc_interaction_id` even if call control dies.

Failures end the attempt with a clear outcome (`agent_no_answer`, `agent_unreachable`, `customer_busy`,
`customer_no_answer`, `customer_unreachable`, `cancelled`; a callback whose customer does not answer ends
as `callback_failed` with the reason), the slot is released, the agent is freed and told over the hub
(`{"type": "outbound_call", "state": "failed", ...}`), and a line is logged. A callback whose agent does
not answer their phone goes back to its queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import msgspec
import phonenumbers
import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice.call_control.inbox import perform_while_serving
from backend.channels.voice.call_control.operations import carry_out, close_recording, start_recording
from backend.channels.voice.call_control.records import CallRecord, CallRequest
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.call_control.switch import CallChannel, CallerGone, SocketLine, SwitchLine
from backend.channels.voice.commands import SwitchCommandError, dial_variables
from backend.channels.voice.esl import Event, OutboundSession
from backend.channels.voice.legs import (
    VAR_AGENT,
    VAR_CALL,
    VAR_DIRECTION,
    VAR_INTERACTION,
    VAR_NODE,
    VAR_TENANT,
    as_uuid,
)
from backend.channels.voice.outbound import OutboundDecision, OutboundGuard, OutboundRequest
from backend.channels.voice.recordings import recording_policy
from backend.channels.voice.service import VoiceSwitchboard
from backend.config import Settings
from backend.customers import service as customers
from backend.customers.access import ALL_UNITS, SENSITIVE, Viewer
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.problems import Conflict, InvalidInput
from backend.lib.redis_keys import global_key, tenant_key
from backend.lib.tasks import cancel_and_wait
from backend.routing import service as routing_service
from backend.routing.engine import RoutingEngine
from backend.routing.signals import RoutingSignal
from backend.tenants.schemas import Strict

if TYPE_CHECKING:
    from backend.channels.voice.call_control.server import CallControlServer

log = structlog.get_logger("voice.outbound_calls")

T = TypeVar("T")

DIALS = global_key("callctl", "dials")
"""Click-to-calls waiting for a call-control process to dial them (a list; each is popped by one process)."""
CLAIM_SECONDS = 86_400
"""A callback's dial claim is kept a day: a repeated signal never dials it again."""
HANDLED_EVENTS = frozenset({"CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP"})
DIRECTION = "outbound"

Purpose = Literal["click_to_call", "callback"]

CUSTOMER_BUSY = frozenset({"USER_BUSY", "CALL_REJECTED", "BUSY_EVERYWHERE", "DECLINE"})
CUSTOMER_NO_ANSWER = frozenset(
    {"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "PROGRESS_TIMEOUT", "RECOVERY_ON_TIMER_EXPIRE"}
)
AGENT_NO_ANSWER = frozenset({"NO_ANSWER", "NO_USER_RESPONSE", "ALLOTTED_TIMEOUT", "PROGRESS_TIMEOUT"})
AGENT_BUSY = frozenset({"USER_BUSY", "CALL_REJECTED", "BUSY_EVERYWHERE", "DECLINE"})

EXPLANATIONS: dict[str, str] = {
    "agent_no_answer": "Your phone did not answer, so the customer was not called",
    "agent_busy": "Your phone refused the call, so the customer was not called",
    "agent_unreachable": "Your phone is not reachable (not registered, or its switch is down)",
    "not_dialled": "The call could not be placed right now; try again in a moment",
    "customer_busy": "The customer's line is busy",
    "customer_no_answer": "The customer did not answer",
    "customer_unreachable": "The number could not be reached (it may not exist)",
    "cancelled": "The call ended before the customer answered",
    "refused": "The call was not allowed",
}
SPOKEN: dict[str, str] = {
    "customer_busy": "The line is busy.",
    "customer_no_answer": "There is no answer.",
    "customer_unreachable": "The number cannot be reached.",
}


class DialJob(msgspec.Struct, frozen=True, kw_only=True):
    """One call to place: who rings first (the agent) and whom they reach (the customer), as authorised."""

    tenant_id: uuid.UUID
    interaction_id: uuid.UUID
    agent_id: uuid.UUID
    agent_leg: uuid.UUID
    """Also the call's id (`cc_call_id`) and the name of its concurrent-call slot."""
    purpose: Purpose
    destination: str
    caller_id: str
    gateway: str
    queue_id: uuid.UUID | None = None
    deadline: float = 0.0
    """Epoch seconds: a click-to-call not picked up by then fails (the agent stopped waiting)."""


_ENCODE = msgspec.json.Encoder()
_DECODE_JOB = msgspec.json.Decoder(DialJob)


def _pending_key(tenant_id: uuid.UUID, leg: uuid.UUID) -> str:
    return tenant_key(tenant_id, "callctl", "outbound", str(leg))


def _claim_key(tenant_id: uuid.UUID, interaction_id: uuid.UUID, at_ms: int) -> str:
    return tenant_key(tenant_id, "callctl", "callback-dial", str(interaction_id), str(at_ms))


def agent_outcome(cause: str | None) -> str:
    """How a call ends when the agent's own leg failed, from FreeSWITCH's cause."""
    cause = (cause or "").upper()
    if cause in AGENT_NO_ANSWER:
        return "agent_no_answer"
    if cause in AGENT_BUSY:
        return "agent_busy"
    return "agent_unreachable"


def customer_outcome(cause: str | None) -> str:
    """How an attempt ends when the customer's leg was not answered, from FreeSWITCH's cause."""
    cause = (cause or "").upper()
    if cause in CUSTOMER_BUSY:
        return "customer_busy"
    if cause in CUSTOMER_NO_ANSWER:
        return "customer_no_answer"
    if cause in ("ORIGINATOR_CANCEL", "LOSE_RACE"):
        return "cancelled"
    return "customer_unreachable"


# --- the API side: an agent asks to call a number ------------------------------------------------------


class OutboundCallIn(Strict):
    """A number to call (E.164, or local to the tenant's region), optionally shown with one of the tenant's numbers."""

    destination: str
    caller_id: str | None = None
    customer_id: uuid.UUID | None = None
    queue_id: uuid.UUID | None = None
    """The queue the call is attributed to (its recording policy and music apply)."""


class OutboundCallOut(msgspec.Struct):
    """The call being placed: its interaction, the agent's leg, and what the customer will see."""

    interaction_id: uuid.UUID
    call_uuid: uuid.UUID
    destination: str
    caller_id: str
    state: str


class OutboundDesk:
    """Click-to-call as the agent workspace asks for it: checked and authorised here, dialled by call control."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        redis: Redis,
        guard: OutboundGuard,
        routing: RoutingEngine,
        voice: VoiceSwitchboard,
        settings: Settings,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.guard = guard
        self.routing = routing
        self.voice = voice
        self.settings = settings

    async def _destination(self, tenant_id: uuid.UUID, raw: str) -> str:
        """E.164 for a number written internationally or locally (the tenant's region); else as given."""
        if len(raw) > 40:
            raise InvalidInput.field("destination", "is too long for a phone number")
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            region = (await customers.store_config(session, tenant_id)).region
        try:
            parsed = phonenumbers.parse(raw.strip(), region)
        except phonenumbers.NumberParseException:
            return raw.strip()
        if not phonenumbers.is_valid_number(parsed):
            return raw.strip()
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)

    async def place(self, principal: Principal, data: OutboundCallIn) -> OutboundCallOut:
        """Authorise the call, open its interaction (the agent busy), and hand it to call control to dial."""
        tenant_id, agent_id = principal.tenant_id, principal.user_id
        if tenant_id is None or agent_id is None:
            raise Conflict("Only a tenant's user places calls", kind="not-an-agent")
        destination = await self._destination(tenant_id, data.destination)
        customer_ref = destination
        if data.customer_id is not None:
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                viewer = Viewer(tenant_id, None, "system", None, frozenset({SENSITIVE, ALL_UNITS}), frozenset())
                await customers.get_customer(session, viewer, data.customer_id)  # 404 when not the tenant's
            customer_ref = str(data.customer_id)
        if await self.voice.where_registered(tenant_id, agent_id) is None:
            log.warning("click_to_call_refused", tenant_id=str(tenant_id), agent_id=str(agent_id), reason="no phone")
            raise Conflict(
                "Your phone is not registered: sign in to your softphone to place calls", kind="phone-not-registered"
            )
        leg = uuid.uuid4()
        decision = await self.guard.authorize_outbound(
            tenant_id,
            OutboundRequest(
                destination=destination,
                caller_id=data.caller_id,
                purpose="click_to_call",
                call_id=leg,
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
            ),
        )
        if not decision.allowed:
            if decision.reason == "invalid_destination":
                raise InvalidInput.field("destination", decision.detail)
            raise decision.problem()
        try:
            opened = await self.routing.open_outbound(
                tenant_id,
                agent_id,
                customer_ref=customer_ref,
                queue_id=data.queue_id,
                attributes={
                    "purpose": "click_to_call",
                    "destination": decision.destination,
                    "caller_id": decision.caller_id,
                    "call_uuid": str(leg),
                },
            )
        except BaseException:
            await self.guard.release(tenant_id, leg)
            raise
        job = DialJob(
            tenant_id=tenant_id,
            interaction_id=opened.id,
            agent_id=agent_id,
            agent_leg=leg,
            purpose="click_to_call",
            destination=decision.destination,
            caller_id=decision.caller_id,
            gateway=decision.gateway,
            queue_id=data.queue_id,
            deadline=time.time() + self.settings.outbound_dial_wait_seconds,
        )
        await self.redis.rpush(DIALS, _ENCODE.encode(job))
        log.info(
            "click_to_call_asked",
            tenant_id=str(tenant_id),
            agent_id=str(agent_id),
            interaction_id=str(opened.id),
            region=decision.region,
            gateway=decision.gateway,
        )
        return OutboundCallOut(opened.id, leg, decision.destination, decision.caller_id, "dialling_agent")


# --- the call-control side: dialling, and the agent's leg once answered ---------------------------------


class OutboundCalls:
    """A call-control process's part in placing calls: takes dial jobs, claims callbacks, controls the calls."""

    def __init__(self, server: CallControlServer) -> None:
        self.server = server
        self.s: CallServices = server.services
        self.socket_address = self.s.settings.call_control_address
        """Where the agent's answered leg is handed (`&socket`); any call-control process may take it."""
        self._loop: asyncio.Task[None] | None = None

    @property
    def redis(self) -> Redis:
        return self.s.store.redis

    async def start(self) -> None:
        """Take click-to-calls from the shared list."""
        self._loop = asyncio.create_task(self._dial_loop(), name="call-control-dials")

    async def close(self) -> None:
        await cancel_and_wait(self._loop)
        self._loop = None

    async def _dial_loop(self) -> None:
        while True:
            try:
                found = await self.redis.blpop([DIALS], timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("dial_jobs_unreadable", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if found is None:
                continue
            try:
                job = _DECODE_JOB.decode(found[1])
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("dial_job_unreadable")
                continue
            self.server.spawn(self._guarded(self.dial(job), job))

    async def _guarded(self, work: Awaitable[None], job: DialJob) -> None:
        try:
            await work
        except Exception:
            log.exception("outbound_dial_failed", tenant_id=str(job.tenant_id), interaction_id=str(job.interaction_id))
            with contextlib.suppress(Exception):
                await self._failed(job, "not_dialled", "INTERNAL_ERROR")

    # --- callbacks ---------------------------------------------------------------------------------------

    async def on_signal(self, signal: RoutingSignal) -> None:
        """An agent accepted a callback that no call holds: one process (the claim's winner) dials it."""
        if signal.kind != "connected" or signal.channel != "callback" or not signal.agents:
            return
        self.server.spawn(self._callback(signal))

    async def _callback(self, signal: RoutingSignal) -> None:
        try:
            await self._dial_callback(signal)
        except Exception:
            log.exception(
                "callback_dial_failed", tenant_id=str(signal.tenant_id), interaction_id=str(signal.interaction_id)
            )

    async def _dial_callback(self, signal: RoutingSignal) -> None:
        key = _claim_key(signal.tenant_id, signal.interaction_id, signal.at_ms)
        claimed = await self.redis.set(key, self.s.store.owner, nx=True, ex=CLAIM_SECONDS)
        if not claimed:
            return
        tenant_id, interaction_id, agent_id = signal.tenant_id, signal.interaction_id, signal.agents[0]
        bound = log.bind(tenant_id=str(tenant_id), interaction_id=str(interaction_id), agent_id=str(agent_id))
        async with tenant_transaction(self.s.sessionmaker, tenant_id) as session:
            interaction = await routing_service.interaction_for_customer_store(session, interaction_id)
        number = str(interaction.attributes.get("callback_number") or "")
        did = interaction.attributes.get("did")
        leg = uuid.uuid4()
        decision = await self.s.outbound.authorize_outbound(
            tenant_id,
            OutboundRequest(destination=number, caller_id=str(did) if did else None, purpose="callback", call_id=leg),
        )
        if not decision.allowed:
            bound.warning("callback_refused", reason=decision.reason)
            await self.s.routing.end_from_channel(
                tenant_id, interaction_id, outcome="callback_failed", reason=decision.reason, destination=number
            )
            await self._tell(tenant_id, agent_id, interaction_id, "failed", "refused", decision.detail)
            return
        bound.info("callback_dialling", gateway=decision.gateway, region=decision.region)
        job = DialJob(
            tenant_id=tenant_id,
            interaction_id=interaction_id,
            agent_id=agent_id,
            agent_leg=leg,
            purpose="callback",
            destination=decision.destination,
            caller_id=decision.caller_id,
            gateway=decision.gateway,
            queue_id=interaction.queue_id,
        )
        await self._guarded(self.dial(job), job)

    # --- dialling the agent ------------------------------------------------------------------------------

    async def dial(self, job: DialJob) -> None:
        """Ring the agent's phone; once answered their leg reaches call control (`accept`), else the call fails."""
        bound = log.bind(tenant_id=str(job.tenant_id), interaction_id=str(job.interaction_id), purpose=job.purpose)
        if job.deadline and job.deadline < time.time():
            bound.warning("outbound_dial_expired")
            await self._failed(job, "not_dialled", "EXPIRED")
            return
        where = await self.s.voice.where_registered(job.tenant_id, job.agent_id)
        if where is None:
            bound.warning("outbound_agent_unreachable", agent_id=str(job.agent_id), reason="no registered phone")
            await self._failed(job, "agent_unreachable", "USER_NOT_REGISTERED")
            return
        domain = await self.s.sip_domain(job.tenant_id)
        ring = self.s.settings.outbound_agent_ring_seconds
        await self.redis.set(
            _pending_key(job.tenant_id, job.agent_leg),
            _ENCODE.encode(job),
            ex=ring + self.s.settings.outbound_lease_seconds,
        )
        variables = {
            VAR_DIRECTION: DIRECTION,
            VAR_TENANT: str(job.tenant_id),
            VAR_INTERACTION: str(job.interaction_id),
            VAR_AGENT: str(job.agent_id),
            VAR_CALL: str(job.agent_leg),
            VAR_NODE: str(where.node_id),
            "origination_caller_id_number": job.destination,
            "origination_caller_id_name": job.destination,
            "originate_timeout": str(ring),
        }
        renewing = asyncio.ensure_future(self._renew(job.tenant_id, job.agent_leg))
        try:
            origination = await self.s.voice.commands.originate(
                f"user/{where.sip_username}@{domain}",
                f"&socket({self.socket_address} async full)",
                variables=variables,
                node_id=where.node_id,
                leg_uuid=job.agent_leg,
                within=ring + 10,
            )
        except SwitchCommandError as exc:
            bound.warning("outbound_originate_failed", error=str(exc)[:200])
            await self._failed(job, "not_dialled", "SWITCH_UNAVAILABLE")
            return
        finally:
            renewing.cancel()
        if not origination.ok:
            outcome = agent_outcome(origination.cause)
            bound.warning("outbound_agent_did_not_answer", cause=origination.cause, outcome=outcome)
            await self._failed(job, outcome, origination.cause)
            return
        bound.info("outbound_agent_answered", leg=str(job.agent_leg), node=str(where.node_id))

    async def _renew(self, tenant_id: uuid.UUID, lease: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(self.s.settings.outbound_lease_seconds / 3)
            with contextlib.suppress(Exception):
                await self.s.outbound.renew(tenant_id, lease)

    async def _failed(self, job: DialJob, outcome: str, cause: str | None) -> None:
        """The agent's leg never reached call control: free the slot, end (or requeue) the call, tell the agent."""
        await self.s.outbound.release(job.tenant_id, job.agent_leg)
        await self.redis.delete(_pending_key(job.tenant_id, job.agent_leg))
        routing = self.s.routing
        if (
            job.purpose == "callback"
            and job.queue_id is not None
            and (outcome.startswith("agent_") or outcome == "not_dialled")
        ):
            # The customer was not called: the callback waits for the next agent.
            with contextlib.suppress(Exception):
                await routing.transfer_to_queue(
                    job.tenant_id, job.interaction_id, job.queue_id, mode="callback_retry", reason=outcome, cause=cause
                )
        else:
            final = "callback_failed" if job.purpose == "callback" else outcome
            await routing.end_from_channel(
                job.tenant_id,
                job.interaction_id,
                outcome=final,
                reason=outcome,
                cause=cause,
                destination=job.destination,
            )
        await self._tell(job.tenant_id, job.agent_id, job.interaction_id, "failed", outcome)

    async def _tell(
        self,
        tenant_id: uuid.UUID,
        agent_id: uuid.UUID,
        interaction_id: uuid.UUID,
        state: str,
        outcome: str | None = None,
        detail: str | None = None,
    ) -> None:
        payload: dict[str, Any] = {"type": "outbound_call", "interaction_id": str(interaction_id), "state": state}
        if outcome is not None:
            payload["outcome"] = outcome
            payload["detail"] = detail or EXPLANATIONS.get(outcome, outcome)
        try:
            await self.s.routing.hub.publish(tenant_id, agent_id, payload)
        except Exception:
            log.warning("outbound_agent_not_told", interaction_id=str(interaction_id), exc_info=True)

    # --- the agent's leg under control ---------------------------------------------------------------------

    async def accept(self, session: OutboundSession, services: CallServices) -> None:
        """The agent answered: their leg reached us through `&socket`; dial the customer and control the call."""
        tenant_id = as_uuid(session.variable(VAR_TENANT))
        leg = as_uuid(session.uuid)
        raw = await self.redis.get(_pending_key(tenant_id, leg)) if tenant_id and leg else None
        if tenant_id is None or leg is None or not raw:
            log.warning("outbound_leg_unknown", uuid=session.uuid, tenant=(session.variable(VAR_TENANT) or "")[:40])
            await session.hangup("CALL_REJECTED")
            return
        job = _DECODE_JOB.decode(raw)
        call = OutboundCall(self, session, job, as_uuid(session.variable(VAR_NODE)))
        key = (tenant_id, leg)
        self.server.calls[key] = call
        self.server.by_interaction[job.interaction_id] = call
        try:
            await call.run()
        finally:
            if self.server.calls.get(key) is call:
                del self.server.calls[key]
            if self.server.by_interaction.get(job.interaction_id) is call:
                del self.server.by_interaction[job.interaction_id]


class OutboundCall:
    """One placed call from the agent's answer to its end: the customer dialled, then a bridged call."""

    def __init__(self, owner: OutboundCalls, session: OutboundSession, job: DialJob, node_id: uuid.UUID | None) -> None:
        self.owner = owner
        self.s = owner.s
        self.session = session
        self.job = job
        self.channel = CallChannel(session)
        self.line: SwitchLine = SocketLine(self.channel)
        self.record = CallRecord(
            tenant_id=job.tenant_id,
            call_uuid=job.agent_leg,
            node_id=node_id,
            interaction_id=job.interaction_id,
            phase="ringing",
            caller_number=job.destination,
            queue_id=job.queue_id,
            agent_id=job.agent_id,
            agent_leg=job.agent_leg,
            direction="outbound",
            customer_leg=uuid.uuid4(),
            started_ms=int(time.time() * 1000),
        )
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.connected = False
        self.closed = False
        self.log = log.bind(
            tenant_id=str(job.tenant_id), interaction_id=str(job.interaction_id), call=str(job.agent_leg)
        )

    @property
    def customer_leg(self) -> uuid.UUID:
        assert self.record.customer_leg is not None
        return self.record.customer_leg

    async def run(self) -> None:
        pump = asyncio.create_task(self._pump())
        renewing = asyncio.create_task(self.owner._renew(self.job.tenant_id, self.job.agent_leg))
        try:
            await self.s.store.save(self.record)
            await self._dial_customer()
        except CallerGone:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("outbound_call_failed", phase=self.record.phase)
            if not self.connected and not self.channel.down:
                with contextlib.suppress(Exception):
                    await self.channel.hangup("NORMAL_TEMPORARY_FAILURE")
        finally:
            renewing.cancel()
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await self._finish()

    async def _pump(self) -> None:
        async for event in self.session.events():
            if event.name in HANDLED_EVENTS and event.unique_id == self.channel.uuid:
                self.inbox.put_nowait(event)

    def notify(self, message: object) -> None:
        """Hand a message to the call's own task."""
        self.inbox.put_nowait(message)

    def bridged_elsewhere(self) -> None:
        """Nothing to break off: outbound calls are never re-bridged (attended transfers are refused)."""

    def supersede(self) -> None:
        """An outbound call is never handed back through the dialplan's `socket`: nothing to let go."""

    async def _perform(self, operation: Awaitable[T]) -> T:
        """Wait for a switch operation, handling signals, channel events and requests meanwhile."""
        return await perform_while_serving(operation, self.inbox, self._handle)

    async def _handle(self, message: object) -> None:
        try:
            if isinstance(message, Event):
                if message.name == "CHANNEL_BRIDGE" and not self.connected:
                    other = as_uuid(message.get("Bridge-B-Unique-ID") or message.get("Other-Leg-Unique-ID"))
                    if other == self.customer_leg:
                        await self._on_answered()
            elif isinstance(message, RoutingSignal):
                if message.kind == "ended" and not self.closed:
                    self.log.info("interaction_ended_during_call", outcome=message.outcome)
                    self.closed = True
                    await self.channel.hangup()
            elif isinstance(message, CallRequest):
                await self.s.store.answer(message, await carry_out(self, message))
        except CallerGone:
            pass
        except Exception:
            self.log.exception("call_message_failed", message=type(message).__name__)

    async def _music(self) -> str:
        if self.job.queue_id is not None:
            _, audio = await self.s.queue(self.job.tenant_id, self.job.queue_id)
            if audio.music_on_hold:
                return audio.music_on_hold
        return self.s.settings.call_control_default_music

    async def _dial_customer(self) -> None:
        job = self.job
        ring = self.s.settings.outbound_customer_ring_seconds
        await self.channel.set_many(
            {
                "hangup_after_bridge": "true",
                "continue_on_fail": "true",
                "call_timeout": str(ring),
                "effective_caller_id_number": job.caller_id,
                "effective_caller_id_name": job.caller_id,
                "hold_music": await self._music(),
            }
        )
        dial = (
            dial_variables(
                {
                    "origination_uuid": str(self.customer_leg),
                    "origination_caller_id_number": job.caller_id,
                    "origination_caller_id_name": job.caller_id,
                    VAR_DIRECTION: DIRECTION,
                    VAR_TENANT: str(job.tenant_id),
                    VAR_INTERACTION: str(job.interaction_id),
                    VAR_AGENT: str(job.agent_id),
                    VAR_CALL: str(job.agent_leg),
                    "leg_timeout": str(ring),
                }
            )
            + OutboundDecision(True, "allowed", "", destination=job.destination, gateway=job.gateway).dial_string()
        )
        await self.s.store.save(self.record)
        self.log.info("outbound_customer_dialled", gateway=job.gateway, customer_leg=str(self.customer_leg))
        done = await self._perform(self.channel.bridge(dial))
        if not self.connected:
            bridged = as_uuid(done.variable("last_bridge_to") or done.variable("bridge_uuid"))
            if bridged == self.customer_leg and done.variable("originate_disposition") == "SUCCESS":
                await self._on_answered()
        if not self.connected:
            cause = done.variable("originate_disposition") or done.get("Application-Response") or "NO_ANSWER"
            if self.channel.down:
                cause = "ORIGINATOR_CANCEL"
            await self._not_answered(cause)
            return
        # The conversation is over: `hangup_after_bridge` ends the agent's leg (the socket then closes).
        if not self.channel.down:
            await self.channel.hangup()

    async def _on_answered(self) -> None:
        self.connected = True
        record = self.record
        record.phase = "bridged"
        await self.s.store.save(record)
        job = self.job
        if job.purpose == "click_to_call":
            result = await self.s.routing.connect_direct(job.tenant_id, job.interaction_id, job.agent_id)
            if result is None:
                self.log.info("interaction_ended_before_answer")
                self.closed = True
                await self.channel.hangup()
                return
        self.log.info("outbound_call_connected", agent_id=str(job.agent_id), customer_leg=str(self.customer_leg))
        await self.owner._tell(job.tenant_id, job.agent_id, job.interaction_id, "connected")
        if job.queue_id is not None and record.recording_id is None:
            async with tenant_transaction(self.s.sessionmaker, job.tenant_id) as session:
                policy = await recording_policy(session, job.queue_id)
            if policy == "always":
                await start_recording(self.s, record, self.line, on_demand=False)

    async def _not_answered(self, cause: str) -> None:
        job = self.job
        reason = customer_outcome(cause)
        outcome = "callback_failed" if job.purpose == "callback" and reason != "cancelled" else reason
        self.log.warning("outbound_customer_not_answered", cause=cause, outcome=outcome, reason=reason)
        self.closed = True
        await self.s.routing.end_from_channel(
            job.tenant_id,
            job.interaction_id,
            outcome=outcome,
            reason=reason,
            cause=cause,
            destination=job.destination,
            customer_leg=str(self.customer_leg),
        )
        await self.owner._tell(job.tenant_id, job.agent_id, job.interaction_id, "failed", reason)
        if not self.channel.down:
            spoken = SPOKEN.get(reason)
            if spoken:
                with contextlib.suppress(CallerGone):
                    await self._perform(self.channel.play([self.s.tts(spoken, None)]))
            with contextlib.suppress(CallerGone):
                await self.channel.hangup()

    async def _finish(self) -> None:
        job = self.job
        if not self.channel.down and self.connected:
            # An error while bridged: keep the record; its claim lapses and another process adopts the call.
            self.log.warning("call_control_left_live_call", phase=self.record.phase)
            return
        if self.record.recording_id is not None:
            await close_recording(self.s, self.record)
        await self.s.outbound.release(job.tenant_id, job.agent_leg)
        await self.owner.redis.delete(_pending_key(job.tenant_id, job.agent_leg))
        if not self.closed:
            cause = self.session.hangup_event.get("Hangup-Cause") if self.session.hangup_event is not None else None
            try:
                await self.s.routing.end_from_channel(
                    job.tenant_id,
                    job.interaction_id,
                    outcome=None if self.connected else "cancelled",
                    at=utcnow(),
                    hangup_cause=cause,
                    leg_uuid=str(job.agent_leg),
                    destination=job.destination,
                    customer_leg=str(self.customer_leg),
                )
            except Exception:
                self.log.exception("call_end_not_recorded")
        await self.s.store.forget(self.record)
        self.log.info("outbound_call_ended", connected=self.connected)


__all__ = ["DialJob", "OutboundCall", "OutboundCallIn", "OutboundCallOut", "OutboundCalls", "OutboundDesk"]
