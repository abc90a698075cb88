"""Drive a WebSocket route of the ASGI app in-process, in the test's event loop (httpx has no WebSocket)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Litestar


class AsgiWebSocket:
    """One in-process WebSocket connection: what the app sent, and a way to send to it."""

    def __init__(self) -> None:
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive_message(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next ASGI message the app sent (accept, send or close)."""
        return await asyncio.wait_for(self.from_app.get(), timeout)

    async def receive_json(self, timeout: float = 5.0) -> Any:
        """The next text frame, decoded."""
        while True:
            message = await self.receive_message(timeout)
            if message["type"] == "websocket.send":
                return json.loads(message.get("text") or message.get("bytes") or b"null")
            if message["type"] == "websocket.close":
                raise ConnectionError(f"closed with code {message.get('code')}")

    async def send_json(self, payload: Any) -> None:
        """Send a text frame to the app."""
        await self.to_app.put({"type": "websocket.receive", "text": json.dumps(payload)})


@contextlib.asynccontextmanager
async def websocket_connect(
    app: Litestar, path: str, *, query: str = "", headers: dict[str, str] | None = None
) -> AsyncIterator[AsgiWebSocket]:
    """Open a WebSocket to `path`; on exit the client disconnects."""
    socket = AsgiWebSocket()
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "ws",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50001),
        "server": ("127.0.0.1", 80),
        "subprotocols": [],
        "state": {},
    }
    await socket.to_app.put({"type": "websocket.connect"})

    async def receive() -> dict[str, Any]:
        return await socket.to_app.get()

    async def send(message: dict[str, Any]) -> None:
        await socket.from_app.put(message)

    task = asyncio.create_task(app(scope, receive, send))  # type: ignore[arg-type]
    try:
        yield socket
    finally:
        await socket.to_app.put({"type": "websocket.disconnect", "code": 1000})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
