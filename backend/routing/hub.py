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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from litestar import WebSocket
from litestar.exceptions import WebSocketDisconnect
from redis.asyncio import Redis

from backend.auth.authenticate import Authenticator
from backend.auth.principal import Principal
from backend.lib.problems import Problem, Unauthenticated
from backend.lib.redis_keys import REVOCATION_CHANNEL, global_key, tenant_key
from backend.lib.tasks import cancel_and_wait

log = structlog.get_logger("hub")

MessageHandler = Callable[[Principal, dict[str, Any]], Awaitable[dict[str, Any]]]
DisconnectHandler = Callable[[Principal], Awaitable[None]]

DELIVERY_CHANNEL = global_key("hub", "deliver")
"""Pub/sub channel carrying messages for agents' connections, whichever process holds them."""

CLOSE_REVOKED = 4401
"""WebSocket close code sent when the connection's credentials were revoked."""


class AgentHub:
    """This process's open agent connections, by tenant and user."""

    def __init__(
        self,
        authenticator: Authenticator,
        redis: Redis,
        recheck_seconds: int,
        disconnect_grace_seconds: float = 30.0,
    ) -> None:
        self._authenticator = authenticator
        self._redis = redis
        self._recheck_seconds = recheck_seconds
        self._disconnect_grace_seconds = disconnect_grace_seconds
        self._handlers: dict[str, MessageHandler] = {}
        self._on_last_disconnect: DisconnectHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sockets: dict[tuple[uuid.UUID, uuid.UUID], dict[WebSocket[Any, Any, Any], Principal]] = defaultdict(dict)
        self._listener: asyncio.Task[None] | None = None

    def on_last_disconnect(self, handler: DisconnectHandler) -> None:
        """Call `handler` when a user's last connection has been gone for the grace period."""
        self._on_last_disconnect = handler

    async def start(self) -> None:
        """Begin listening for revocations."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="hub-revocations")

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        await cancel_and_wait(self._listener)
        self._listener = None
        for task in list(self._tasks):
            task.cancel()
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
                await pubsub.subscribe(REVOCATION_CHANNEL, DELIVERY_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = json.loads(message["data"])
                    if message.get("channel") == DELIVERY_CHANNEL:
                        if data.get("user_id"):
                            await self.send_to_user(
                                uuid.UUID(data["tenant_id"]), uuid.UUID(data["user_id"]), data["payload"]
                            )
                        else:
                            await self.send_to_permitted(
                                uuid.UUID(data["tenant_id"]), data["permission"], data["payload"]
                            )
                    else:
                        await self._on_revocation(data)
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

    def on(self, message_type: str, handler: MessageHandler) -> None:
        """Route client messages of one `type` to a handler whose answer (if any) is sent back."""
        self._handlers[message_type] = handler

    async def serve(self, socket: WebSocket[Any, Any, Any], principal: Principal) -> None:
        """Hold one agent connection open until it closes or its credentials are revoked."""
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        key = (principal.tenant_id, principal.user_id)
        self._sockets[key][socket] = principal
        await self._presence(principal, +1)
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self._recheck_seconds
        try:
            await socket.send_json({"type": "hello", "user_id": str(principal.user_id)})
            while True:
                try:
                    message = await asyncio.wait_for(socket.receive_json(), timeout=max(0.0, next_check - loop.time()))
                except TimeoutError:
                    message = None
                # Re-check on schedule even when the client keeps talking.
                if loop.time() >= next_check:
                    try:
                        await self._authenticator.recheck(principal)
                    except Unauthenticated:
                        await self._close_revoked(socket)
                        return
                    next_check = loop.time() + self._recheck_seconds
                if message is not None:
                    await socket.send_json(await self._dispatch(principal, message))
        except (WebSocketDisconnect, RuntimeError):
            return
        finally:
            self._sockets[key].pop(socket, None)
            if not self._sockets[key]:
                self._sockets.pop(key, None)
            await self._presence(principal, -1)

    async def _dispatch(self, principal: Principal, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return {"type": "error", "detail": "messages are JSON objects with a string `type`"}
        kind = message["type"]
        if kind == "ping":
            return {"type": "pong"}
        handler = self._handlers.get(kind)
        if handler is None:
            return {"type": "error", "detail": f"unknown message type {kind!r}"}
        try:
            return await handler(principal, message)
        except Problem as problem:
            return {
                "type": "error",
                "request": kind,
                "status": problem.status,
                "detail": problem.detail,
                "errors": problem.errors,
            }

    async def _presence(self, principal: Principal, delta: int) -> None:
        """Count the user's open connections across all processes; the last one closing starts the grace period."""
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        key = tenant_key(principal.tenant_id, "presence", str(principal.user_id))
        with contextlib.suppress(Exception):
            count = await self._redis.incrby(key, delta)
            if count <= 0:
                await self._redis.delete(key)
                if self._on_last_disconnect is not None:
                    self._spawn(self._after_grace(principal))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_grace(self, principal: Principal) -> None:
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        await asyncio.sleep(self._disconnect_grace_seconds)
        key = tenant_key(principal.tenant_id, "presence", str(principal.user_id))
        if int(await self._redis.get(key) or 0) > 0 or self._on_last_disconnect is None:
            return  # came back in time, here or on another process
        try:
            await self._on_last_disconnect(principal)
        except Exception:
            log.warning("disconnect_handler_failed", user_id=str(principal.user_id), exc_info=True)

    def connected(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Whether the user has a connection open in this process."""
        return bool(self._sockets.get((tenant_id, user_id)))

    async def publish(self, tenant_id: uuid.UUID, user_id: uuid.UUID, payload: dict[str, Any]) -> None:
        """Deliver a message to the user's connections in every process (Redis pub/sub fan-out)."""
        message = {"tenant_id": str(tenant_id), "user_id": str(user_id), "payload": payload}
        await self._redis.publish(DELIVERY_CHANNEL, json.dumps(message, default=str))

    async def publish_to_permitted(self, tenant_id: uuid.UUID, permission: str, payload: dict[str, Any]) -> None:
        """Deliver a message to every connection of the tenant whose user holds `permission` (e.g. wallboards)."""
        message = {"tenant_id": str(tenant_id), "user_id": None, "permission": permission, "payload": payload}
        await self._redis.publish(DELIVERY_CHANNEL, json.dumps(message, default=str))

    async def send_to_permitted(self, tenant_id: uuid.UUID, permission: str, payload: dict[str, Any]) -> int:
        """Push to this process's connections of the tenant whose user holds `permission`."""
        sent = 0
        for (tenant, _), sockets in list(self._sockets.items()):
            if tenant != tenant_id:
                continue
            for socket, principal in list(sockets.items()):
                if principal.can(permission):
                    with contextlib.suppress(Exception):
                        await socket.send_json(payload)
                        sent += 1
        return sent

    async def send_to_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID, payload: dict[str, Any]) -> int:
        """Push a message to every connection of one user in this process; returns how many got it."""
        sent = 0
        for socket in list(self._sockets.get((tenant_id, user_id), {})):
            with contextlib.suppress(Exception):
                await socket.send_json(payload)
                sent += 1
        return sent
