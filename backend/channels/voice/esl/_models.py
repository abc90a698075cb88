"""What comes over an event socket: raw frames and the typed messages decoded from them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

import msgspec

from backend.channels.voice.esl._exceptions import CommandError, ProtocolError

EventFormat = Literal["plain", "json"]

# Content types FreeSWITCH's mod_event_socket writes (mod_event_socket.c).
AUTH_REQUEST = "auth/request"
COMMAND_REPLY = "command/reply"
API_RESPONSE = "api/response"
EVENT_PLAIN = "text/event-plain"
EVENT_JSON = "text/event-json"
EVENT_XML = "text/event-xml"
LOG_DATA = "log/data"
DISCONNECT_NOTICE = "text/disconnect-notice"
RUDE_REJECTION = "text/rude-rejection"


MYEVENTS = frozenset(
    {
        "CHANNEL_ANSWER",
        "CHANNEL_APPLICATION",
        "CHANNEL_BRIDGE",
        "CHANNEL_CREATE",
        "CHANNEL_DATA",
        "CHANNEL_DESTROY",
        "CHANNEL_EXECUTE",
        "CHANNEL_EXECUTE_COMPLETE",
        "CHANNEL_HANGUP",
        "CHANNEL_HANGUP_COMPLETE",
        "CHANNEL_ORIGINATE",
        "CHANNEL_UUID",
        "CHANNEL_OUTGOING",
        "CHANNEL_PARK",
        "CHANNEL_PROGRESS",
        "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_STATE",
        "CHANNEL_UNBRIDGE",
        "CHANNEL_UNPARK",
        "DETECTED_SPEECH",
        "DTMF",
        "NOTALK",
        "TALK",
    }
)
"""The events `myevents` subscribes to (mod_event_socket.c, parse_command)."""


class Headers(Mapping[str, str]):
    """Header names to values; lookups find the first header of that name, exactly, else case-insensitively.

    FreeSWITCH looks headers up case-insensitively and can send the same name twice
    (CODEC events repeat `Channel-Write-Codec-Name`), so `pairs` keeps every header in
    wire order while the mapping view offers each name once.
    """

    __slots__ = ("_arrays", "_folded", "_index", "_pairs")

    def __init__(self, pairs: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        self._pairs: tuple[tuple[str, str], ...] | None
        self._arrays = False
        if isinstance(pairs, dict):
            # A dict has no repeated names: it is its own index (the fast path for JSON events).
            self._index: dict[str, str] = pairs
            self._pairs = None
        else:
            items = pairs.items() if isinstance(pairs, Mapping) else pairs
            self._pairs = tuple(items)
            self._index = dict(self._pairs)
            if len(self._index) != len(self._pairs):
                # Repeated names: lookups find the first one, as switch_event_get_header does. Assigning
                # existing keys keeps their order; going backwards leaves the first value of each name.
                for name, value in reversed(self._pairs):
                    self._index[name] = value
        self._folded: dict[str, str] | None = None
        """Lower-cased name to the name in the index, for lookups in another case."""

    @classmethod
    def from_json(cls, document: dict[str, object]) -> Headers:
        """The headers of a JSON event as decoded: array headers (lists) become text only when read."""
        headers = cls(document)  # type: ignore[arg-type]
        headers._arrays = True
        return headers

    def _value(self, name: str, value: object) -> str:
        # JSON array headers become FreeSWITCH's `ARRAY::a|:b` text, as in a plain event, once read.
        if isinstance(value, str):
            return value
        text = _json_value(value)
        self._index[name] = text
        return text

    @property
    def by_name(self) -> Mapping[str, str | list[str]]:
        """Each name, exactly as sent, to its first value; a JSON event's array headers are lists here.

        A plain dict, for consumers that look up many exact names (no case folding, no conversion):
        the shape `event json` itself has.
        """
        return self._index

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Every header in wire order, repeated names included."""
        if self._pairs is None:
            if self._arrays:
                self._pairs = tuple((name, self._value(name, value)) for name, value in list(self._index.items()))
            else:
                self._pairs = tuple(self._index.items())
        return self._pairs

    def __getitem__(self, name: str) -> str:
        try:
            value = self._index[name]
        except KeyError:
            # Not under that exact name: FreeSWITCH's own lookups ignore case. Names are folded once per
            # event, and only names (values are read through the index, first one of each name).
            if self._folded is None:
                self._folded = {}
                for key in reversed(self._index):
                    self._folded[key.lower()] = key
            name = self._folded[name.lower()]
            value = self._index[name]
        return value if not self._arrays or value.__class__ is str else self._value(name, value)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self[name]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def names(self) -> list[str]:
        """Every header name in wire order, repeats included."""
        return [name for name, _ in self.pairs]

    def __repr__(self) -> str:
        return f"Headers({list(self.pairs)!r})"


