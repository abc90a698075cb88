"""Routing signals: what routing just did to an interaction, published for the channel that carries the contact.

Routing is channel-agnostic: it offers an interaction to agents and tells the
agents (the hub). A channel that holds the customer itself, the voice channel's
call control above all, must also learn that the call it holds was offered
(bridge it), that an offer ended unanswered (stop ringing that agent), that the
interaction moved queue or ended (overflow, a supervisor). Every step of the
engine that changes what the channel should do publishes one small message on a
Redis pub/sub channel, after the durable write; each process that holds
contacts subscribes once and picks the messages of its own interactions.

Pub/sub delivers at most once: a process that was cut off from Redis for a
moment misses signals. Listeners therefore also ask the engine for the current
offer of the interactions they hold (`RoutingEngine.current_offer`) from time to
time; a signal only makes the reaction immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import structlog
from redis.asyncio import Redis

from backend.lib.redis_keys import global_key
from backend.lib.tasks import cancel_and_wait

log = structlog.get_logger("routing.signals")

SIGNAL_CHANNEL = global_key("routing", "signals")
"""The pub/sub channel routing signals travel on (one for the deployment: a process picks its own)."""

SignalKind = Literal["offered", "offer_ended", "connected", "queued", "ended"]


class RoutingSignal(msgspec.Struct, frozen=True, omit_defaults=True):
    """One step routing took for an interaction.

    * `offered`: it rings `agents` (several for ring-all) for `timeout_ms`.
    * `offer_ended`: the offer to `agents` ended without an answer (declined, timed out); `reason` says which.
    * `connected`: `agents[0]` took it.
    * `queued`: it waits in `queue_id` (again, or in another queue after an overflow or a transfer).
    * `ended`: it is over with `outcome`; `action` is the queue's overflow, closed or no-agent action, if any.
    """

    tenant_id: uuid.UUID
    interaction_id: uuid.UUID
    kind: SignalKind
    agents: tuple[uuid.UUID, ...] = ()
    timeout_ms: int = 0
    queue_id: uuid.UUID | None = None
    outcome: str | None = None
    reason: str | None = None
    action: dict[str, Any] | None = None
    at_ms: int = 0
    channel: str | None = None
    """The interaction's channel, where the step knows it (`connected` from an agent's acceptance)."""


_ENCODE = msgspec.json.Encoder()
_DECODE = msgspec.json.Decoder(RoutingSignal)


class SignalPublisher:
    """Publishes routing signals; a failure to publish is logged, never raised (routing has already moved)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def publish(self, signal: RoutingSignal) -> None:
        """Send one signal to every subscribed process."""
        if not signal.at_ms:
            signal = msgspec.structs.replace(signal, at_ms=int(time.time() * 1000))
        try:
            await self.redis.publish(SIGNAL_CHANNEL, _ENCODE.encode(signal))
        except Exception:
            log.warning(
                "routing_signal_not_published",
                interaction_id=str(signal.interaction_id),
                kind=signal.kind,
                exc_info=True,
            )


SignalHandler = Callable[[RoutingSignal], Awaitable[None]]


class SignalListener:
    """Subscribes to routing signals (reconnecting after Redis errors) and hands each to `handler`.

    The handler runs in the listener's task, one signal after the other: it should only note
    the signal and wake whoever waits for it.
    """

    def __init__(self, redis: Redis, handler: SignalHandler, *, retry_seconds: float = 1.0) -> None:
        self.redis = redis
        self.handler = handler
        self.retry_seconds = retry_seconds
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe and return once the subscription is in place (signals published after it are seen)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="routing-signals")
        async with asyncio.timeout(10):
            await self._subscribed.wait()

    async def stop(self) -> None:
        """Unsubscribe."""
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(SIGNAL_CHANNEL)
                self._subscribed.set()
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        signal = _DECODE.decode(message["data"])
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        log.warning("routing_signal_unreadable")
                        continue
                    try:
                        await self.handler(signal)
                    except Exception:
                        log.exception("routing_signal_handler_failed", interaction_id=str(signal.interaction_id))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            except Exception:
                # Redis went away: signals are missed meanwhile; listeners poll the current offer too.
                log.warning("routing_signals_lost", exc_info=True)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                await asyncio.sleep(self.retry_seconds)
