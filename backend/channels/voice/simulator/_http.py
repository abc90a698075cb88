"""Plain HTTP/1.1 over asyncio streams: the exact requests libcurl makes for FreeSWITCH, and a tiny JSON server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

logger = logging.getLogger("backend.channels.voice.simulator")


@dataclass(frozen=True, slots=True)
class HttpResult:
    """What came back from a request: status 0 means no HTTP answer at all (refused, reset, timeout)."""

    status: int
    body: bytes = b""
    error: str = ""
    headers: tuple[tuple[str, str], ...] = ()


async def post(
    url: str,
    body: bytes,
    *,
    content_type: str,
    user_agent: str,
    timeout: float,
    credentials: str = "",
    content_type_first: bool = False,
) -> HttpResult:
    """One POST on a new connection, headers in libcurl's order (Host, User-Agent, Accept, then ours)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc}"]
    if credentials:
        token = base64.b64encode(credentials.encode()).decode()
        lines.append(f"Authorization: Basic {token}")
    lines += [f"User-Agent: {user_agent}", "Accept: */*"]
    if content_type_first:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    else:
        lines += [f"Content-Length: {len(body)}", f"Content-Type: {content_type}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            status_line = await reader.readline()
            pieces = status_line.decode("latin-1").split(" ", 2)
            if len(pieces) < 2 or not pieces[1].isdigit():
                return HttpResult(0, error=f"bad status line {status_line[:40]!r}")
            status = int(pieces[1])
            length: int | None = None
            chunked = False
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                elif name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if chunked:
                data = bytearray()
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    data += await reader.readexactly(size)
                    await reader.readline()
                payload = bytes(data)
            elif length is not None:
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read()
            return HttpResult(status, payload)
    except TimeoutError:
        return HttpResult(0, error="Timeout was reached")
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        return HttpResult(0, error=str(error) or type(error).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


JsonHandler = Callable[[str, str, dict[str, str], object], Awaitable[tuple[int, object]]]


class JsonServer:
    """A minimal HTTP/1.1 server for the test-control API: JSON in, JSON out, one request per connection."""

    def __init__(self, handler: JsonHandler, host: str, port: int) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").strip()
            method, _, rest = request_line.partition(" ")
            target = rest.rsplit(" ", 1)[0]
            path, _, query_string = target.partition("?")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            raw = await reader.readexactly(length) if length else b""
            query = dict(item.split("=", 1) for item in query_string.split("&") if "=" in item)
            try:
                payload = json.loads(raw) if raw else None
                status, result = await self.handler(method, path, query, payload)
            except (ValueError, KeyError, TypeError) as error:
                status, result = 400, {"error": str(error)}
            except LookupError as error:
                status, result = 404, {"error": str(error)}
            data = json.dumps(result).encode()
            reason = {200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found"}.get(status, "OK")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            logger.warning("control request failed: %s", error)
        finally:
            writer.close()


async def request(
    method: str,
    url: str,
    *,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    user_agent: str,
    timeout: float,
) -> HttpResult:
    """One request on a new connection (mod_http_cache's GET and PUT through libcurl), headers as given."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"User-Agent: {user_agent}", "Accept: */*"]
    lines += [f"{name}: {value}" for name, value in headers or []]
    if method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(data)
            await writer.drain()
            status_line = await reader.readline()
            pieces = status_line.decode("latin-1").split(" ", 2)
            if len(pieces) < 2 or not pieces[1].isdigit():
                return HttpResult(0, error=f"bad status line {status_line[:40]!r}")
            status = int(pieces[1])
            received: list[tuple[str, str]] = []
            length: int | None = None
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                received.append((name.strip(), value.strip()))
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if method == "HEAD":
                payload = b""
            elif length is not None:
                payload = await reader.readexactly(length)
            else:
                payload = await reader.read()
            return HttpResult(status, payload, headers=tuple(received))
    except TimeoutError:
        return HttpResult(0, error="Timeout was reached")
    except (OSError, asyncio.IncompleteReadError, ValueError) as error:
        return HttpResult(0, error=str(error) or type(error).__name__)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
