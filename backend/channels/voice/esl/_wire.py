"""Bytes on the wire: commands a client writes and the frames and events a switch writes, as FreeSWITCH does."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import cast

import msgspec

GOODBYE = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
"""The body of FreeSWITCH's `text/disconnect-notice` (67 bytes)."""
RUDE_REJECTION_TEXT = "Access Denied, go away.\n"

# SWITCH_URL_UNSAFE from switch_utils.h, plus every byte outside printable ASCII.
_UNSAFE = frozenset(b'\r\n #%&+:;<=>?@[\\]^`{|}"')
# The same bytes as characters (anything outside printable ASCII encodes to bytes outside it): one C scan
# tells whether a value needs escaping, and most do not.
_UNSAFE_TEXT = re.compile(r"[^\x20-\x7e]|[" + re.escape(bytes(sorted(_UNSAFE)).decode("ascii")) + "]")
_HEX = b"0123456789ABCDEF"
_HEX_DIGITS = frozenset(b"0123456789ABCDEFabcdef")

_JSON = msgspec.json.Encoder()


def url_encode(value: str) -> str:
    """switch_url_encode: escape unsafe bytes as %XX, but leave an existing `%XX` escape alone."""
    if _UNSAFE_TEXT.search(value) is None:
        return value
    data = value.encode("utf-8")
    out = bytearray()
    size = len(data)
    for index, byte in enumerate(data):
        if byte == 0x25 and index + 2 < size and data[index + 1] in _HEX_DIGITS and data[index + 2] in _HEX_DIGITS:
            out.append(byte)
        elif byte < 0x20 or byte > 0x7E or byte in _UNSAFE:
            out += b"%" + _HEX[byte >> 4 : (byte >> 4) + 1] + _HEX[byte & 0x0F : (byte & 0x0F) + 1]
        else:
            out.append(byte)
    return out.decode("ascii")


def _check_line(text: str, what: str) -> str:
    # A newline inside a command line or header would end it early and smuggle in another command.
    if "\n" in text or "\r" in text:
        raise ValueError(f"{what} may not contain a line break: {text[:60]!r}")
    return text


def encode_command(line: str, headers: Iterable[tuple[str, str]] = (), body: bytes | str | None = None) -> bytes:
    """A command as mod_event_socket reads it: the line, `Name: value` headers, an empty line, then a body."""
    parts = [_check_line(line, "command")]
    for name, value in headers:
        parts.append(f"{_check_line(name, 'header name')}: {_check_line(value, 'header value')}")
    payload = b""
    if body is not None:
        payload = body.encode("utf-8") if isinstance(body, str) else body
        parts.append(f"Content-Length: {len(payload)}")
    return ("\n".join(parts) + "\n\n").encode("utf-8") + payload


def serialize_plain(headers: Sequence[tuple[str, str]], body: str | None = None) -> bytes:
    """switch_event_serialize with URL encoding: what follows a `text/event-plain` frame's blank line."""
    lines = [f"{name}: {url_encode(value) or '_undef_'}\n" for name, value in headers]
    text = "".join(lines)
    if body:
        payload = body.encode("utf-8")
        return text.encode("utf-8") + f"Content-Length: {len(payload)}\n\n".encode() + payload
    return (text + "\n").encode("utf-8")


def serialize_json(headers: Sequence[tuple[str, str]], body: str | None = None) -> bytes:
    """switch_event_serialize_json: one flat object (repeated names kept, as cJSON writes them), the body last."""
    values = dict(headers)
    if len(values) != len(headers) or (body is not None and ("Content-Length" in values or "_body" in values)):
        return _serialize_json_members(headers, body)
    # No name repeats: one dict encoded at once writes the same bytes as member by member, several times faster.
    members = cast(dict[str, object], values)
    if "ARRAY::" in "".join(values.values()):
        for name, value in values.items():
            if value.startswith("ARRAY::"):
                members[name] = value[7:].split("|:")
    if body is not None:
        members["Content-Length"] = str(len(body.encode("utf-8")))
        members["_body"] = body
    return _JSON.encode(members)


def _serialize_json_members(headers: Sequence[tuple[str, str]], body: str | None) -> bytes:
    encode = _JSON.encode  # compact, UTF-8 as is: what json.dumps(ensure_ascii=False, separators=(",", ":")) writes
    members = []
    for name, value in headers:
        item: object = value[7:].split("|:") if value.startswith("ARRAY::") else value
        members.append(encode(name) + b":" + encode(item))
    if body is not None:
        members.append(b'"Content-Length":"%d"' % len(body.encode("utf-8")))
        members.append(b'"_body":' + encode(body))
    return b"{" + b",".join(members) + b"}"


def event_frame(event_format: str, headers: Sequence[tuple[str, str]], body: str | None = None) -> bytes:
    """A whole event frame; note the outer Content-Length comes before Content-Type, as FreeSWITCH writes it."""
    payload = serialize_json(headers, body) if event_format == "json" else serialize_plain(headers, body)
    return f"Content-Length: {len(payload)}\nContent-Type: text/event-{event_format}\n\n".encode() + payload


def reply_frame(text: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = ["Content-Type: command/reply", f"Reply-Text: {text}"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def body_frame(content_type: str, body: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """A frame with a body: `Content-Type`, `Content-Length`, then any further headers (log/data has some)."""
    payload = body.encode("utf-8")
    lines = [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    return ("\n".join(lines) + "\n\n").encode("utf-8") + payload
