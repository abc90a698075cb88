"""Outbound ESL: a server that accepts FreeSWITCH's `socket` application connections, one per call."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence

from backend.channels.voice.esl._config import ClientConfig
from backend.channels.voice.esl._connection import BackgroundJob, Connection, EventBuffer
from backend.channels.voice.esl._exceptions import ChannelGone, ESLError, ProtocolError
from backend.channels.voice.esl._models import MYEVENTS, ApiResponse, CommandReply, Event, EventFormat, Headers
from backend.lib.tasks import cancel_and_wait

logger = logging.getLogger("backend.channels.voice.esl")

ACCEPT_BACKLOG = 1024
"""Connections the kernel queues for us while the process is busy (asyncio's default is 100). Past the queue
the kernel drops the switch's SYNs and its `socket` application's connect is retried for seconds to minutes:
under a burst of calls, callers sat in silence that long before reaching call control."""


class OutboundSession:
    """One call handed to us by the dialplan `socket` application.

    After `connect`, `channel` holds the CHANNEL_DATA the switch sent (all channel
    variables); `execute()` runs an application and returns its CHANNEL_EXECUTE_COMPLETE.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: ClientConfig) -> None:
        peer = writer.get_extra_info("peername")
        self.config = config
        self._events = EventBuffer(config.event_queue_size)
        self._connection = Connection(
            reader, writer, config, sink=self._on_event, name=f"esl-outbound-{peer[0]}:{peer[1]}" if peer else "esl"
        )
        self.channel = Event(Headers())
        """The CHANNEL_DATA of the `connect` reply; variables as `variable_*` headers."""
        self.socket_mode = ""
        """`async` or `static`, from the `socket` application's arguments."""
        self.control = ""
        """`full` (every command allowed) or `single-channel`."""
        self.hangup_event: Event | None = None
        """The controlled channel's CHANNEL_HANGUP (or HANGUP_COMPLETE), once it came."""

    def _on_event(self, event: Event) -> None:
        if (
            event.unique_id == self.uuid
            and event.name in ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE")
            and (self.hangup_event is None or event.name == "CHANNEL_HANGUP_COMPLETE")
        ):
            self.hangup_event = event
        self._events.push(event)

    async def connect(self) -> None:
        """Send `connect` and read the channel data (a serialized event with `Content-Type: command/reply`)."""
        reply = await self._connection.command("connect")
        if reply.headers.get("Event-Name") != "CHANNEL_DATA":
            raise ProtocolError(f"the connect reply carries no channel data: {reply.text!r}")
        headers = Headers([(k, v) for k, v in reply.headers.pairs if k not in _CONNECT_REPLY_HEADERS])
        self.channel = Event(headers, None, "plain")
        self.socket_mode = reply.headers.get("Socket-Mode", "")
        self.control = reply.headers.get("Control", "")

    @property
    def uuid(self) -> str:
        return self.channel.unique_id or ""

    def variable(self, name: str, default: str | None = None) -> str | None:
        """A channel variable as it was at `connect` (use `getvar` for its current value)."""
        return self.channel.variable(name, default)

    @property
    def closed(self) -> bool:
        return self._connection.closed

    @property
    def channel_down(self) -> bool:
        """True once the switch said the channel hung up (linger notice) or the socket closed."""
        return self._connection.channel_down.is_set()

    @property
    def disconnect_notice(self) -> object | None:
        return self._connection.disconnect_notice

    async def wait_for_hangup(self, timeout: float | None = None) -> None:
        """Wait until the channel is gone (linger disconnect notice) or the socket closed."""
        async with asyncio.timeout(timeout):
            await self._connection.channel_down.wait()

    async def events(self) -> AsyncIterator[Event]:
        """This connection's events (after `myevents` or `event`), until the socket closes."""
        async for event in self._events:
            yield event

    # ----- commands -----

    async def myevents(self, event_format: EventFormat | None = None) -> CommandReply:
        """Receive the controlled channel's events (myevents passes only events whose Unique-ID is this call)."""
        return await self._connection.checked(f"myevents {event_format or self.config.event_format}")

    async def subscribe(self, *names: str, event_format: EventFormat | None = None) -> CommandReply:
        return await self._connection.subscribe(list(names), event_format or self.config.event_format)

    async def add_filter(self, header: str, value: str) -> CommandReply:
        return await self._connection.checked(f"filter {header} {value}")

    async def nixevent(self, *names: str) -> CommandReply:
        """Stop receiving these events (the subscription's other events, and `myevents`' filter on this call,
        stay)."""
        return await self._connection.checked(f"nixevent {' '.join(names)}")

    async def linger(self, seconds: int | None = None) -> CommandReply:
        """Keep the socket after hangup so the last events (HANGUP_COMPLETE) still arrive."""
        return await self._connection.checked("linger" if seconds is None else f"linger {seconds}")

    async def nolinger(self) -> CommandReply:
        return await self._connection.checked("nolinger")

    async def getvar(self, name: str) -> str:
        """A channel variable's current value (`getvar` answers with the bare value in Reply-Text)."""
        reply = await self._connection.command(f"getvar {name}")
        return reply.text

    async def command(self, line: str, headers: Sequence[tuple[str, str]] = ()) -> CommandReply:
        return await self._connection.command(line, headers)

    async def api(self, command: str, *, timeout: float | None = None) -> ApiResponse:
        return await self._connection.api(command, timeout=timeout)

    async def bgapi(self, command: str, *, job_uuid: str | None = None) -> BackgroundJob:
        return await self._connection.bgapi(command, job_uuid=job_uuid)

    async def execute(
        self,
        application: str,
        argument: str | None = None,
        *,
        event_lock: bool = True,
        loops: int | None = None,
        timeout: float | None = None,
    ) -> Event:
        """Run an application on this call and wait for its CHANNEL_EXECUTE_COMPLETE.

        Raises ChannelGone if the socket closes first (the caller hung up without linger).
        """
        event = await self._connection.execute(
            application, argument, event_lock=event_lock, loops=loops, wait=True, timeout=timeout
        )
        if event is None:  # pragma: no cover - wait=True always yields an event
            raise ChannelGone(application)
        return event

    async def execute_nowait(self, application: str, argument: str | None = None, *, event_lock: bool = True) -> None:
        """Queue an application without waiting for it to finish (a background playback, say)."""
        await self._connection.execute(application, argument, event_lock=event_lock, wait=False)

    async def set_variable(self, name: str, value: str) -> Event:
        return await self.execute("set", f"{name}={value}")

    async def answer(self) -> Event:
        return await self.execute("answer")

    async def hangup(self, cause: str = "NORMAL_CLEARING") -> None:
        """Hang the call up; returns once the hangup application ran or the channel is gone."""
        with contextlib.suppress(ChannelGone):
            await self.execute("hangup", cause)

    async def close(self) -> None:
        await self._connection.close()
        self._events.close()

    async def wait_closed(self) -> None:
        await self._connection.wait_closed()
        self._events.close()