@dataclass(frozen=True, slots=True)
class Frame:
    """One ESL frame as sent: its header lines (values as on the wire) and its body bytes."""

    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default

    @property
    def content_type(self) -> str | None:
        return self.get("Content-Type")


@dataclass(frozen=True, slots=True)
class Event:
    """A FreeSWITCH event: headers (decoded), an optional body, and the format it came in."""

    headers: Headers
    body: str | None = None
    format: EventFormat = "plain"

    @property
    def name(self) -> str:
        return self.headers.get("Event-Name", "")

    @property
    def subclass(self) -> str | None:
        return self.headers.get("Event-Subclass")

    @property
    def unique_id(self) -> str | None:
        return self.headers.get("Unique-ID")

    @property
    def job_uuid(self) -> str | None:
        return self.headers.get("Job-UUID")

    @property
    def application_uuid(self) -> str | None:
        return self.headers.get("Application-UUID")

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name, default)

    def variable(self, name: str, default: str | None = None) -> str | None:
        """A channel variable carried as `variable_<name>`."""
        return self.headers.get(f"variable_{name}", default)

    @property
    def variables(self) -> dict[str, str]:
        return {key[9:]: value for key, value in self.headers.items() if key.startswith("variable_")}


@dataclass(frozen=True, slots=True)
class CommandReply:
    """A `command/reply`: `Reply-Text` and any other headers (bgapi's `Job-UUID`, the outbound `connect` data)."""

    headers: Headers
    command: str = ""

    @property
    def text(self) -> str:
        return self.headers.get("Reply-Text", "")

    @property
    def ok(self) -> bool:
        return not self.text.startswith("-ERR")

    def raise_for_error(self) -> CommandReply:
        if not self.ok:
            raise CommandError(self.command, self.text)
        return self


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """The body of an `api/response` (or of a BACKGROUND_JOB); `-ERR ...` means the command failed."""

    body: str
    command: str = ""
    events_before: int | None = None
    """Events an inbound client had buffered when this answer was read (set by `InboundClient`). Answers and
    events share one ordered stream: exactly those events happened before the switch answered, which is where
    a snapshot read by this command belongs among them."""

    @property
    def ok(self) -> bool:
        return not self.body.startswith("-ERR") and not self.body.startswith("-USAGE")

    @property
    def text(self) -> str:
        """The body without its trailing newline."""
        return self.body.rstrip("\n")

    def raise_for_error(self) -> ApiResponse:
        if not self.ok:
            raise CommandError(self.command, self.body)
        return self

    def json(self) -> object:
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class DisconnectNotice:
    """`text/disconnect-notice`: the switch is about to close (or, with linger, the channel has hung up)."""

    headers: Headers
    body: str = ""

    @property
    def disposition(self) -> str | None:
        """`linger` (outbound, channel gone, socket stays for the last events), `disconnect`, or None (inbound)."""
        return self.headers.get("Content-Disposition")

    @property
    def linger_time(self) -> int | None:
        value = self.headers.get("Linger-Time")
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    @property
    def controlled_session_uuid(self) -> str | None:
        return self.headers.get("Controlled-Session-UUID")


@dataclass(frozen=True, slots=True)
class LogLine:
    """A `log/data` frame (after `log <level>`)."""

    headers: Headers
    text: str

    @property
    def level(self) -> int | None:
        value = self.headers.get("Log-Level")
        return int(value) if value is not None and value.isdigit() else None


@dataclass(frozen=True, slots=True)
class AuthRequest:
    """The `auth/request` greeting of an inbound socket."""


