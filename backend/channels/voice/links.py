"""The switch nodes' inbound event sockets: each held by exactly one process at a time, under a lease in Redis.

Every worker process runs a `SwitchLinks`. It reads the registered nodes (again every
`switch_nodes_refresh_seconds`, so nodes that operators add, change or remove are followed
without a restart) and competes for each node's lease, `SET <lease> <token> NX PX <ttl>`.
The winner holds a `NodeLink`: it opens the node's event socket (`InboundClient`),
subscribes to `SUBSCRIBED_EVENTS` in json, re-reads the node's channels and registrations
after every (re)connection, and feeds every event, in order, to
`VoiceSwitchboard.handle_event`. It also runs the commands other processes queue for the
node (`commands.py`). This is the only module of the backend that speaks ESL to the
nodes' inbound sockets; the switchboard's services never see the library.

The lease is renewed every `esl_lease_renew_seconds` by a script that extends it only
while it still carries our token. A holder counts itself the holder only until the start
of its last confirmed renewal plus the lease time, less a margin: even a holder cut off
from Redis stops before anyone else can have taken over, so there are never two holders
at once. Losing the lease (a renewal refused, or none confirmed in time) stops the event
consumer and the command runner at once and closes the socket. A clean shutdown applies
what is already received, then releases the lease, so another process takes over within
one poll; a holder that dies is replaced once its lease expires, within
`esl_lease_ttl_seconds` plus one `esl_lease_poll_seconds`.

Leases are spread: a process takes free leases up to its fair share of the nodes (nodes
divided by live processes), and beyond it only a lease that stayed free for two polls,
so that no node is ever left without a holder; a process holding more than its share
(another one started later) gives its newest node up every `esl_rebalance_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from backend.channels.voice.commands import (
    REPLY_GRACE_SECONDS,
    CommandReply,
    CommandRequest,
    decode_request,
    encode_reply,
    lease_key,
    reply_key,
    requests_key,
    status_key,
)
from backend.channels.voice.esl import (
    CommandError,
    ESLError,
    Event,
    InboundClient,
    NotConnected,
    RefusedError,
    Timeout,
    TransportError,
)
from backend.channels.voice.esl_config import client_config
from backend.channels.voice.nodes import EslTarget
from backend.channels.voice.registrations import REGISTRATION_EVENTS
from backend.channels.voice.service import SUBSCRIBED_EVENTS, VoiceSwitchboard
from backend.config import Settings
from backend.db.base import utcnow
from backend.lib.redis_keys import global_key
from backend.lib.tasks import cancel_and_wait

log = structlog.get_logger("voice.links")
T = TypeVar("T")

HOLDERS_KEY = global_key("esl", "holders")
"""Sorted set of the live `SwitchLinks` processes (member: token, score: last seen), for the fair share."""
LEASE_MARGIN = 0.1
"""The holder stops this fraction of the lease time before its lease could expire."""
LAG_LOG_EVERY_SECONDS = 10.0
LANE_DEPTH = 64
"""Events waiting per lane before the consumer stops taking more from the ESL buffer (which never blocks)."""
_USED_EVENTS = frozenset(name for name in SUBSCRIBED_EVENTS if name != "CUSTOM" and "::" not in name)
# Connection trouble, shutdown and start-up, resources, serialisation failures and deadlocks; and unique
# violations, which a concurrent first writer causes and a retry resolves (the row is there by then).
_TRANSIENT_SQLSTATES = ("08", "57P", "53", "40001", "40P01", "23505")

RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""


def transient(error: BaseException) -> bool:
    """Whether an error is the database's or Redis's passing trouble (worth retrying), not a bad event or a bug."""
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, (OSError, TimeoutError, RedisError)):
            return True
        module = type(seen).__module__
        name = type(seen).__name__
        if module.startswith("sqlalchemy") and name in {"OperationalError", "InterfaceError", "TimeoutError"}:
            return True
        if getattr(seen, "connection_invalidated", False):
            return True
        if module.startswith("asyncpg") and name in {"InterfaceError", "ConnectionDoesNotExistError"}:
            return True
        sqlstate = getattr(seen, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_TRANSIENT_SQLSTATES):
            return True
        seen = getattr(seen, "orig", None) or seen.__cause__
    return False


def order_key(event: Event) -> str:
    """What must be applied in order: one leg's events, one seat's registrations; heartbeats among themselves."""
    leg = event.unique_id
    if leg:
        return leg
    if event.name == "CUSTOM":
        user = event.get("username") or event.get("user") or event.get("from-user") or ""
        realm = event.get("realm") or event.get("domain_name") or event.get("host") or event.get("from-host") or ""
        return f"{user}@{realm}".lower()
    return event.name


def node_patterns(value: str) -> list[str]:
    """`CC_ESL_NODES` as a list of shell patterns (empty: every node)."""
    return [part.strip() for part in value.split(",") if part.strip()]


class NodeLease:
    """The Redis lease on one node's inbound event socket."""

    def __init__(self, redis: Redis, node_id: uuid.UUID, token: str, ttl_seconds: float) -> None:
        self.redis = redis
        self.node_id = node_id
        self.token = token
        self.ttl_seconds = ttl_seconds
        self.key = lease_key(node_id)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl_seconds * 1000))

    def _valid_until(self, started: float) -> float:
        # Redis starts the expiry when it receives the command, after `started`: stopping before
        # started + ttl (less a margin) stops before the key can have expired.
        return started + self.ttl_seconds * (1 - LEASE_MARGIN)

    async def acquire(self) -> float | None:
        """Take the lease if it is free; returns until when (monotonic) we hold it, or None."""
        started = time.monotonic()
        taken = await self.redis.set(self.key, self.token, nx=True, px=self._ttl_ms)
        return self._valid_until(started) if taken else None

    async def renew(self) -> float | None:
        """Extend the lease if it is still ours; returns the new validity, or None when it is not ours any more."""
        started = time.monotonic()
        renewed = await self._renew(keys=[self.key], args=[self.token, self._ttl_ms])
        return self._valid_until(started) if renewed else None

    async def release(self) -> bool:
        """Give the lease up (and the node's status record) if it is still ours."""
        return bool(await self._release(keys=[self.key, status_key(self.node_id)], args=[self.token]))

    async def holder(self) -> str | None:
        """The token of whoever holds it now."""
        value = await self.redis.get(self.key)
        return str(value) if value is not None else None


