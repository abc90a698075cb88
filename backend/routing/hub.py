"""The agent WebSocket hub: every real-time feature reaches agents and supervisors through it.

Connections are authenticated and tenant-scoped. A revocation published on
Redis closes the user's connections at once; each connection also re-checks
its credentials every `revocation_recheck_seconds`, so a missed message still
closes it well within a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import defaultdict
from typing import Any

import structlog
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect
from redis.asyncio import Redis

from backend.auth.authenticate import Authenticator
from backend.auth.principal import Principal
from backend.lib.problems import Unauthenticated
from backend.lib.redis_keys import REVOCATION_CHANNEL

log = structlog.get_logger("hub")

CLOSE_REVOKED = 4401
"""WebSocket close code sent when the connection's credentials were revoked."""


class AgentHub:
    """This process's open agent connections, by tenant and user."""

    def __init__(self, authenticator: Authenticator, redis: Redis, recheck_seconds: int) -> None:
        self._authenticator = authenticator
        self._redis = redis
        self._recheck_seconds = recheck_seconds
        self._sockets: dict[tuple[uuid.UUID, uuid.UUID], dict[WebSocket[Any, Any, Any], Principal]] = defaultdict(dict)
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin listening for revocations."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="hub-revocations")

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        for sockets in list(self._sockets.values()):
            for socket in list(sockets):
                with contextlib.suppress(Exception):
                    await socket.close(code=1001, reason="server shutting down")

    @property
    def connection_count(self) -> int:
        """Open connections in this process."""
        return sum(len(s) for s in self._sockets.values())

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(REVOCATION_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._on_revocation(json.loads(message["data"]))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis went away: keep trying; periodic re-checks cover the gap.
                log.warning("revocation_listener_lost", exc_info=True)
                await asyncio.sleep(1)

    async def _on_revocation(self, message: dict[str, str]) -> None:
        key = (uuid.UUID(message["tenant_id"]), uuid.UUID(message["user_id"]))
        session_id = message.get("session_id")
        for socket, principal in list(self._sockets.get(key, {}).items()):
            if session_id is None or str(principal.session_id) == session_id:
                await self._close_revoked(socket)

    async def _close_revoked(self, socket: WebSocket[Any, Any, Any]) -> None:
        with contextlib.suppress(Exception):
            await socket.send_json({"type": "revoked"})
            await socket.close(code=CLOSE_REVOKED, reason="credentials revoked")

    async def serve(self, socket: WebSocket[Any, Any, Any], principal: Principal) -> None:
        """Hold one agent connection open until it closes or its credentials are revoked."""
        assert principal.tenant_id is not None and principal.user_id is not None
        key = (principal.tenant_id, principal.user_id)
        self._sockets[key][socket] = principal
        try:
            await socket.send_json({"type": "hello", "user_id": str(principal.user_id)})
            while True:
                try:
                    message = await asyncio.wait_for(socket.receive_json(), timeout=self._recheck_seconds)
                except TimeoutError:
                    try:
                        await self._authenticator.recheck(principal)
                    except Unauthenticated:
                        await self._close_revoked(socket)
                        return
                    continue
                if isinstance(message, dict) and message.get("type") == "ping":
                    await socket.send_json({"type": "pong"})
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            self._sockets[key].pop(socket, None)
            if not self._sockets[key]:
                self._sockets.pop(key, None)

    async def send_to_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID, payload: dict[str, Any]) -> int:
        """Push a message to every connection of one user in this process; returns how many got it."""
        sent = 0
        for socket in list(self._sockets.get((tenant_id, user_id), {})):
            with contextlib.suppress(Exception):
                await socket.send_json(payload)
                sent += 1
        return sent