@dataclass(frozen=True, slots=True)
class RudeRejection:
    """`text/rude-rejection`: refused by the switch's ACL before any greeting."""

    body: str


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A well-framed message of a content type this library does not know; kept rather than dropped."""

    frame: Frame


Message = AuthRequest | CommandReply | ApiResponse | Event | LogLine | DisconnectNotice | RudeRejection | UnknownFrame


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def parse_plain_event(data: bytes) -> Event:
    """The body of a `text/event-plain` frame: URL-encoded header lines, then an optional inner body.

    Values are percent-decoded as switch_url_encode produced them (no `+` for space).
    """
    head, _sep, rest = data.partition(b"\n\n")
    pairs: list[tuple[str, str]] = []
    body: str | None = None
    inner_length: int | None = None
    for line in _text(head).split("\n"):
        if not line:
            continue
        name, colon, value = line.partition(": ")
        if not colon:
            name, colon, value = line.partition(":")
            if not colon:
                raise ProtocolError(f"event header line without a colon: {line[:80]!r}")
            value = value.lstrip(" ")
        if name == "Content-Length":
            if not value.isdigit():
                raise ProtocolError(f"bad inner Content-Length {value[:20]!r}")
            inner_length = int(value)
            continue
        pairs.append((name, unquote(value) if "%" in value else value))
    if inner_length is not None:
        if len(rest) < inner_length:
            raise ProtocolError("event body shorter than its inner Content-Length")
        body = _text(rest[:inner_length])
    return Event(Headers(pairs), body, "plain")


def _json_value(value: object) -> str:
    # Array headers come as JSON lists; give them the same text a plain event carries.
    if isinstance(value, list) and all(not isinstance(item, tuple) for item in value):
        return "ARRAY::" + "|:".join(str(item) for item in value)
    return value if isinstance(value, str) else json.dumps(value)


def parse_json_event(data: bytes) -> Event:
    """The body of a `text/event-json` frame: one object, the body under `_body`.

    FreeSWITCH writes every header as a string, or an array of strings for array headers
    (switch_event_serialize_json_obj); the arrays are turned into `ARRAY::` text when read.
    """
    if data.startswith(_REPEATS_NAMES):
        return _parse_json_event_pairs(data)
    try:
        document = _JSON.decode(data)
    except msgspec.DecodeError as error:
        raise ProtocolError(f"event-json body is not JSON: {error}") from None
    if not isinstance(document, dict):
        raise ProtocolError("event-json body is not a JSON object")
    body = document.pop("_body", None)
    if body is not None:
        document.pop("Content-Length", None)
        if not isinstance(body, str):
            body = json.dumps(body)
    return Event(Headers.from_json(document), body, "json")


# cJSON writes a key twice only where FreeSWITCH adds a header twice: CODEC repeats the write
# codec's headers and CHANNEL_HANGUP_COMPLETE its Hangup-Cause (every capture checked). Those take
# the slower path that keeps every pair, as plain events do; anywhere else a repeat would collapse.
_REPEATS_NAMES = (b'{"Event-Name":"CODEC"', b'{"Event-Name":"CHANNEL_HANGUP_COMPLETE"')
_JSON = msgspec.json.Decoder()


def _parse_json_event_pairs(data: bytes) -> Event:
    try:
        document = json.loads(data, object_pairs_hook=list)
    except ValueError as error:
        raise ProtocolError(f"event-json body is not JSON: {error}") from None
    if not isinstance(document, list):
        raise ProtocolError("event-json body is not a JSON object")
    body: str | None = None
    pairs: list[tuple[str, str]] = [
        (key, value if value.__class__ is str else _json_value(value)) for key, value in document
    ]
    # switch_event_serialize_json_obj writes the body last, after its Content-Length.
    if pairs and pairs[-1][0] == "_body":
        body = pairs[-1][1]
        pairs = [(key, value) for key, value in pairs[:-1] if key != "Content-Length"]
    return Event(Headers(pairs), body, "json")


def decode_frame(frame: Frame, command: str = "") -> Message:
    """Turn a frame into the message it carries."""
    content_type = frame.content_type
    if content_type == EVENT_PLAIN:
        return parse_plain_event(frame.body)
    if content_type == EVENT_JSON:
        return parse_json_event(frame.body)
    if content_type == COMMAND_REPLY:
        if frame.get("Event-Name") is not None:
            # The outbound `connect` reply is a serialized CHANNEL_DATA event: its values are URL-encoded.
            return CommandReply(Headers([(name, unquote(value)) for name, value in frame.headers]), command)
        return CommandReply(Headers(frame.headers), command)
    if content_type == API_RESPONSE:
        return ApiResponse(_text(frame.body), command)
    if content_type == AUTH_REQUEST:
        return AuthRequest()
    if content_type == DISCONNECT_NOTICE:
        return DisconnectNotice(Headers(frame.headers), _text(frame.body))
    if content_type == LOG_DATA:
        return LogLine(Headers(frame.headers), _text(frame.body))
    if content_type == RUDE_REJECTION:
        return RudeRejection(_text(frame.body))
    return UnknownFrame(frame)


@dataclass(slots=True)
class Command:
    """A command as a switch reads it: the command line, header lines, and an optional body."""

    line: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def get(self, name: str, default: str | None = None) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return default
