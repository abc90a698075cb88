"""The simulator's event sockets, as mod_event_socket: the inbound server (8021) and outbound `socket` connections."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import uuid as uuidlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from backend.channels.voice.esl._exceptions import ProtocolError
from backend.channels.voice.esl._models import MYEVENTS, Command
from backend.channels.voice.esl._parser import CommandParser
from backend.channels.voice.esl._wire import GOODBYE, RUDE_REJECTION_TEXT, body_frame, event_frame, reply_frame
from backend.channels.voice.simulator._channel import Pairs

if TYPE_CHECKING:
    from backend.channels.voice.simulator._switch import CallLeg, Switch

logger = logging.getLogger("backend.channels.voice.simulator")


KNOWN_EVENTS = frozenset(
    MYEVENTS
    | {
        "CUSTOM",
        "CLONE",
        "ALL",
        "API",
        "BACKGROUND_JOB",
        "HEARTBEAT",
        "RE_SCHEDULE",
        "PRESENCE_IN",
        "CODEC",
        "CHANNEL_CALLSTATE",
        "CALL_UPDATE",
        "PLAYBACK_START",
        "PLAYBACK_STOP",
        "RECORD_START",
        "RECORD_STOP",
        "MEDIA_BUG_START",
        "MEDIA_BUG_STOP",
        "RECV_INFO",
        "PRIVATE_COMMAND",
        "CHANNEL_HOLD",
        "CHANNEL_UNHOLD",
        "LOG",
        "SHUTDOWN",
        "STARTUP",
    }
)

MAX_MISSED = 500
"""Events a listener may lose before FreeSWITCH kills it (mod_event_socket MAX_MISSED)."""
_FRAME_BYTES_ESTIMATE = 2048


def event_unique_id(pairs: Pairs) -> str:
    """The event's Unique-ID header ("" when it has none), as mod_event_socket compares it for myevents."""
    found = find_unique_id(pairs)
    return "" if found is None else found


def find_unique_id(pairs: Pairs) -> str | None:
    """The first Unique-ID header's value (switch_event_get_header: names compare without case), or None."""
    for key, value in pairs:
        if len(key) == 9 and key.lower() == "unique-id":
            return value
    return None


class FiredEvent:
    """One event on its way to the listeners: its Unique-ID looked up once, each format serialized once."""

    __slots__ = ("_frames", "_unique_id", "body", "pairs")

    def __init__(self, pairs: Pairs, body: str | None, unique_id: str | None = None) -> None:
        self.pairs = pairs
        self.body = body
        self._unique_id = unique_id
        self._frames: dict[str, bytes] = {}

    @property
    def unique_id(self) -> str:
        if self._unique_id is None:
            self._unique_id = event_unique_id(self.pairs)
        return self._unique_id

    def frame(self, event_format: str) -> bytes:
        frame = self._frames.get(event_format)
        if frame is None:
            frame = self._frames[event_format] = event_frame(event_format, self.pairs, self.body)
        return frame


