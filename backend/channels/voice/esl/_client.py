"""Inbound ESL: connect to a switch's event socket, authenticate, subscribe, command it; reconnect with back-off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from backend.channels.voice.esl._config import ClientConfig
from backend.channels.voice.esl._connection import BackgroundJob, Connection, EventBuffer
from backend.channels.voice.esl._exceptions import (
    AuthenticationError,
    ConnectError,
    ESLError,
    NotConnected,
    ProtocolError,
    RefusedError,
    Timeout,
    TransportError,
)
from backend.channels.voice.esl._models import (
    ApiResponse,
    AuthRequest,
    CommandReply,
    Event,
    EventFormat,
    LogLine,
)
from backend.lib.tasks import cancel_and_wait

logger = logging.getLogger("backend.channels.voice.esl")

# Our bgapi results arrive as BACKGROUND_JOB events, so the subscription always includes them.
_ALWAYS = ("BACKGROUND_JOB",)


class InboundClient:
    """A long-lived inbound connection to one switch's event socket (mod_event_socket, port 8021).

    `start()` connects (and keeps reconnecting with exponential back-off and jitter);
    the event subscription and filters asked for are re-applied after every reconnect,
    then `on_connect` runs (re-read the switch's state there: events may have been lost).
    Events are read from `events()`, which spans reconnects. The reader never waits for
    the consumer: when the buffer is full, events are dropped, counted and reported to
    `on_events_lost`. `on_event` sees each event as it is read, before the buffer (the place for
    what must not wait behind a backlog, such as a node's liveness). `events` is a subscription
    made on every connection from the first one on (what a long-lived holder wants);
    `subscribe()` adds to it once connected.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        config: ClientConfig | None = None,
        on_connect: Callable[[InboundClient], Awaitable[None]] | None = None,
        on_disconnect: Callable[[BaseException | None], Awaitable[None]] | None = None,
        on_events_lost: Callable[[int], None] | None = None,
        on_log: Callable[[LogLine], None] | None = None,
        on_event: Callable[[Event], None] | None = None,
        name: str | None = None,
        rng: random.Random | None = None,
        events: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.config = config or ClientConfig()
        self.name = name or f"esl://{host}:{port}"
        self._password = password
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_log = on_log
        self._on_event = on_event
        self._buffered = 0
        """Events put in the buffer since the client was made (all connections): answers are stamped with it."""
        self._rng = rng
        self._events = EventBuffer(self.config.event_queue_size, on_events_lost or self._log_overflow)
        self._connection: Connection | None = None
        self._connected = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._subscription: list[str] = list(dict.fromkeys(events))
        self._event_format: EventFormat = self.config.event_format
        self._filters: list[tuple[str, str]] = []
        self.connections = 0
        """How many times a connection was established (1 + reconnects)."""
        self.last_error: BaseException | None = None
        """Why the last attempt or connection failed."""

    # ----- lifecycle -----

    async def connect(self) -> None:
        """Open one connection and authenticate, without retrying; raises ConnectError, AuthenticationError..."""
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (TimeoutError, OSError) as error:
            raise ConnectError(f"{self.name}: cannot connect: {error or 'timed out'}") from None
        connection = Connection(
            reader,
            writer,
            self.config,
            sink=self._received,
            on_log=self._on_log,
            name=self.name,
            reply_stamp=self._buffered_count,
        )
        try:
            greeting = await connection.greeting(self.config.connect_timeout)
            if not isinstance(greeting, AuthRequest):
                raise ProtocolError(f"{self.name}: expected auth/request, got {type(greeting).__name__}")
            reply = await connection.command(f"auth {self._password}")
            if not reply.text.startswith("+OK"):
                raise AuthenticationError(f"{self.name}: the switch refused the password ({reply.text})")
            await self._apply_subscription(connection)
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self.connections += 1
        if self._on_connect is not None:
            try:
                await self._on_connect(self)
            except ESLError as error:
                logger.warning("%s: on_connect failed: %s", self.name, error)
        # Connected means ready: subscribed again and, through on_connect, resynchronised.
        self._connected.set()

    async def start(self, *, wait: bool = True, timeout: float | None = None) -> None:
        """Run the connection supervisor; with `wait`, return once connected (or raise the first refusal)."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.name}-supervisor")
        if wait:
            waiter = asyncio.create_task(self._connected.wait())
            done, _ = await asyncio.wait({waiter, self._supervisor}, timeout=timeout, return_when="FIRST_COMPLETED")
            if waiter not in done:
                waiter.cancel()
                if self._supervisor in done:
                    self._supervisor.result()
                raise Timeout(f"{self.name}: not connected within {timeout}s ({self.last_error})")

    async def close(self) -> None:
        """Stop reconnecting, say `exit`, close the socket and end `events()`."""
        self._closing = True
        connection = self._connection
        if connection is not None:
            # Saying goodbye first lets the supervisor see the close and return on its own.
            await connection.exit()
        await cancel_and_wait(self._supervisor)
        self._connection = None
        self._connected.clear()
        self._events.close()

    async def __aenter__(self) -> InboundClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self.connect()
            except RefusedError as error:
                self.last_error = error
                logger.error("%s: %s; retrying in case the switch's configuration changes", self.name, error)
            except (TransportError, OSError) as error:
                self.last_error = error
                logger.warning("%s: connection attempt failed: %s", self.name, error)
            else:
                attempt = 0
                connection = self._connection
                assert connection is not None
                await connection.wait_closed()
                self._connected.clear()
                self._connection = None
                self.last_error = connection.close_reason
                if self._closing:
                    return
                logger.warning("%s: connection lost (%s), reconnecting", self.name, connection.close_reason)
                if self._on_disconnect is not None:
                    with contextlib.suppress(Exception):
                        await self._on_disconnect(connection.close_reason)
            delay = self.config.backoff.delay(attempt, self._rng)
            attempt += 1
            await asyncio.sleep(delay)

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.closed

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError:
            raise Timeout(f"{self.name}: not connected within {timeout}s") from None

    def _current(self) -> Connection:
        connection = self._connection
        if connection is None or connection.closed:
            raise NotConnected(f"{self.name}: not connected ({self.last_error})")
        return connection

    def _received(self, event: Event) -> bool:
        if self._on_event is not None:
            self._on_event(event)
        pushed = self._events.push(event)
        if pushed:
            self._buffered += 1
        return pushed

    def _buffered_count(self) -> int:
        return self._buffered

    def _log_overflow(self, dropped: int) -> None:
        if dropped == 1 or dropped % 1000 == 0:
            logger.error(
                "%s: event buffer full, %d events dropped so far; the consumer is too slow", self.name, dropped
            )

    # ----- events -----

    @property
    def dropped_events(self) -> int:
        return self._events.dropped

    @property
    def pending_events(self) -> int:
        """Events received and not yet taken from `events()` (where a state snapshot falls in the stream)."""
        return len(self._events)

    async def events(self) -> AsyncIterator[Event]:
        """Every event received, in order, across reconnects; ends after `close()`."""
        async for event in self._events:
            yield event

    async def _apply_subscription(self, connection: Connection) -> None:
        names = list(dict.fromkeys([*_ALWAYS, *self._subscription]))
        await connection.subscribe(names, self._event_format)
        for header, value in self._filters:
            await connection.checked(f"filter {header} {value}")
        if self._filters:
            await connection.checked("filter Event-Name BACKGROUND_JOB")

    async def subscribe(self, *names: str, event_format: EventFormat | None = None) -> CommandReply:
        """`event <format> <names>`; kept and re-applied after reconnects. CUSTOM subclasses follow `CUSTOM`."""
        self._subscription.extend(name for name in names if name not in self._subscription)
        if event_format is not None:
            self._event_format = event_format
        return await self._current().subscribe(list(dict.fromkeys([*_ALWAYS, *names])), self._event_format)

    async def unsubscribe(self, *names: str) -> CommandReply:
        """`nixevent <names>`."""
        for name in names:
            with contextlib.suppress(ValueError):
                self._subscription.remove(name)
        return await self._current().checked(f"nixevent {' '.join(names)}")

    async def add_filter(self, header: str, value: str) -> CommandReply:
        """`filter <header> <value>`: only matching events pass (BACKGROUND_JOB is let through for bgapi)."""
        first = not self._filters
        self._filters.append((header, value))
        connection = self._current()
        reply = await connection.checked(f"filter {header} {value}")
        if first:
            await connection.checked("filter Event-Name BACKGROUND_JOB")
        return reply

    async def delete_filter(self, header: str, value: str | None = None) -> CommandReply:
        """`filter delete <header> [<value>]`, or `filter delete all` with header `all`."""
        if header == "all":
            self._filters.clear()
        else:
            self._filters = [(h, v) for h, v in self._filters if not (h == header and value in (None, v))]
        line = f"filter delete {header}" + (f" {value}" if value is not None else "")
        return await self._current().checked(line)

    async def myevents(self, uuid: str, event_format: EventFormat | None = None) -> CommandReply:
        """`myevents <uuid> <format>`: from now on only that channel's events (not re-applied on reconnect)."""
        return await self._current().checked(f"myevents {uuid} {event_format or self._event_format}")

    # ----- commands -----

    async def command(self, line: str, headers: Sequence[tuple[str, str]] = ()) -> CommandReply:
        """Any ESL command, for what has no method here; the reply is returned unchecked."""
        return await self._current().command(line, headers)

    async def api(self, command: str, *, timeout: float | None = None) -> ApiResponse:
        """`api <command>`; returns the body (`-ERR ...` included: call `raise_for_error()` to raise)."""
        return await self._current().api(command, timeout=timeout)

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float | None = None) -> BackgroundJob:
        """`bgapi <command>`; await the returned job for its output (correlated by Job-UUID)."""
        return await self._current().bgapi(command, job_uuid=job_uuid, timeout=timeout)

    async def sendmsg(
        self, uuid: str, call_command: str, headers: Sequence[tuple[str, str]] = (), body: str | None = None
    ) -> CommandReply:
        """`sendmsg <uuid>` with `call-command` (execute, hangup, unicast, nomedia...)."""
        return await self._current().sendmsg(call_command, headers, uuid=uuid, body=body)

    async def execute(
        self,
        uuid: str,
        application: str,
        argument: str | None = None,
        *,
        event_lock: bool = True,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Event | None:
        """Run an application on a channel; `wait=True` returns its CHANNEL_EXECUTE_COMPLETE (needs that event)."""
        return await self._current().execute(
            application, argument, uuid=uuid, event_lock=event_lock, wait=wait, timeout=timeout
        )

    async def hangup(self, uuid: str, cause: str = "NORMAL_CLEARING") -> CommandReply:
        return await self.sendmsg(uuid, "hangup", [("hangup-cause", cause)])
