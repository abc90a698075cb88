"""The click-to-call route: an agent asks to call a number (thin: `OutboundDesk`)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, post

from backend.auth.principal import Principal
from backend.channels.voice.call_control.outbound_calls import OutboundCallIn, OutboundCallOut, OutboundDesk


def _desk(request: Request[Any, Any, Any]) -> OutboundDesk:
    desk: OutboundDesk = request.app.state.outbound_calls
    return desk


class OutboundCallController(Controller):
    """Calls agents place: their phone rings first, then the customer's, with the tenant's caller id."""

    path = "/api/v1/voice/outbound-calls"
    tags = ["voice"]
    opt = {"access": "tenant"}

    @post("/", permission="calls:outbound", operation_id="place_outbound_call", status_code=202)
    async def place(self, request: Request[Principal, Any, Any], data: OutboundCallIn) -> OutboundCallOut:
        """Click-to-call: authorised by the tenant's outbound policy (403 with a `reason`, audited), the agent's
        phone rung, then the customer; progress arrives on the agent's hub (`outbound_call`) and the timeline."""
        return await _desk(request).place(request.user, data)