# Headers the connect reply adds to the CHANNEL_DATA event (mod_event_socket.c parse_command "connect").
_CONNECT_REPLY_HEADERS = frozenset({"Content-Type", "Reply-Text", "Socket-Mode", "Control"})

CallHandler = Callable[[OutboundSession], Awaitable[None]]


class OutboundServer:
    """Accepts `socket` connections and hands each call, connected, to `handler(session)`.

    With `myevents` (the default) the session receives its channel's events, which
    `execute()` needs (`events` keeps only those of them the handler reads: each
    event carries every channel variable, and a call has dozens); with `linger` the
    socket stays after hangup until the switch closes it, so CHANNEL_HANGUP_COMPLETE
    still arrives. Several worker processes may
    each run a server; FreeSWITCH spreads nothing by itself, so a balancer or several
    `socket` targets do.
    """

    def __init__(
        self,
        handler: CallHandler,
        host: str = "127.0.0.1",
        port: int = 8084,
        *,
        config: ClientConfig | None = None,
        myevents: bool = True,
        events: Collection[str] | None = None,
        linger: bool = True,
        reuse_port: bool = False,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.config = config or ClientConfig()
        self.myevents = myevents
        self.unwanted = sorted(MYEVENTS - set(events)) if events is not None else []
        """`myevents`' events the handler does not read, `nixevent`ed after it."""
        self.linger = linger
        self.reuse_port = reuse_port
        """SO_REUSEPORT: several processes listen on one address and the kernel spreads the calls."""
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, reuse_port=self.reuse_port or None, backlog=ACCEPT_BACKLOG
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting and end the calls in progress (their sockets are closed)."""
        if self._server is not None:
            self._server.close()
        await cancel_and_wait(*self._sessions)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> OutboundServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _prepare(self, session: OutboundSession) -> None:
        """linger, myevents, nixevent: sent back to back (the switch answers in order), one wait instead of three."""
        steps: list[Awaitable[CommandReply]] = []
        if self.linger:
            steps.append(session.linger())
        if self.myevents:
            steps.append(session.myevents())
            if self.unwanted:
                steps.append(session.nixevent(*self.unwanted))
        for outcome in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(outcome, BaseException):
                raise outcome

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        session = OutboundSession(reader, writer, self.config)
        try:
            await session.connect()
            await self._prepare(session)
            await self.handler(session)
        except ESLError as error:
            logger.warning("outbound call %s ended: %s", session.uuid or "?", error)
        except Exception:
            logger.exception("outbound call handler failed for %s", session.uuid or "?")
        finally:
            self._sessions.discard(task)
            await session.close()