@dataclass
class LinkStats:
    """What one link has done since it was taken."""

    events: int = 0
    failed: int = 0
    retried: int = 0
    ignored: int = 0
    resyncs: int = 0
    commands: int = 0
    lag_seconds: float | None = None
    unknown: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The node's own state, read right after a (re)connection, and where in the event stream it was read."""

    position: int
    channels: list[str]
    registrations: list[dict[str, Any]]


def _rows(body: object) -> list[dict[str, Any]]:
    # FreeSWITCH leaves `rows` out when there are none: {"row_count":0}.
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    rows = body.get("rows", [])
    if not isinstance(rows, list):
        raise ValueError("`rows` is not a list")
    return [row for row in rows if isinstance(row, dict)]


class NodeLink:
    """One node held by this process: its event socket, the ordered event consumer, and the command runner."""

    def __init__(
        self,
        target: EslTarget,
        lease: NodeLease,
        valid_until: float,
        switchboard: VoiceSwitchboard,
        redis: Redis,
        settings: Settings,
        *,
        on_lost: Callable[[NodeLink], None] | None = None,
    ) -> None:
        self.target = target
        self.node_id = target.id
        self.lease = lease
        self.valid_until = valid_until
        self.switchboard = switchboard
        self.redis = redis
        self.settings = settings
        self.stats = LinkStats()
        self.holding = True
        self.taken_at = time.time()
        self.connected_at: float | None = None
        self._on_lost = on_lost
        self.client = InboundClient(
            target.host,
            target.port,
            target.password,
            config=client_config(settings),
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            on_events_lost=self._events_lost,
            on_event=self._received,
            name=f"switch {target.name}",
            events=SUBSCRIBED_EVENTS,
        )
        self._apply_lock = asyncio.Lock()
        self._dispatched = 0
        lanes = max(1, settings.switch_event_lanes)
        self._lanes: list[asyncio.Queue[Event]] = [asyncio.Queue() for _ in range(lanes)]
        self._room = asyncio.Semaphore(lanes * LANE_DEPTH)
        self._pending: Snapshot | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._commands: set[asyncio.Task[None]] = set()
        self._command_slots = asyncio.Semaphore(max(1, settings.switch_command_concurrency))
        self._last_lag_log = 0.0
        self._last_snapshot_at = 0.0
        self._reported_error: str | None = None
        self._stopping = False
        self._heartbeat: tuple[datetime, Event] | None = None
        self._heartbeat_writer: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def valid(self) -> bool:
        """Whether this process may still act as the node's holder."""
        return self.holding and time.monotonic() < self.valid_until

    # ----- lifecycle -----

    async def start(self) -> None:
        """Connect in the background (reconnecting with back-off) and start consuming, renewing and serving."""
        await self.client.start(wait=False)
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"esl-events-{self.name}"),
            asyncio.create_task(self._keep_lease(), name=f"esl-lease-{self.name}"),
            asyncio.create_task(self._serve_commands(), name=f"esl-commands-{self.name}"),
            *(
                asyncio.create_task(self._run_lane(lane), name=f"esl-lane-{self.name}-{index}")
                for index, lane in enumerate(self._lanes)
            ),
        ]
        await self._publish_status()
        log.info("switch_link_taken", node=self.name, node_id=str(self.node_id), holder=self.lease.token)

    async def stop(self, *, release: bool = True, reason: str = "shutdown") -> None:
        """Stop cleanly: no more commands, close the socket, apply what was received, then release the lease."""
        if self._stopping:
            return
        self._stopping = True
        started: list[asyncio.Task[None] | None] = [*self._tasks] or [None, None, None]
        consumer, keeper, server, *lanes = started
        await self._cancel(server)
        await self._cancel(self._resync_task)
        await self.client.close()  # ends events() once the buffer is drained
        if consumer is not None:
            try:
                async with asyncio.timeout(max(0.0, self.valid_until - time.monotonic())):
                    await consumer
            except TimeoutError:
                log.error(
                    "switch_link_stopped_behind",
                    node=self.name,
                    unapplied=self.client.pending_events + sum(lane.qsize() for lane in self._lanes),
                    detail="the next holder re-reads the node's channels and registrations",
                )
                await self._cancel(consumer)
        for lane_task in lanes:
            await self._cancel(lane_task)
        await self._cancel(self._heartbeat_writer)
        await self._cancel(keeper)
        for task in list(self._commands):
            await self._cancel(task)
        if release and self.holding:
            with contextlib.suppress(RedisError, OSError):
                await self.lease.release()
        self.holding = False
        log.info("switch_link_released", node=self.name, reason=reason, events=self.stats.events)

    async def _lose(self, reason: str) -> None:
        """The lease is no longer ours: stop acting at once, then close the socket."""
        if not self.holding:
            return
        self.holding = False
        self._stopping = True
        log.warning("switch_link_lost", node=self.name, node_id=str(self.node_id), reason=reason)
        current = asyncio.current_task()
        for task in [*self._tasks, self._resync_task, self._heartbeat_writer, *self._commands]:
            if task is not None and task is not current:
                task.cancel()
        await self.client.close()
        if self._on_lost is not None:
            self._on_lost(self)

    @staticmethod
    async def _cancel(task: asyncio.Task[None] | None) -> None:
        await cancel_and_wait(task)

    # ----- the lease -----

    async def _keep_lease(self) -> None:
        renew_every = self.settings.esl_lease_renew_seconds
        while True:
            await asyncio.sleep(max(0.0, min(renew_every, self.valid_until - time.monotonic())))
            if time.monotonic() >= self.valid_until:
                await self._lose("the lease could not be renewed in time")
                return
            try:
                async with asyncio.timeout(max(0.01, self.valid_until - time.monotonic())):
                    renewed = await self.lease.renew()
            except (TimeoutError, RedisError, OSError) as error:
                log.warning("switch_lease_renewal_failed", node=self.name, error=str(error) or type(error).__name__)
                continue
            if renewed is None:
                await self._lose("another process holds the lease")
                return
            self.valid_until = renewed
            await self._publish_status()

    async def _publish_status(self) -> None:
        """Tell operators who holds the node and how its connection is (at each renewal and each change)."""
        if not self.valid():
            return
        try:
            await self._write_status()
        except (RedisError, OSError) as error:
            log.warning("switch_link_status_unwritten", node=self.name, error=str(error))

    async def _write_status(self) -> None:
        connected = self.client.connected
        error = None if connected else self.client.last_error
        error_text = f"{type(error).__name__}: {error}" if error is not None else ""
        if error_text != (self._reported_error or "") and not connected:
            # One clear line per change of trouble; the library also logs each failed attempt.
            level = log.error if isinstance(error, RefusedError) else log.warning
            level("switch_link_unhealthy", node=self.name, node_id=str(self.node_id), error=error_text or "connecting")
        self._reported_error = error_text or None
        lag = self.stats.lag_seconds
        mapping = {
            "holder": self.lease.token,
            "connected": "1" if connected else "0",
            "since": f"{self.connected_at:.3f}" if connected and self.connected_at else "",
            "error": error_text,
            "events": str(self.stats.events),
            "dropped": str(self.client.dropped_events),
            "failed": str(self.stats.failed),
            "lag_ms": f"{lag * 1000:.1f}" if lag is not None else "",
            "updated_at": f"{time.time():.3f}",
        }
        key = status_key(self.node_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)  # type: ignore[arg-type]
            pipe.pexpire(key, int(self.settings.esl_lease_ttl_seconds * 2000))
            await pipe.execute()

    # ----- connection and resynchronisation -----

    async def _on_connect(self, client: InboundClient) -> None:
        """Runs after each (re)connection, before the client counts as connected: re-read the node's truth."""
        self.connected_at = time.time()
        log.info("switch_link_connected", node=self.name, connections=client.connections)
        try:
            await self._take_snapshot(client)
        except Exception as error:
            log.error("switch_link_resync_failed", node=self.name, error=str(error) or type(error).__name__)
            self._schedule_resync()
        await self._publish_status()

    async def _on_disconnect(self, reason: BaseException | None) -> None:
        self.connected_at = None
        log.warning("switch_link_disconnected", node=self.name, reason=str(reason))
        await self._publish_status()

    def _received(self, event: Event) -> None:
        """A node's liveness is when its HEARTBEAT arrived, not when a busy consumer got to it: with a backlog in
        the lanes, a heartbeat applied in turn would arrive late and the watchdog would fail a live node over."""
        if event.name != "HEARTBEAT" or not self.valid():
            return
        self._heartbeat = (utcnow(), event)
        if self._heartbeat_writer is None or self._heartbeat_writer.done():
            self._heartbeat_writer = asyncio.create_task(self._write_heartbeats(), name=f"esl-heartbeat-{self.name}")

    async def _write_heartbeats(self) -> None:
        # Heartbeats that arrive while one is written are folded into the next write (the latest wins).
        while self._heartbeat is not None and self.valid():
            received_at, event = self._heartbeat
            self._heartbeat = None
            await self._with_retries(event.name, functools.partial(self._heartbeat_at, received_at, event), event)

    async def _heartbeat_at(self, received_at: datetime, event: Event) -> None:
        await self.switchboard.handle_event(self.node_id, event.headers.by_name, received_at=received_at)

    def _events_lost(self, dropped: int) -> None:
        if dropped == 1 or dropped % 1000 == 0:
            log.error(
                "switch_events_dropped",
                node=self.name,
                dropped=dropped,
                detail="the consumer fell behind; the node's state is re-read",
            )
        # While the consumer stays behind, re-reading the node every time an event is dropped would only
        # put it further behind: at most one re-read per `esl_resync_min_seconds`.
        since = time.monotonic() - self._last_snapshot_at
        self._schedule_resync(max(self.settings.esl_lease_poll_seconds, self.settings.esl_resync_min_seconds - since))

    def _schedule_resync(self, delay: float = 0.0) -> None:
        if self._resync_task is not None and not self._resync_task.done():
            return
        if self._stopping:
            return

        async def later() -> None:
            await asyncio.sleep(delay or self.settings.esl_lease_poll_seconds)
            try:
                await self._take_snapshot(self.client)
            except (ESLError, ValueError) as error:
                log.warning("switch_link_resync_failed", node=self.name, error=str(error))
                if not isinstance(error, NotConnected):
                    self._resync_task = None
                    self._schedule_resync(self.settings.esl_reconnect_max_seconds)
            except Exception:
                log.exception("switch_link_resync_failed", node=self.name)

        self._resync_task = asyncio.create_task(later(), name=f"esl-resync-{self.name}")

    async def _take_snapshot(self, client: InboundClient) -> None:
        self._last_snapshot_at = time.monotonic()
        channels_answer = await client.api("show channels as json")
        channels = _rows(channels_answer.json())
        registrations = _rows((await client.api("show registrations as json")).json())
        # The events the node sent before it answered the first command happened before the snapshot: they are
        # applied first, the rest after it (re-applying a registration the later list already has is harmless).
        # Counted when the answer was read: events of the same read that follow it happened after.
        position = channels_answer.events_before
        if position is None:  # answered by a command/reply: the switch refused the command
            raise ValueError(f"show channels refused: {channels_answer.text[:120]}")
        self._pending = Snapshot(position, [str(row.get("uuid", "")) for row in channels], registrations)
        async with self._apply_lock:
            if self._pending is not None and self._dispatched >= self._pending.position:
                await self._drain_lanes()
                await self._apply_snapshot()

    async def _apply_snapshot(self) -> None:
        snapshot = self._pending
        self._pending = None
        if snapshot is None:
            return
        self.stats.resyncs += 1
        try:
            dropped = await self._with_retries(
                "resync", lambda: self.switchboard.reconcile_channels(self.node_id, snapshot.channels)
            )
            changes = await self._with_retries(
                "resync",
                lambda: self.switchboard.reconcile_registrations(self.node_id, snapshot.registrations),
            )
            # Connected and answering: a sign of life, as good as a heartbeat.
            await self._with_retries("resync", lambda: self.switchboard.heartbeat(self.node_id))
        except Exception as error:
            log.error("switch_link_resync_failed", node=self.name, error=str(error) or type(error).__name__)
            self._schedule_resync(self.settings.esl_reconnect_max_seconds)
            return
        log.info(
            "switch_link_resynchronised",
            node=self.name,
            channels=len(snapshot.channels),
            legs_dropped=len(dropped or []),
            registrations=len(snapshot.registrations),
            agents_changed=len(changes or []),
        )

    # ----- events -----

    async def _consume(self) -> None:
        """Take events in the node's order and hand each to its lane; a snapshot waits for what came before it."""
        async for event in self.client.events():
            if not self.valid():
                return  # the lease is going: the keeper closes the link
            async with self._apply_lock:
                try:
                    await self._dispatch(event)
                finally:
                    self._dispatched += 1
                if self._pending is not None and self._dispatched >= self._pending.position:
                    await self._drain_lanes()
                    await self._apply_snapshot()
        await self._drain_lanes()

    async def _dispatch(self, event: Event) -> None:
        name = event.name
        if name == "HEARTBEAT":
            return  # written as it arrived (`_received`)
        if name not in _USED_EVENTS and not (name == "CUSTOM" and event.subclass in REGISTRATION_EVENTS):
            self.stats.ignored += 1
            if name == "BACKGROUND_JOB":
                return  # another connection's job: FreeSWITCH sends job results to every subscriber
            label = f"{name}/{event.subclass}" if event.subclass else name or "(no Event-Name)"
            if label not in self.stats.unknown:
                self.stats.unknown.add(label)
                log.warning("switch_event_unknown", node=self.name, event_name=label[:80], detail="ignored")
            return
        await self._room.acquire()  # at most lanes x depth events in flight: beyond, the ESL buffer waits
        self._lanes[hash(order_key(event)) % len(self._lanes)].put_nowait(event)

    async def _run_lane(self, lane: asyncio.Queue[Event]) -> None:
        while True:
            event = await lane.get()
            try:
                await self._apply(event)
            finally:
                lane.task_done()
                self._room.release()

    async def _drain_lanes(self) -> None:
        """Wait until every event handed to a lane is applied."""
        for lane in self._lanes:
            await lane.join()

    async def _apply(self, event: Event) -> None:
        self._measure_lag(event)
        # The switchboard reads headers by their exact names, arrays as lists: the shape `event json` has.
        headers: Mapping[str, Any] = event.headers.by_name
        await self._with_retries(event.name, lambda: self.switchboard.handle_event(self.node_id, headers), event)

    def _measure_lag(self, event: Event) -> None:
        stamp = event.get("Event-Date-Timestamp")
        if not stamp or not stamp.isdigit():
            return
        lag = time.time() - int(stamp) / 1_000_000
        self.stats.lag_seconds = lag
        if lag > self.settings.switch_event_lag_warning_seconds:
            now = time.monotonic()
            if now - self._last_lag_log > LAG_LOG_EVERY_SECONDS:
                self._last_lag_log = now
                log.warning(
                    "switch_events_behind",
                    node=self.name,
                    lag_ms=round(lag * 1000),
                    pending=self.client.pending_events,
                )

    async def _with_retries(self, what: str, work: Callable[[], Awaitable[T]], event: Event | None = None) -> T | None:
        """Run `work`; transient database or Redis errors are retried with back-off, others logged, never raised."""
        attempt = 0
        while True:
            try:
                result = await work()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                detail = {
                    "node": self.name,
                    "event_name": what,
                    "leg": event.unique_id if event is not None else None,
                    "error": str(error)[:300] or type(error).__name__,
                }
                if transient(error) and attempt < self.settings.switch_event_retries:
                    delay = self.settings.switch_event_retry_seconds * 2**attempt
                    attempt += 1
                    self.stats.retried += 1
                    log.warning("switch_event_retry", attempt=attempt, delay=delay, **detail)
                    await asyncio.sleep(delay)
                    continue
                if event is None:
                    raise
                self.stats.failed += 1
                log.error(
                    "switch_event_failed",
                    transient=transient(error),
                    attempts=attempt + 1,
                    exc_info=not transient(error),
                    **detail,
                )
                return None
            if event is not None:
                self.stats.events += 1
            return result

    # ----- commands from other processes -----

    async def _serve_commands(self) -> None:
        key = requests_key(self.node_id)
        while self.valid():
            try:
                found = await self.redis.blpop([key], timeout=1)
            except (RedisError, OSError) as error:
                log.warning("switch_commands_unreadable", node=self.name, error=str(error))
                await asyncio.sleep(self.settings.esl_lease_poll_seconds)
                continue
            if found is None:
                continue
            raw = found[1]
            if not self.valid():
                # Popped just as the lease went: put it back at the head for the next holder.
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.lpush(key, raw)
                return
            try:
                request = decode_request(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                log.warning("switch_command_garbled", node=self.name, error=str(error)[:200])
                continue
            task = asyncio.create_task(self._run_command(request), name=f"esl-command-{request.id}")
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _answer(self, request: CommandRequest, reply: CommandReply) -> None:
        key = reply_key(self.node_id, request.id)
        expires = max(request.deadline, request.job_deadline) - time.time() + REPLY_GRACE_SECONDS
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, encode_reply(reply))
                pipe.pexpire(key, max(1000, int(expires * 1000)))
                await pipe.execute()
        except (RedisError, OSError) as error:
            log.error("switch_command_unanswered", node=self.name, request=request.id, error=str(error))

    async def _run_command(self, request: CommandRequest) -> None:
        holder = self.lease.token
        async with self._command_slots:
            self.stats.commands += 1
            now = time.time()
            if now > request.deadline:
                log.warning(
                    "switch_command_expired",
                    node=self.name,
                    kind=request.kind,
                    command=request.command[:80],
                    late_by=round(now - request.deadline, 3),
                )
                await self._answer(request, CommandReply("error", error="expired", holder=holder))
                return
            try:
                if request.kind == "api":
                    response = await self.client.api(request.command, timeout=max(0.1, request.deadline - now))
                    await self._answer(request, CommandReply("done", ok=response.ok, body=response.body, holder=holder))
                    return
                try:
                    job = await self.client.bgapi(request.command, job_uuid=request.job_uuid)
                except CommandError as refused:
                    await self._answer(request, CommandReply("done", ok=False, body=refused.reply, holder=holder))
                    return
                await self._answer(request, CommandReply("accepted", ok=True, holder=holder))
                result = await job.result(timeout=max(0.1, request.job_deadline - time.time()))
                await self._answer(request, CommandReply("done", ok=result.ok, body=result.body, holder=holder))
            except NotConnected as error:
                await self._answer(
                    request, CommandReply("error", error="not_connected", body=str(error), holder=holder)
                )
            except ValueError as error:
                await self._answer(request, CommandReply("error", error="invalid", body=str(error), holder=holder))
            except Timeout as error:
                await self._answer(request, CommandReply("error", error="timeout", body=str(error), holder=holder))
            except (TransportError, ESLError) as error:
                await self._answer(
                    request, CommandReply("error", error="connection_lost", body=str(error), holder=holder)
                )


