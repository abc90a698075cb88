"""Caller scenarios from files (JSON or YAML): registrations, calls with timed steps, and a load mode."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.channels.voice.simulator._switch import Endpoint, Switch

logger = logging.getLogger("backend.channels.voice.simulator")


@dataclass(slots=True)
class Step:
    """One thing the caller does, `after` seconds (scaled) after the previous step."""

    after: float = 0.0
    press: str | None = None
    """Digits to press."""
    via: str = "rtp"
    """`rtp` (RFC 2833) or `info` (SIP INFO)."""
    hangup: bool = False
    """Hang up (abandon) now."""
    transfer: str | None = None
    """uuid_transfer the call to this extension (what a transfer by the backend would do)."""
    cause: str = "NORMAL_CLEARING"


@dataclass(slots=True)
class CallPlan:
    destination: str
    caller_number: str = "15550100"
    caller_name: str = "Caller"
    from_user: str | None = None
    context: str | None = None
    at: float = 0.0
    """Seconds (scaled) after the scenario starts."""
    steps: list[Step] = field(default_factory=list)


@dataclass(slots=True)
class LoadPlan:
    destination: str
    calls_per_second: float = 1.0
    duration: float = 10.0
    """Seconds (real, not scaled) to keep placing calls."""
    hold: float = 5.0
    """Each caller hangs up after this many seconds (scaled)."""
    caller_prefix: str = "1555"


@dataclass(slots=True)
class Scenario:
    registrations: list[Endpoint] = field(default_factory=list)
    calls: list[CallPlan] = field(default_factory=list)
    load: LoadPlan | None = None


def parse_scenario(document: dict[str, Any]) -> Scenario:
    """Build a scenario from its JSON/YAML form (see docs/switch-simulator.md); unknown keys are refused."""
    allowed = {"registrations", "calls", "load"}
    unknown = set(document) - allowed
    if unknown:
        raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
    registrations = [
        Endpoint(
            user=str(item["user"]),
            domain=str(item.get("domain", "127.0.0.1")),
            behaviour=str(item.get("behaviour", "answer")),
            answer_delay=item.get("answer_delay"),
            transport=str(item.get("transport", "udp")),
            hangup_after=item.get("hangup_after"),
        )
        for item in document.get("registrations", [])
    ]
    calls = []
    for item in document.get("calls", []):
        steps = [Step(**step) for step in item.get("steps", [])]
        calls.append(
            CallPlan(
                destination=str(item["destination"]),
                caller_number=str(item.get("caller_number", "15550100")),
                caller_name=str(item.get("caller_name", "Caller")),
                from_user=item.get("from_user"),
                context=item.get("context"),
                at=float(item.get("at", 0)),
                steps=steps,
            )
        )
    load = LoadPlan(**document["load"]) if document.get("load") else None
    return Scenario(registrations, calls, load)


def load_scenario_file(path: str | Path) -> Scenario:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml  # type: ignore[import-untyped]

        document = yaml.safe_load(text)
    else:
        document = json.loads(text)
    if not isinstance(document, dict):
        raise ValueError(f"{path}: a scenario is a mapping")
    return parse_scenario(document)


async def play_call(switch: Switch, plan: CallPlan) -> str:
    """Place one call and walk its steps; returns the call's uuid once the steps are done."""
    await asyncio.sleep(switch.scaled(plan.at))
    uuid = await switch.place_call(
        plan.destination,
        caller_number=plan.caller_number,
        caller_name=plan.caller_name,
        from_user=plan.from_user,
        context=plan.context,
    )
    for step in plan.steps:
        await asyncio.sleep(switch.scaled(step.after))
        if switch.find(uuid) is None:
            break
        if step.press:
            switch.press(uuid, step.press, "INFO" if step.via.lower() == "info" else "RTP")
        if step.transfer:
            from backend.channels.voice.simulator._api import execute_api

            await execute_api(switch, "uuid_transfer", f"{uuid} {step.transfer}")
        if step.hangup:
            await switch.caller_hangup(uuid, step.cause)
    return uuid


async def run_load(switch: Switch, plan: LoadPlan) -> int:
    """Place `calls_per_second` calls for `duration` seconds; each hangs up after `hold`. Returns calls placed."""
    interval = 1.0 / max(plan.calls_per_second, 0.001)
    loop = asyncio.get_running_loop()
    end = loop.time() + plan.duration
    placed = 0
    while loop.time() < end:
        call = CallPlan(
            destination=plan.destination,
            caller_number=f"{plan.caller_prefix}{placed:06d}",
            steps=[Step(after=plan.hold, hangup=True)],
        )
        switch.spawn(play_call(switch, call), f"load-{placed}")
        placed += 1
        await asyncio.sleep(interval)
    logger.info("load: placed %d calls", placed)
    return placed


async def run_scenario(switch: Switch, scenario: Scenario) -> list[str]:
    """Register the phones, play the calls (concurrently) and the load; returns the calls' uuids."""
    for endpoint in scenario.registrations:
        if not await switch.register(endpoint):
            logger.warning("registration of %s@%s was refused", endpoint.user, endpoint.domain)
    calls = [asyncio.ensure_future(play_call(switch, plan)) for plan in scenario.calls]
    if scenario.load is not None:
        await run_load(switch, scenario.load)
    return list(await asyncio.gather(*calls))