class Listeners:
    """The switch's event-socket connections, in the order they came, as mod_event_socket's listen_list.

    An event is offered only to the listeners that can want it: a `myevents` listener bound to a channel
    takes nothing but events whose Unique-ID is that channel's, so those are kept by that uuid. With an
    outbound socket per call, offering every event to every listener cost as many checks as calls up.
    (Since 1.10.10 FreeSWITCH also passes a myevents listener the BACKGROUND_JOB of a bgapi it sent, by
    Job-Owner-UUID; the simulator adds no such header, so it is not looked up here either.)
    """

    __slots__ = ("_all", "_bound", "_unbound")

    def __init__(self) -> None:
        # dicts as ordered sets: removal is O(1) and iteration keeps the order listeners came in.
        self._all: dict[Listener, str | None] = {}
        """Every listener, with the channel uuid it is bound to (None: offered every event)."""
        self._unbound: dict[Listener, None] = {}
        self._bound: dict[str, dict[Listener, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Listener]:
        return iter(self._all)

    def __contains__(self, listener: object) -> bool:
        return listener in self._all

    def add(self, listener: Listener) -> None:
        self._all[listener] = None
        self._unbound[listener] = None

    def bind(self, listener: Listener, uuid: str) -> None:
        """From now on `listener` only ever wants events whose Unique-ID is `uuid` (myevents on a channel)."""
        if listener not in self._all or self._all[listener] is not None:
            return
        self._all[listener] = uuid
        del self._unbound[listener]
        self._bound.setdefault(uuid, {})[listener] = None

    def discard(self, listener: Listener) -> None:
        if listener not in self._all:
            return
        uuid = self._all.pop(listener)
        if uuid is None:
            del self._unbound[listener]
            return
        bound = self._bound[uuid]
        del bound[listener]
        if not bound:
            del self._bound[uuid]

    def deliver(self, name: str, subclass: str | None, fired: FiredEvent) -> None:
        """Offer one event to every listener that could want it (each decides, as event_handler does)."""
        # Copies: a listener that has lost too many events is killed, and leaves these, while we deliver.
        for listener in tuple(self._unbound):
            listener.deliver(name, subclass, fired)
        if self._bound:
            bound = self._bound.get(fired.unique_id)
            if bound:
                for listener in tuple(bound):
                    listener.deliver(name, subclass, fired)


class Listener:
    """One event-socket connection seen from the switch: authentication, subscription, filters, commands."""

    def __init__(
        self,
        switch: Switch,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        session: CallLeg | None = None,
        async_mode: bool = True,
        full: bool = True,
    ) -> None:
        self.switch = switch
        self.reader = reader
        self.writer = writer
        self.session = session
        self.outbound = session is not None
        self.async_mode = async_mode
        self.full = full
        self.authed = self.outbound
        self.format = "plain"
        self.events: set[str] = set()
        self.customs: set[str] = set()
        self.all_customs = False
        self.listening = False
        self.filters: list[tuple[str, str]] = []
        self.myevents = False
        self.linger = False
        self.linger_time = -1
        self.lost = 0
        self.logging = False
        self.closed = asyncio.Event()
        self.handled_disconnect = False
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    # ----- output -----

    def write(self, data: bytes) -> None:
        """Queue a frame; the frames of one loop iteration go out in one transport write.

        A state change fires several events at once; written one by one, each was a send() here and a
        wakeup and a read on the other side (about three times the reads). The bytes are the same: TCP
        keeps no frame boundaries, and FreeSWITCH too queues events for its listener thread to write.
        """
        if self.closed.is_set():
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)
        self._pending_bytes += len(data)

    def _flush(self) -> None:
        if self.closed.is_set() or not self._pending:
            return
        try:
            self._write_pending()
        except (ConnectionError, RuntimeError):
            self.kill()

    def _write_pending(self) -> None:
        pending = self._pending
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_bytes = 0
        self.writer.write(data)

    def kill(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            # What was written before the close goes out before it, as if written at once.
            if self._pending:
                with contextlib.suppress(Exception):
                    self._write_pending()
            self.switch.listeners.discard(self)
            with contextlib.suppress(Exception):
                self.writer.close()

    def goodbye(self) -> None:
        self.write(body_frame("text/disconnect-notice", GOODBYE))
        self.kill()

    def wants(self, name: str, subclass: str | None, pairs: Pairs, unique_id: str | None = None) -> bool:
        """mod_event_socket event_handler: subscription, then filters, then myevents (`unique_id`: the event's
        Unique-ID when the caller has looked it up already)."""
        if not self.listening:
            return False
        if "ALL" in self.events:
            send = True
        elif name in self.events:
            send = name != "CUSTOM" or subclass is None or self.all_customs or subclass in self.customs
        else:
            return False
        if send and self.filters:
            send = False
            lookup: dict[str, str] = {}
            for key, text in pairs:
                lookup.setdefault(key.lower(), text)
            for header, wanted in self.filters:
                value = lookup.get(header.lower())
                if value is None:
                    continue
                positive = True
                comparand = wanted
                while comparand and comparand[0] in "+- ":
                    if comparand[0] == "+":
                        positive = True
                    elif comparand[0] == "-":
                        positive = False
                    comparand = comparand[1:]
                if send and positive:
                    continue
                matched = (
                    re.search(comparand[1:], value) is not None
                    if wanted.startswith("/")
                    else value.lower() == comparand.lower()
                )
                if matched:
                    if positive:
                        send = True
                    else:
                        send = False
                        break
        if send and self.myevents:
            if unique_id is None:
                unique_id = event_unique_id(pairs)
            if not unique_id or (self.session is not None and unique_id != self.session.channel.uuid):
                send = False
        return send

    def deliver(self, name: str, subclass: str | None, fired: FiredEvent) -> None:
        """Send the event if this listener wants it. `fired` carries what every listener of one event shares
        (its Unique-ID, its frames once serialized)."""
        if not self.wants(name, subclass, fired.pairs, fired.unique_id):
            return
        queued = self.writer.transport.get_write_buffer_size() + self._pending_bytes
        if queued > self.switch.config.event_queue_size * _FRAME_BYTES_ESTIMATE:
            # The client does not read: FreeSWITCH's queue would be full. Count, and kill past MAX_MISSED.
            self.lost += 1
            if self.lost > MAX_MISSED:
                logger.critical("Killing listener because of too many lost events. Lost [%d]", self.lost)
                self.kill()
            return
        self.write(fired.frame("json" if self.format == "json" else "plain"))

    def channel_down(self) -> None:
        """The controlled channel reached CS_REPORTING: linger notice, or goodbye and close."""
        if self.handled_disconnect or self.session is None:
            return
        self.handled_disconnect = True
        channel = self.session.channel
        if self.linger:
            notice = (
                "Content-Type: text/disconnect-notice\n"
                f"Controlled-Session-UUID: {channel.uuid}\n"
                "Content-Disposition: linger\n"
                f"Channel-Name: {channel.name}\n"
                f"Linger-Time: {self.linger_time}\n"
                "Content-Length: 0\n\n"
            )
            self.write(notice.encode())
            # As captured (b01): with linger, FreeSWITCH closed the socket right after the notice,
            # so the channel's CHANNEL_DESTROY never reached the application.
            self.kill()
        else:
            payload = GOODBYE.encode()
            notice = (
                "Content-Type: text/disconnect-notice\n"
                f"Controlled-Session-UUID: {channel.uuid}\n"
                "Content-Disposition: disconnect\n"
                f"Content-Length: {len(payload)}\n\n"
            )
            self.write(notice.encode() + payload)
            self.kill()

    # ----- input -----

    async def run(self) -> None:
        parser = CommandParser()
        try:
            while not self.closed.is_set():
                data = await self.reader.read(65536)
                if not data:
                    break
                for command in parser.feed(data):
                    await self.handle(command)
                    if self.closed.is_set():
                        break
        except ProtocolError as error:
            logger.warning("event socket %s sent garbage: %s", self.peer, error)
        except (ConnectionError, OSError):
            pass
        finally:
            self.kill()

    def reply(self, text: str, extra: Pairs = ()) -> None:  # type: ignore[assignment]
        self.write(reply_frame(text, extra))

    async def handle(self, command: Command) -> None:
        line = command.line.strip()
        self.switch.record("esl", peer=self.peer, command=line, headers=list(command.headers))
        lowered = line.lower()
        if not self.authed:
            if lowered.startswith("auth "):
                if line[5:].strip() == self.switch.config.esl_password:
                    self.authed = True
                    self.reply("+OK accepted")
                else:
                    self.reply("-ERR invalid")
                    self.goodbye()
            else:
                self.reply("-ERR command not found")
            return
        if lowered in ("exit", "quit", "bye"):
            self.reply("+OK bye")
            self.goodbye()
        elif lowered.startswith("filter "):
            self.filter(line[7:].strip())
        elif self.outbound and lowered.startswith("connect"):
            self.connect_reply()
        elif self.outbound and lowered.startswith("getvar"):
            name = line[6:].strip()
            assert self.session is not None
            self.reply(self.session.channel.variables.get(name) or "")
        elif lowered.startswith("myevents"):
            self.handle_myevents(line)
        elif lowered.startswith("divert_events"):
            self.reply("-ERR not controlling a session." if not self.outbound else "+OK events diverted")
        elif lowered.startswith("sendmsg"):
            await self.sendmsg(line[7:].strip(), command)
        elif lowered.startswith("sendevent"):
            self.reply(f"+OK {uuidlib.uuid4()}")
        elif lowered.startswith("api "):
            await self.api(line[4:])
        elif lowered.startswith("bgapi "):
            self.bgapi(line[6:], command.get("Job-UUID"))
        elif lowered.startswith("nolinger"):
            self.nolinger()
        elif lowered.startswith("linger"):
            self.set_linger(line)
        elif lowered.startswith("nolog"):
            self.reply("+OK no longer logging" if self.logging else "-ERR not loging")
            self.logging = False
        elif lowered.startswith("log"):
            self.logging = True
            self.reply(f"+OK log level {line[3:].strip() or 'debug'} [7]")
        elif lowered.startswith("nixevent"):
            self.nixevent(line[8:].split())
        elif lowered.startswith("noevents"):
            if self.listening:
                self.listening = False
                self.events.clear()
                self.customs.clear()
                self.reply("+OK no longer listening for events")
            else:
                self.reply("-ERR not listening for events")
        elif lowered.startswith("event"):
            self.subscribe(line[5:].split())
        elif lowered.startswith("resume") and self.outbound:
            self.reply("+OK")
        else:
            self.reply("-ERR command not found")

    def filter(self, argument: str) -> None:
        header, _, value = argument.partition(" ")
        if header.lower() == "delete" and value:
            header, _, value = value.partition(" ")
            if header.lower() == "all":
                self.filters.clear()
            else:
                self.filters = [(h, v) for h, v in self.filters if not (h == header and (not value or v == value))]
            self.reply(f"+OK filter deleted. [{header}][{value}]")
        elif value:
            if header.lower() == "add":
                header, _, value = value.partition(" ")
            self.filters.append((header, value))
            self.reply(f"+OK filter added. [{header}]=[{value}]")
        else:
            self.reply("-ERR invalid syntax")

    def subscribe(self, words: list[str]) -> None:
        keys = 0
        custom = False
        for index, word in enumerate(words):
            if index == 0 and word.lower() in ("plain", "json", "xml"):
                self.format = word.lower()
                continue
            if custom:
                self.customs.add(word)
            elif word.upper() in KNOWN_EVENTS:
                keys += 1
                self.events.add(word.upper())
                if word.upper() == "ALL":
                    self.all_customs = True
                if word.upper() == "CUSTOM":
                    custom = True
        if not keys:
            self.reply("-ERR no keywords supplied")
            return
        self.listening = True
        self.reply(f"+OK event listener enabled {self.format}")

    def nixevent(self, words: list[str]) -> None:
        keys = 0
        custom = False
        for word in words:
            if custom:
                self.customs.discard(word)
            elif word.upper() in KNOWN_EVENTS:
                keys += 1
                if word.upper() == "CUSTOM":
                    custom = True
                elif word.upper() == "ALL":
                    self.events.clear()
                else:
                    if "ALL" in self.events:
                        self.events = set(KNOWN_EVENTS) - {"ALL"}
                    self.events.discard(word.upper())
        if not keys:
            self.reply("-ERR no keywords supplied")
            return
        self.listening = True
        self.reply("+OK events nixed")

    def handle_myevents(self, line: str) -> None:
        words = line.split()
        if self.myevents:
            self.reply("-ERR aready enabled.")
            return
        if not self.outbound:
            if len(words) < 2:
                self.reply("-ERR command not found")
                return
            leg = self.switch.find(words[1])
            if leg is None and len(words) > 2:
                self.reply("-ERR invalid uuid")
                return
            self.session = leg
        fmt = words[-1].lower() if len(words) > 1 else ""
        if fmt in ("plain", "json", "xml"):
            self.format = fmt
        self.events |= MYEVENTS
        self.myevents = True
        self.listening = True
        if self.session is not None:
            self.switch.listeners.bind(self, self.session.channel.uuid)
        self.reply("+OK Events Enabled")

    def set_linger(self, line: str) -> None:
        if not self.outbound:
            self.reply("-ERR not controlling a session")
            return
        argument = line[6:].strip()
        self.linger = True
        if argument.lstrip("-").isdigit():
            self.linger_time = int(argument)
            self.reply(f"+OK will linger {self.linger_time} seconds")
        else:
            self.linger_time = -1
            self.reply("+OK will linger")

    def nolinger(self) -> None:
        if not self.outbound:
            self.reply("-ERR not controlling a session")
            return
        self.linger = False
        self.reply("+OK will not linger")

    def connect_reply(self) -> None:
        """The outbound `connect` reply: a serialized CHANNEL_DATA event with reply headers appended."""
        assert self.session is not None
        channel = self.session.channel
        switch = self.switch
        pairs = switch.base_headers("CHANNEL_DATA", ("mod_event_socket.c", "parse_command", 2021))
        if channel.profile is not None:
            pairs += channel.profile.headers("Channel")
        pairs += channel.event_data("CHANNEL_DATA")
        pairs += [
            ("Content-Type", "command/reply"),
            ("Reply-Text", "+OK\n"),
            ("Socket-Mode", "async" if self.async_mode else "static"),
            ("Control", "full" if self.full else "single-channel"),
        ]
        from backend.channels.voice.esl._wire import serialize_plain

        self.write(serialize_plain(pairs))

    async def sendmsg(self, target: str, command: Command) -> None:
        switch = self.switch
        uuid = target or command.get("session-id") or ""
        if self.session is not None and (not uuid or uuid == self.session.channel.uuid):
            leg: CallLeg | None = self.session
        else:
            leg = switch.find(uuid) if uuid else None
        if leg is None:
            self.reply(f"-ERR invalid session id [{uuid}]")
            return
        leg.private.put_nowait(command)
        self.reply("+OK")
        from backend.channels.voice.simulator._apps import nudge

        nudge(switch, leg)

    async def api(self, text: str) -> None:
        from backend.channels.voice.simulator._api import execute_api

        name, _, argument = text.strip().partition(" ")
        output = await execute_api(self.switch, name, argument, self)
        self.write(body_frame("api/response", output or "-ERR no reply\n"))

    def bgapi(self, text: str, job_uuid: str | None) -> None:
        from backend.channels.voice.simulator._api import execute_api

        job = job_uuid or str(uuidlib.uuid4())
        name, _, argument = text.strip().partition(" ")
        self.reply(f"+OK Job-UUID: {job}", [("Job-UUID", job)])

        async def run() -> None:
            output = await execute_api(self.switch, name, argument, self)
            post = [("Job-UUID", job), ("Job-Command", name)]
            if argument:
                post.append(("Job-Command-Arg", argument))
            self.switch.fire(
                "BACKGROUND_JOB",
                calling=("mod_event_socket.c", "api_exec", 1572),
                post=post,
                body=output or "Command returned no output!",
            )

        self.switch.spawn(run(), f"bgapi-{job}")


class InboundServer:
    """mod_event_socket's listener on 8021: ACL, `auth/request`, then one Listener per connection."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch
        self._server: asyncio.Server | None = None
        self.port = switch.config.esl_port
        self._allowed = [ipaddress.ip_network(net, strict=False) for net in switch.config.esl_allowed]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.switch.config.esl_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for listener in tuple(self.switch.listeners):
                if not listener.outbound:
                    listener.kill()
            await self._server.wait_closed()

    def allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._allowed)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not self.allowed(peer[0] if peer else ""):
            writer.write(body_frame("text/rude-rejection", RUDE_REJECTION_TEXT))
            writer.write(body_frame("text/disconnect-notice", GOODBYE))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        listener = Listener(self.switch, reader, writer)
        self.switch.listeners.add(listener)
        listener.write(b"Content-Type: auth/request\n\n")
        try:
            await listener.run()
        except asyncio.CancelledError:
            # The loop is shutting down; asyncio would log a cancelled connection handler as an error.
            listener.kill()