class SwitchLinks:
    """This process's share of the switch nodes' inbound event sockets (run by every worker)."""

    def __init__(
        self,
        switchboard: VoiceSwitchboard,
        redis: Redis,
        settings: Settings,
        *,
        token: str | None = None,
    ) -> None:
        self.switchboard = switchboard
        self.redis = redis
        self.settings = settings
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.patterns = node_patterns(settings.esl_node_pattern)
        self.links: dict[uuid.UUID, NodeLink] = {}
        self._targets: dict[uuid.UUID, EslTarget] = {}
        self._refresh_at = 0.0
        self._free_since: dict[uuid.UUID, float] = {}
        self._last_rebalance = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wake = asyncio.Event()

    def mine(self, target: EslTarget) -> bool:
        """Whether this process may hold the node (`CC_ESL_NODES`)."""
        return not self.patterns or any(fnmatch.fnmatchcase(target.name, p) for p in self.patterns)

    async def start(self) -> None:
        """Compete for leases in the background until `stop()`."""
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="switch-links")
            log.info("switch_links_started", holder=self.token, nodes=",".join(self.patterns) or "*")

    async def stop(self) -> None:
        """Give every node up cleanly (their leases released, so others take over within a poll)."""
        # The flag as well as the cancellation: a library call in the pass (seen on Python 3.11) can swallow
        # a CancelledError, and the loop must end all the same rather than keep stop() waiting for ever.
        self._closing = True
        self._wake.set()
        await cancel_and_wait(self._task)
        self._task = None
        links = list(self.links.values())
        self.links.clear()
        await asyncio.gather(*(link.stop(release=True) for link in links), return_exceptions=True)
        with contextlib.suppress(RedisError, OSError):
            await self.redis.zrem(HOLDERS_KEY, self.token)

    def refresh_soon(self) -> None:
        """Re-read the registered nodes at the next pass (after an operator changed one)."""
        self._refresh_at = 0.0
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.error("switch_links_pass_failed", error=str(error) or type(error).__name__, exc_info=True)
            if self._closing:
                return
            self._wake.clear()
            # asyncio.wait, not asyncio.timeout: on Python 3.11 a cancellation arriving as the timeout fires
            # is turned into TimeoutError, and suppressing it would lose the cancellation (stop() then hangs).
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.settings.esl_lease_poll_seconds)
            finally:
                waiter.cancel()

    async def run_once(self) -> None:
        """One pass: follow the registered nodes, drop links of nodes gone or changed, take free leases."""
        now = time.monotonic()
        if now >= self._refresh_at:
            self._targets = {t.id: t for t in await self.switchboard.esl_targets() if self.mine(t)}
            self._refresh_at = now + self.settings.switch_nodes_refresh_seconds
        for node_id, link in list(self.links.items()):
            target = self._targets.get(node_id)
            if target != link.target:
                self.links.pop(node_id, None)
                reason = "the node was removed" if target is None else "the node's event socket changed"
                await link.stop(release=True, reason=reason)
        live = await self._live_holders()
        share = math.ceil(len(self._targets) / max(1, live))
        await self._rebalance(share)
        free = [t for t in self._targets.values() if t.id not in self.links]
        random.shuffle(free)
        for target in free:
            if len(self.links) >= share and not await self._left_free(target.id):
                continue
            lease = NodeLease(self.redis, target.id, self.token, self.settings.esl_lease_ttl_seconds)
            valid_until = await lease.acquire()
            if valid_until is None:
                self._free_since.pop(target.id, None)
                continue
            self._free_since.pop(target.id, None)
            link = NodeLink(
                target, lease, valid_until, self.switchboard, self.redis, self.settings, on_lost=self._forget
            )
            self.links[target.id] = link
            await link.start()

    async def _rebalance(self, share: int) -> None:
        """More nodes than our share (another process started since): give the newest one up, now and then."""
        every = self.settings.esl_rebalance_seconds
        if every <= 0 or len(self.links) <= share or time.monotonic() - self._last_rebalance < every:
            return
        self._last_rebalance = time.monotonic()
        newest = max(self.links.values(), key=lambda link: link.taken_at)
        self.links.pop(newest.node_id, None)
        log.info("switch_link_rebalanced", node=newest.name, held=len(self.links), share=share)
        # Released cleanly; over our share we take it back only if nobody else does for two polls.
        await newest.stop(release=True, reason="this process holds more than its share of the nodes")

    async def _live_holders(self) -> int:
        now = time.time()
        stale = now - 3 * self.settings.esl_lease_ttl_seconds
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(HOLDERS_KEY, {self.token: now})
            pipe.zremrangebyscore(HOLDERS_KEY, 0, stale)
            pipe.zcard(HOLDERS_KEY)
            results = await pipe.execute()
        return int(results[-1])

    async def _left_free(self, node_id: uuid.UUID) -> bool:
        """Over our share: take the lease only if it has stayed free for two polls (nobody else wants it)."""
        if await self.redis.exists(lease_key(node_id)):
            self._free_since.pop(node_id, None)
            return False
        first = self._free_since.setdefault(node_id, time.monotonic())
        return time.monotonic() - first >= 2 * self.settings.esl_lease_poll_seconds

    def _forget(self, link: NodeLink) -> None:
        if self.links.get(link.node_id) is link:
            del self.links[link.node_id]
            self._wake.set()

    def describe(self) -> list[dict[str, object]]:
        """What this process holds, for logs and tests."""
        return [
            {
                "node": link.name,
                "node_id": str(link.node_id),
                "connected": link.client.connected,
                "events": link.stats.events,
                "failed": link.stats.failed,
                "resyncs": link.stats.resyncs,
            }
            for link in self.links.values()
        ]
