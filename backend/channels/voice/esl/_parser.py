"""Sans-IO ESL framing: bytes in, frames (switch to client) or commands (client to switch) out.

Neither parser does I/O, so the same code serves the asyncio client, the switch
simulator and the tests that replay captured byte streams in arbitrary pieces.
"""

from __future__ import annotations

import re

from backend.channels.voice.esl._exceptions import ProtocolError
from backend.channels.voice.esl._models import Command, Frame

DEFAULT_MAX_HEADER_BYTES = 1_048_576
"""Longest header block accepted (the outbound `connect` reply, all channel variables, is the big one)."""
DEFAULT_MAX_BODY_BYTES = 10_485_760
"""Largest Content-Length accepted; FreeSWITCH's own read limit for a command is 10 MiB too."""

_COMMAND_END = re.compile(rb"\n\r?\n")
_REMEMBERED_BLOCK_BYTES = 80
_REMEMBERED_BLOCKS = 4096


def _content_length(value: str, limit: int) -> int:
    value = value.strip()
    if not value.isdigit():
        raise ProtocolError(f"bad Content-Length {value[:20]!r}")
    length = int(value)
    if length > limit:
        raise ProtocolError(f"Content-Length {length} is over the {limit}-byte limit")
    return length


class FrameParser:
    """Frames from what a switch sends: LF-separated header lines, a blank line, then Content-Length body bytes.

    `Content-Length` may sit anywhere in the header block (log/data frames carry headers after it)
    and is absent on frames without a body (auth/request, command/reply).
    """

    __slots__ = ("_buffer", "_headers", "_known", "_max_body", "_max_header", "_need")

    def __init__(
        self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ) -> None:
        self._buffer = bytearray()
        self._headers: tuple[tuple[str, str], ...] | None = None
        self._need = 0
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes
        # Event frames repeat the same two header lines (`Content-Length: n`, `Content-Type: ...`) with a
        # few hundred different lengths: their parse is remembered, per connection and bounded.
        self._known: dict[bytes, tuple[tuple[tuple[str, str], ...], int]] = {}

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole frame (non-zero at EOF means a truncated frame)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete. Raises ProtocolError on garbage."""
        frames, error = self.feed_until_error(data)
        if error is not None:
            raise error
        return frames

    def feed_until_error(self, data: bytes) -> tuple[list[Frame], ProtocolError | None]:
        """Like `feed`, but the frames completed before garbage are returned with the error, not lost with it."""
        frames: list[Frame] = []
        try:
            self._feed(data, frames)
        except ProtocolError as error:
            return frames, error
        return frames, None

    def _feed(self, data: bytes, frames: list[Frame]) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            if self._headers is None:
                # FreeSWITCH never sends blank lines between frames; tolerate them rather than fail.
                while start < len(buffer) and buffer[start] == 0x0A:
                    start += 1
                end = buffer.find(b"\n\n", start)
                if end < 0:
                    if len(buffer) - start > self._max_header:
                        raise ProtocolError(f"header block over {self._max_header} bytes")
                    break
                if end - start > self._max_header:
                    raise ProtocolError(f"header block over {self._max_header} bytes")
                block = bytes(buffer[start:end])
                known = self._known.get(block)
                if known is None:
                    known = self._parse_headers(block)
                    if len(block) <= _REMEMBERED_BLOCK_BYTES:
                        if len(self._known) >= _REMEMBERED_BLOCKS:
                            self._known.clear()
                        self._known[block] = known
                headers, length = known
                start = end + 2
                if length == 0:
                    frames.append(Frame(headers))
                    continue
                self._headers = headers
                self._need = length
            if len(buffer) - start < self._need:
                break
            body = bytes(buffer[start : start + self._need])
            start += self._need
            frames.append(Frame(self._headers, body))
            self._headers = None
            self._need = 0
        if start:
            del buffer[:start]

    def _parse_headers(self, block: bytes) -> tuple[tuple[tuple[str, str], ...], int]:
        pairs: list[tuple[str, str]] = []
        length = 0
        for line in block.decode("utf-8", errors="replace").split("\n"):
            name, colon, value = line.partition(":")
            if not colon or not name or " " in name:
                raise ProtocolError(f"not an ESL header line: {line[:80].encode()!r}")
            value = value.lstrip(" ")
            if len(name) == 14 and name.lower() == "content-length":
                length = _content_length(value, self._max_body)
            pairs.append((name, value))
        return tuple(pairs), length


class CommandParser:
    """Commands from what a client sends, read the way mod_event_socket's read_packet does.

    Leading CR/LF is skipped, a command ends at an empty line (CR ignored), the first
    line is the command and the others are `Name: value` headers; a Content-Length
    header is followed by that many body bytes (sendmsg and sendevent bodies).
    """

    __slots__ = ("_buffer", "_max_body", "_max_header", "_need", "_pending")

    def __init__(
        self, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    ) -> None:
        self._buffer = bytearray()
        self._pending: Command | None = None
        self._need = 0
        self._max_header = max_header_bytes
        self._max_body = max_body_bytes

    def feed(self, data: bytes) -> list[Command]:
        buffer = self._buffer
        buffer += data
        commands: list[Command] = []
        start = 0
        while True:
            if self._pending is None:
                while start < len(buffer) and buffer[start] in (0x0A, 0x0D):
                    start += 1
                match = _COMMAND_END.search(buffer, start)
                if match is None:
                    if len(buffer) - start > self._max_header:
                        raise ProtocolError(f"command over {self._max_header} bytes")
                    break
                command = self._parse(bytes(buffer[start : match.start()]))
                start = match.end()
                length_value = command.get("Content-Length")
                length = _content_length(length_value, self._max_body) if length_value is not None else 0
                if length == 0:
                    commands.append(command)
                    continue
                self._pending = command
                self._need = length
            if len(buffer) - start < self._need:
                break
            assert self._pending is not None
            self._pending.body = bytes(buffer[start : start + self._need])
            start += self._need
            commands.append(self._pending)
            self._pending = None
            self._need = 0
        if start:
            del buffer[:start]
        return commands

    @staticmethod
    def _parse(block: bytes) -> Command:
        lines = block.decode("utf-8", errors="replace").split("\n")
        command = Command(lines[0].rstrip("\r"))
        for raw in lines[1:]:
            line = raw.rstrip("\r")
            name, colon, value = line.partition(":")
            if colon and name:
                command.headers.append((name, value.lstrip(" ")))
        return command
