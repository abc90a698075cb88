"""One ESL connection: a reader task that never waits on the consumer, replies matched in order, jobs by Job-UUID."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import uuid as _uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

from backend.channels.voice.esl._config import ClientConfig
from backend.channels.voice.esl._exceptions import (
    AccessDenied,
    ChannelGone,
    CommandError,
    ConnectionLost,
    ProtocolError,
    Timeout,
)
from backend.channels.voice.esl._models import (
    ApiResponse,
    AuthRequest,
    CommandReply,
    DisconnectNotice,
    Event,
    EventFormat,
    LogLine,
    Message,
    RudeRejection,
    UnknownFrame,
    decode_frame,
)
from backend.channels.voice.esl._parser import FrameParser
from backend.channels.voice.esl._wire import encode_command
from backend.lib.tasks import cancel_and_wait

logger = logging.getLogger("backend.channels.voice.esl")

EventSink = Callable[[Event], object]


class EventBuffer:
    """A bounded FIFO between the reader and the consumer: pushing never blocks, overflow is counted."""

    def __init__(self, maxsize: int, on_overflow: Callable[[int], None] | None = None) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._maxsize = maxsize
        self._ready = asyncio.Event()
        self._closed = False
        self._on_overflow = on_overflow
        self.dropped = 0
        """Events dropped because the consumer fell behind."""

    def push(self, event: Event) -> bool:
        if self._closed:
            return False
        if len(self._items) >= self._maxsize:
            self.dropped += 1
            if self._on_overflow is not None:
                self._on_overflow(self.dropped)
            return False
        self._items.append(event)
        self._ready.set()
        return True

    def close(self) -> None:
        self._closed = True
        self._ready.set()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Event | None:
        """The next event, or None once closed and drained."""
        while not self._items:
            if self._closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    async def __aiter__(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event


class BackgroundJob:
    """A bgapi command in flight; await it (or `result()`) for the BACKGROUND_JOB body."""

    def __init__(self, job_uuid: str, command: str, future: asyncio.Future[ApiResponse], timeout: float) -> None:
        self.job_uuid = job_uuid
        self.command = command
        self._future = future
        self._timeout = timeout

    async def result(self, timeout: float | None = None) -> ApiResponse:
        """The job's output; raises Timeout, or ConnectionLost if the connection went before the job ended."""
        try:
            async with asyncio.timeout(timeout or self._timeout):
                return await asyncio.shield(self._future)
        except TimeoutError:
            raise Timeout(f"no BACKGROUND_JOB for {self.job_uuid} ({self.command!r})") from None

    def done(self) -> bool:
        return self._future.done()

    def __await__(self) -> Any:
        return self.result().__await__()


