"""Routes of the routing domain: the agent WebSocket."""

from __future__ import annotations

from typing import Any

from litestar import WebSocket, websocket

from backend.auth.principal import Principal
from backend.routing.hub import AgentHub


@websocket("/api/v1/agent/ws", opt={"access": "tenant", "permission": "self"}, name="agent_ws")
async def agent_socket(socket: WebSocket[Principal, Any, Any]) -> None:
    """The agent workspace's connection: offers, state changes and notifications arrive here.

    Authenticate with `?ticket=` from `POST /api/v1/auth/ws-ticket` (browsers) or a bearer header.
    """
    hub: AgentHub = socket.app.state.hub
    await socket.accept()
    await hub.serve(socket, socket.user)
