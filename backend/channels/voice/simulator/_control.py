"""The test-control HTTP API on 127.0.0.1: script phones and callers, read what was asked of the switch."""

from __future__ import annotations

from typing import Any

from backend.channels.voice.simulator._scenario import parse_scenario, run_scenario
from backend.channels.voice.simulator._switch import Endpoint, Switch


class ControlApi:
    """Routes of the control endpoint; each returns (status, JSON document)."""

    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    async def __call__(self, method: str, path: str, query: dict[str, str], body: object) -> tuple[int, object]:
        switch = self.switch
        parts = [part for part in path.split("/") if part]
        payload: dict[str, Any] = body if isinstance(body, dict) else {}
        if method == "GET" and parts == ["health"]:
            return 200, {"status": "ok", "core_uuid": switch.core_uuid, "hostname": switch.config.hostname}
        if method == "GET" and parts == ["state"]:
            return 200, {
                "channels": switch.show_channels(),
                "registrations": [f"{e.user}@{e.domain}" for e in switch.registrations()],
                "listeners": len(switch.listeners),
                "eavesdrops": switch.eavesdrops(),
            }
        if method == "POST" and parts == ["registrations"]:
            endpoint = Endpoint(
                user=str(payload["user"]),
                domain=str(payload.get("domain", switch.config.domain)),
                behaviour=str(payload.get("behaviour", "answer")),
                answer_delay=payload.get("answer_delay"),
                transport=str(payload.get("transport", "udp")),
                hangup_after=payload.get("hangup_after"),
            )
            return 200, {"registered": await switch.register(endpoint)}
        if method == "DELETE" and len(parts) == 2 and parts[0] == "registrations":
            return 200, {"unregistered": switch.unregister(parts[1])}
        if method == "PATCH" and len(parts) == 2 and parts[0] == "endpoints":
            phone = switch.endpoints.get(parts[1])
            if phone is None:
                raise LookupError(f"no endpoint {parts[1]}")
            phone.behaviour = str(payload.get("behaviour", phone.behaviour))
            phone.answer_delay = payload.get("answer_delay", phone.answer_delay)
            phone.hangup_after = payload.get("hangup_after", phone.hangup_after)
            return 200, {"user": phone.user, "behaviour": phone.behaviour}
        if method == "PUT" and len(parts) == 2 and parts[0] == "far-ends":
            party = switch.far_end(
                parts[1],
                str(payload.get("behaviour", "answer")),
                answer_delay=payload.get("answer_delay"),
                hangup_after=payload.get("hangup_after"),
            )
            return 200, {"number": party.user, "behaviour": party.behaviour}
        if method == "POST" and parts == ["calls"]:
            uuid = await switch.place_call(
                str(payload["destination"]),
                caller_number=str(payload.get("caller_number", "15550100")),
                caller_name=str(payload.get("caller_name", "Caller")),
                from_user=payload.get("from_user"),
                context=payload.get("context"),
                uuid=payload.get("uuid"),
            )
            return 201, {"uuid": uuid}
        if method == "POST" and len(parts) == 3 and parts[0] == "calls" and parts[2] == "dtmf":
            ok = switch.press(parts[1], str(payload["digits"]), "INFO" if payload.get("via") == "info" else "RTP")
            if not ok:
                raise LookupError(f"no call {parts[1]}")
            return 200, {"pressed": payload["digits"]}
        if method == "POST" and len(parts) == 3 and parts[0] == "calls" and parts[2] == "hangup":
            if not await switch.caller_hangup(parts[1], str(payload.get("cause", "NORMAL_CLEARING"))):
                raise LookupError(f"no call {parts[1]}")
            return 200, {"hung_up": parts[1]}
        if method == "POST" and parts == ["scenarios"]:
            scenario = parse_scenario(payload)
            switch.spawn(run_scenario(switch, scenario), "scenario")
            return 201, {"calls": len(scenario.calls), "registrations": len(scenario.registrations)}
        if method == "POST" and parts == ["heartbeat"]:
            switch.fire_heartbeat()
            return 200, {"fired": True}
        if method == "GET" and parts == ["requests"]:
            kind = query.get("kind")
            items = [dict(item) for item in switch.requests if kind is None or item["kind"] == kind]
            return 200, {"requests": items}
        if method == "GET" and parts == ["cdrs"]:
            return 200, {"cdrs": list(switch.cdr_results)}
        raise LookupError(f"no route {method} {path}")
