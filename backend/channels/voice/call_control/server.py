"""The call-control server: where the dialplan's `socket` application hands each call over.

One per process (`contactcenter call-control`, several processes may share the
address with SO_REUSEPORT, or sit behind a TCP balancer). Besides the outbound
ESL server it runs, in the same event loop:

* the routing-signal listener, which passes each signal to the call it is about;
* the claim renewer: every `call_control_renew_seconds` the leases of all this
  process's calls are pushed forward in one command;
* the sweeper: every `call_control_sweep_seconds` it claims calls whose owner's
  lease lapsed (a dead process) and adopts them (`adoption.py`);
* the request loop: API requests for this process's calls, handed to each call.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from backend.channels.voice.call_control.adoption import AdoptedCall
from backend.channels.voice.call_control.inbound import InboundCall, facts_of
from backend.channels.voice.call_control.outbound_calls import OutboundCall, OutboundCalls
from backend.channels.voice.call_control.records import LEASES, CallReply
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.esl import ClientConfig, OutboundServer, OutboundSession
from backend.channels.voice.legs import VAR_DIRECTION
from backend.lib.tasks import cancel_and_wait
from backend.routing.signals import RoutingSignal, SignalListener

CONTROLLED_EVENTS = frozenset(
    {"CHANNEL_EXECUTE_COMPLETE", "CHANNEL_BRIDGE", "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE"}
)
"""What call control reads of a call's events: its applications' results, bridges and the hang-up. The rest of
`myevents` (each application's start, every state change, DTMF also reported by `play_and_get_digits`...) is
`nixevent`ed: every event carries all the channel's variables, a few kilobytes each."""

log = structlog.get_logger("voice.call_control")

DirectionHandler = Callable[[OutboundSession, CallServices], Awaitable[None]]
"""Controls a call of another direction (seats dialling out are the outbound work's)."""

Controlled = InboundCall | AdoptedCall | OutboundCall


class CallControlServer:
    """Accepts calls from the switch and keeps them under control; adopts calls of processes that died."""

    def __init__(
        self,
        services: CallServices,
        host: str,
        port: int,
        *,
        config: ClientConfig | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.services = services
        self.server = OutboundServer(
            self._accept, host, port, config=config, events=CONTROLLED_EVENTS, reuse_port=reuse_port
        )
        self.handlers: dict[str, DirectionHandler] = {}
        """Handlers for calls of other directions, by `cc_direction` (inbound calls are ours)."""
        self.calls: dict[tuple[uuid.UUID, uuid.UUID], Controlled] = {}
        self.by_interaction: dict[uuid.UUID, Controlled] = {}
        self.listener = SignalListener(services.store.redis, self._on_signal)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        services.spawn = self.spawn
        self.outbound = OutboundCalls(self)
        """Calls placed by agents and callbacks: dialled here, their agent legs controlled here."""
        self.handlers["outbound"] = self.outbound.accept

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        """Listen for routing signals, then for calls; start the renewer, the sweeper and the request loop."""
        await self.listener.start()
        await self.server.start()
        await self.outbound.start()
        self._loops = [
            asyncio.create_task(self._renew_loop(), name="call-control-renew"),
            asyncio.create_task(self._sweep_loop(), name="call-control-sweep"),
            asyncio.create_task(self._request_loop(), name="call-control-requests"),
        ]
        log.info("call_control_listening", port=self.server.port, owner=self.services.store.owner)

    async def close(self) -> None:
        """Stop taking calls. Calls in progress are let go, not hung up: their claims lapse and another
        process (or the dialplan's second `socket`) takes them over."""
        await cancel_and_wait(*self._loops)
        await self.outbound.close()
        await self.server.close()
        await self.listener.stop()
        await cancel_and_wait(*self._tasks)

    async def __aenter__(self) -> CallControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that outlives a call in this server's task set."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- calls --------------------------------------------------------------------------------------

    async def _accept(self, session: OutboundSession) -> None:
        direction = session.variable(VAR_DIRECTION) or ""
        if direction != "inbound":
            handler = self.handlers.get(direction)
            if handler is None:
                log.warning("call_control_no_handler", uuid=session.uuid, direction=direction[:20])
                await session.hangup("NORMAL_TEMPORARY_FAILURE")
                return
            await handler(session, self.services)
            return
        facts = facts_of(session)
        if facts is None:
            await session.hangup("CALL_REJECTED")
            return
        record = await self.services.store.load(facts.tenant_id, facts.call_uuid)
        call = InboundCall(self.services, session, facts, record)
        call.bind_interaction = self._bind
        key = (facts.tenant_id, facts.call_uuid)
        previous = self.calls.get(key)
        if previous is not None:
            # The channel came back through the dialplan's next `socket` (its bridge ended without hanging it up):
            # whoever followed it here lets go.
            previous.supersede()
        self.calls[key] = call
        if record is not None and record.interaction_id is not None:
            self.by_interaction[record.interaction_id] = call
        try:
            await call.run()
        finally:
            if self.calls.get(key) is call:
                del self.calls[key]
            if call.record.interaction_id is not None and self.by_interaction.get(call.record.interaction_id) is call:
                del self.by_interaction[call.record.interaction_id]
            del previous

    def _bind(self, interaction_id: uuid.UUID, call: InboundCall) -> None:
        self.by_interaction[interaction_id] = call

    async def _on_signal(self, signal: RoutingSignal) -> None:
        call = self.by_interaction.get(signal.interaction_id)
        if call is not None and call.record.tenant_id == signal.tenant_id:
            call.inbox.put_nowait(signal)
        elif call is None:
            await self.outbound.on_signal(signal)

    # --- claims, adoption, requests -----------------------------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.services.settings.call_control_renew_seconds)
            try:
                await self.services.store.renew(list(self.calls))
            except Exception:
                log.warning("call_claims_not_renewed", calls=len(self.calls), exc_info=True)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.services.settings.call_control_sweep_seconds)
            try:
                await self.sweep()
            except Exception:
                log.warning("call_sweep_failed", exc_info=True)

    async def sweep(self) -> int:
        """Claim and adopt the calls whose controlling process stopped renewing its claims."""
        adopted = 0
        store = self.services.store
        for tenant_id, call_uuid in await store.claim_lapsed():
            if (tenant_id, call_uuid) in self.calls:
                continue
            record = await store.load(tenant_id, call_uuid)
            if record is None or record.node_id is None:
                if record is not None:
                    await store.forget(record)
                else:
                    await store.redis.zrem(LEASES, f"{tenant_id}|{call_uuid}")
                continue
            call = AdoptedCall(self.services, record)
            key = (tenant_id, call_uuid)
            self.calls[key] = call
            if record.interaction_id is not None:
                self.by_interaction[record.interaction_id] = call
            self.spawn(self._follow(key, call))
            adopted += 1
        return adopted

    async def _follow(self, key: tuple[uuid.UUID, uuid.UUID], call: AdoptedCall) -> None:
        try:
            await call.run()
        except Exception:
            call.log.exception("adopted_call_failed")
        finally:
            if self.calls.get(key) is call:
                del self.calls[key]
            if call.record.interaction_id is not None and self.by_interaction.get(call.record.interaction_id) is call:
                del self.by_interaction[call.record.interaction_id]

    async def _request_loop(self) -> None:
        store = self.services.store
        while True:
            try:
                request = await store.next_request(1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("call_requests_unreadable", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if request is None:
                continue
            if request.deadline < time.time():
                log.info("call_request_expired", operation=request.operation, call=str(request.call_uuid))
                continue
            call = self.calls.get((request.tenant_id, request.call_uuid))
            if call is None:
                await store.answer(request, CallReply(False, 409, "The call is not controlled here any more", "moved"))
                continue
            call.inbox.put_nowait(request)