class Connection:
    """The protocol engine under both the inbound client and outbound sessions.

    Commands may be issued from many tasks at once: writes are serialised and each
    reply resolves the oldest waiting command, which is how mod_event_socket answers.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: ClientConfig,
        *,
        sink: EventSink | None = None,
        on_log: Callable[[LogLine], None] | None = None,
        name: str = "esl",
        reply_stamp: Callable[[], int] | None = None,
    ) -> None:
        self.config = config
        self.name = name
        self._reader = reader
        self._writer = writer
        self._parser = FrameParser(max_header_bytes=config.max_header_bytes, max_body_bytes=config.max_body_bytes)
        self._pending: collections.deque[tuple[str, asyncio.Future[Message]]] = collections.deque()
        self._jobs: dict[str, asyncio.Future[ApiResponse]] = {}
        self._executions: dict[str, asyncio.Future[Event]] = {}
        self._write_lock = asyncio.Lock()
        self._greeting: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._closed = asyncio.Event()
        self._sink = sink
        self._on_log = on_log
        self._reply_stamp = reply_stamp
        self.close_reason: BaseException | None = None
        self.disconnect_notice: DisconnectNotice | None = None
        self.channel_down = asyncio.Event()
        """Set when a disconnect notice says the controlled channel is gone (outbound)."""
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"{name}-reader")

    # ----- reading -----

    async def _read_loop(self) -> None:
        reason: BaseException = ConnectionLost("the switch closed the connection")
        try:
            while True:
                data = await self._reader.read(self.config.read_chunk_bytes)
                if not data:
                    if self._parser.buffered:
                        logger.warning(
                            "%s: connection closed inside a frame (%d bytes)", self.name, self._parser.buffered
                        )
                    break
                # Frames complete before any garbage are still delivered; then the connection is dropped.
                frames, garbage = self._parser.feed_until_error(data)
                for frame in frames:
                    self._dispatch(decode_frame(frame))
                if garbage is not None:
                    raise garbage
        except ProtocolError as error:
            logger.error("%s: dropping the connection, the switch sent something that is not ESL: %s", self.name, error)
            reason = error
        except (ConnectionError, OSError) as error:
            reason = ConnectionLost(f"connection error: {error}")
        except asyncio.CancelledError:
            reason = ConnectionLost("the connection was closed")
        finally:
            self._finish(reason)

    def _dispatch(self, message: Message) -> None:
        if isinstance(message, Event):
            self._on_event(message)
        elif isinstance(message, (CommandReply, ApiResponse)):
            if isinstance(message, ApiResponse) and self._reply_stamp is not None:
                # Now, not when the waiting command resumes: by then more of this read's events are buffered.
                message = dataclasses.replace(message, events_before=self._reply_stamp())
            if self._pending:
                _command, future = self._pending.popleft()
                if not future.done():
                    future.set_result(message)
            elif not self._greeting.done():
                # The outbound `connect` reply arrives before anything else was asked of us.
                self._greeting.set_result(message)
            else:
                logger.warning("%s: reply with no command waiting: %r", self.name, message)
        elif isinstance(message, AuthRequest):
            if not self._greeting.done():
                self._greeting.set_result(message)
        elif isinstance(message, DisconnectNotice):
            self.disconnect_notice = message
            if message.disposition == "linger":
                self.channel_down.set()
            logger.debug("%s: disconnect notice %s", self.name, dict(message.headers))
        elif isinstance(message, LogLine):
            if self._on_log is not None:
                self._on_log(message)
        elif isinstance(message, RudeRejection):
            self.close_reason = AccessDenied(message.body.strip())
            if not self._greeting.done():
                self._greeting.set_exception(self.close_reason)
        elif isinstance(message, UnknownFrame):
            logger.warning("%s: ignoring a frame of unknown type %r", self.name, message.frame.content_type)

    def _on_event(self, event: Event) -> None:
        name = event.name
        if name == "BACKGROUND_JOB":
            job = self._jobs.pop(event.job_uuid or "", None)
            if job is not None:
                if not job.done():
                    job.set_result(ApiResponse(event.body or "", event.get("Job-Command", "") or ""))
                return
        elif name == "CHANNEL_EXECUTE_COMPLETE":
            execution = self._executions.pop(event.application_uuid or "", None)
            if execution is not None and not execution.done():
                execution.set_result(event)
        if self._sink is not None:
            self._sink(event)

    def _finish(self, reason: BaseException) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        failure = self.close_reason
        if not self._greeting.done():
            self._greeting.set_exception(failure)
            self._greeting.exception()  # mark retrieved: nobody may be waiting any more
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(ConnectionLost(str(failure)))
        for job in self._jobs.values():
            if not job.done():
                job.set_exception(ConnectionLost(str(failure)))
        self._jobs.clear()
        for execution in self._executions.values():
            if not execution.done():
                execution.set_exception(ChannelGone(f"the connection closed: {failure}"))
        self._executions.clear()
        self.channel_down.set()
        self._closed.set()
        with contextlib.suppress(Exception):
            self._writer.close()

    # ----- state -----

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def greeting(self, timeout: float) -> Message:
        """The first unsolicited frame: `auth/request` (inbound) or the `connect` reply (outbound)."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self._greeting)
        except TimeoutError:
            await self.close()
            raise Timeout(f"{self.name}: no greeting from the switch within {timeout}s") from None

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    # ----- writing -----

    async def _send(
        self,
        line: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes | str | None = None,
        *,
        timeout: float,
        before_write: Callable[[], None] | None = None,
    ) -> Message:
        if self.closed:
            raise ConnectionLost(f"{self.name}: connection closed ({self.close_reason})")
        data = encode_command(line, headers, body)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        async with self._write_lock:
            if before_write is not None:
                before_write()
            self._pending.append((line, future))
            self._writer.write(data)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as error:
                raise ConnectionLost(f"{self.name}: write failed: {error}") from None
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation racing the reply.
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            # Later replies could no longer be matched to their commands: start afresh.
            logger.error("%s: no reply to %r within %ss, dropping the connection", self.name, line[:60], timeout)
            self.close_reason = Timeout(f"no reply to {line[:60]!r} within {timeout}s")
            await self.close()
            raise self.close_reason from None

    async def command(
        self, line: str, headers: Sequence[tuple[str, str]] = (), body: bytes | str | None = None
    ) -> CommandReply:
        """Send a command and return its `command/reply` (not checked: see `CommandReply.raise_for_error`)."""
        reply = await self._send(line, headers, body, timeout=self.config.command_timeout)
        if not isinstance(reply, CommandReply):
            raise ProtocolError(f"expected a command/reply to {line!r}, got {type(reply).__name__}")
        return CommandReply(reply.headers, line)

    async def checked(self, line: str, headers: Sequence[tuple[str, str]] = ()) -> CommandReply:
        return (await self.command(line, headers)).raise_for_error()

    async def api(self, command: str, *, timeout: float | None = None) -> ApiResponse:
        """`api <command>`: the switch's answer body. `-ERR` is returned, not raised (see `raise_for_error`)."""
        reply = await self._send(f"api {command}", timeout=timeout or self.config.api_timeout)
        if isinstance(reply, CommandReply):
            # An empty or refused api command is answered with a command/reply (`-ERR command not found`).
            return ApiResponse(reply.text + "\n", command)
        if not isinstance(reply, ApiResponse):
            raise ProtocolError(f"expected an api/response to {command!r}")
        return ApiResponse(reply.body, command, reply.events_before)

    async def bgapi(self, command: str, *, job_uuid: str | None = None, timeout: float | None = None) -> BackgroundJob:
        """`bgapi <command>` with our own Job-UUID, registered before sending so the result cannot be missed."""
        job_id = job_uuid or str(_uuid.uuid4())
        future: asyncio.Future[ApiResponse] = asyncio.get_running_loop().create_future()

        def register() -> None:
            self._jobs[job_id] = future

        try:
            reply = await self._send(
                f"bgapi {command}",
                [("Job-UUID", job_id)],
                timeout=self.config.command_timeout,
                before_write=register,
            )
        except BaseException:
            self._jobs.pop(job_id, None)
            raise
        if not isinstance(reply, CommandReply) or not reply.text.startswith("+OK"):
            self._jobs.pop(job_id, None)
            text = reply.text if isinstance(reply, CommandReply) else repr(reply)
            raise CommandError(f"bgapi {command}", text)
        return BackgroundJob(job_id, command, future, timeout or self.config.job_timeout)

    async def sendmsg(
        self,
        call_command: str,
        headers: Sequence[tuple[str, str]] = (),
        *,
        uuid: str | None = None,
        body: str | None = None,
    ) -> CommandReply:
        line = f"sendmsg {uuid}" if uuid else "sendmsg"
        reply = await self.command(line, [("call-command", call_command), *headers], body)
        return reply.raise_for_error()

    async def execute(
        self,
        application: str,
        argument: str | None = None,
        *,
        uuid: str | None = None,
        event_lock: bool = True,
        loops: int | None = None,
        wait: bool = True,
        timeout: float | None = None,
    ) -> Event | None:
        """Run a dialplan application on a channel; with `wait`, return its CHANNEL_EXECUTE_COMPLETE.

        The completion is matched by Application-UUID: we send our own `Event-UUID`, which
        FreeSWITCH uses as the Application-UUID (switch_ivr_parse_event). Waiting needs
        CHANNEL_EXECUTE_COMPLETE events for the channel (`myevents`, or `event` plus a filter).
        """
        app_uuid = str(_uuid.uuid4())
        headers: list[tuple[str, str]] = [("execute-app-name", application)]
        body: str | None = None
        if argument is not None:
            if "\n" in argument or "\r" in argument:
                headers.append(("content-type", "text/plain"))
                body = argument
            else:
                headers.append(("execute-app-arg", argument))
        if loops is not None:
            headers.append(("loops", str(loops)))
        if event_lock:
            headers.append(("event-lock", "true"))
        headers.append(("Event-UUID", app_uuid))
        future: asyncio.Future[Event] | None = None
        if wait:
            future = asyncio.get_running_loop().create_future()
            self._executions[app_uuid] = future
        try:
            await self.sendmsg("execute", headers, uuid=uuid, body=body)
        except BaseException:
            self._executions.pop(app_uuid, None)
            if future is not None:
                # The connection may have failed it already (ChannelGone): the caller gets the send's error.
                if future.done() and not future.cancelled():
                    future.exception()
                future.cancel()
            raise
        if future is None:
            return None
        limit = timeout if timeout is not None else self.config.execute_timeout
        try:
            async with asyncio.timeout(limit):
                return await future
        except TimeoutError:
            self._executions.pop(app_uuid, None)
            raise Timeout(f"{application} did not complete within {limit}s") from None

    async def subscribe(self, names: Sequence[str], event_format: EventFormat) -> CommandReply:
        return await self.checked(f"event {event_format} {' '.join(names)}")

    async def exit(self) -> None:
        """Say goodbye (`exit`) and wait for the switch to close the socket."""
        with contextlib.suppress(ConnectionLost, Timeout):
            await self.command("exit")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.command_timeout):
                await self.wait_closed()
        await self.close()
