"""What the agent WebSocket understands of routing: state changes, and going away when the workspace drops."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.db.engine import tenant_transaction
from backend.lib.problems import Forbidden, InvalidInput
from backend.routing import service
from backend.routing.engine import RoutingEngine
from backend.routing.hub import AgentHub
from backend.routing.interactions import as_seen_by
from backend.routing.schemas import AgentStateChange

log = structlog.get_logger("routing.realtime")


def register(hub: AgentHub, sessionmaker: async_sessionmaker[AsyncSession], engine: RoutingEngine) -> None:
    """Teach the hub routing's messages."""

    def interaction_id(message: dict[str, Any]) -> uuid.UUID:
        try:
            return uuid.UUID(str(message.get("interaction_id")))
        except ValueError as exc:
            raise InvalidInput.field("interaction_id", "is not an interaction id") from exc

    def workspace(principal: Principal) -> None:
        if not principal.can("agent:workspace"):
            raise Forbidden("Requires permission agent:workspace")

    async def accept(principal: Principal, message: dict[str, Any]) -> dict[str, Any]:
        workspace(principal)
        accepted = await engine.accept(principal, interaction_id(message))
        return {"type": "accepted", "interaction": msgspec.to_builtins(as_seen_by(accepted, principal.permissions))}

    async def reject(principal: Principal, message: dict[str, Any]) -> dict[str, Any]:
        workspace(principal)
        target = interaction_id(message)
        await engine.reject(principal, target)
        return {"type": "rejected", "interaction_id": str(target)}

    async def set_state(principal: Principal, message: dict[str, Any]) -> dict[str, Any]:
        if not principal.can("agent:workspace"):
            raise Forbidden("Requires permission agent:workspace")
        try:
            change = msgspec.convert({k: v for k, v in message.items() if k != "type"}, AgentStateChange)
        except msgspec.ValidationError as exc:
            raise InvalidInput(str(exc)) from exc
        assert principal.tenant_id is not None
        async with tenant_transaction(sessionmaker, principal.tenant_id) as session:
            state = await service.set_own_state(session, principal, change)
        await engine.sync_agent(principal.tenant_id, state.user_id)
        return {"type": "state", **msgspec.to_builtins(state)}

    async def went_away(principal: Principal) -> None:
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        async with tenant_transaction(sessionmaker, principal.tenant_id) as session:
            current = await service.get_agent_state(session, principal.tenant_id, principal.user_id)
            if current.state == "available":
                await service.set_system_state(session, principal.tenant_id, principal.user_id, "away", "disconnected")
                log.info("agent_disconnected_away", user_id=str(principal.user_id))
        await engine.sync_agent(principal.tenant_id, principal.user_id)

    hub.on("set_state", set_state)
    hub.on("accept", accept)
    hub.on("reject", reject)
    hub.on_last_disconnect(went_away)
