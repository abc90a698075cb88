"""The voice channel's switchboard: what each node's inbound event socket feeds, and the cluster watchdog.

The inbound links (`links.py`: one connection per node, held by one worker under
a Redis lease) parse each event (`event json`: a mapping of header name to value)
and hand it here with the node's id; commands for the nodes go through
`commands` to whichever process holds the node. Nothing in this module speaks ESL. The watchdog
runs in the workers: it marks silent nodes down, then closes their live legs
(`node_failure` CDRs, interactions ended) and frees their agents, and drops
registrations that expired without an event.

Deadlines (defaults): a node silent for `switch_heartbeat_timeout_seconds` (6)
is down at the next watchdog pass (every `switch_watchdog_interval_seconds`, 1),
so within 7 s it gets no new calls (the dialplan refuses, `pick_node` skips it);
its failover runs in the same pass, so its agents are free well within 15 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.crypto import SecretBox
from backend.channels.voice.cdrs import CdrListener, CdrRecorder, InteractionTimeline, Recorded
from backend.channels.voice.channels import TRACKED_EVENTS, LiveChannels
from backend.channels.voice.commands import SwitchCommands
from backend.channels.voice.legs import Event, LegError, as_uuid, header
from backend.channels.voice.nodes import EslTarget, FailedNode, NodeChoice, NodeHealth, esl_targets
from backend.channels.voice.registrations import (
    REGISTRATION_EVENTS,
    RegisteredContact,
    RegistrationChange,
    Registrations,
)
from backend.config import Settings
from backend.routing.engine import RoutingEngine

log = structlog.get_logger("voice")

SUBSCRIBED_EVENTS = (
    "HEARTBEAT",
    *sorted(TRACKED_EVENTS),
    "CHANNEL_HANGUP_COMPLETE",
    "CUSTOM",
    *sorted(REGISTRATION_EVENTS),
)
"""What the inbound connection subscribes to (`event json <these>`): only the events used here."""


@dataclass
class FailoverReport:
    """What the failover of one lost node did."""

    node: FailedNode
    legs_closed: int = 0
    agents: list[RegistrationChange] = field(default_factory=list)


@dataclass
class WatchdogReport:
    """What one watchdog pass did."""

    down: list[FailedNode] = field(default_factory=list)
    failovers: list[FailoverReport] = field(default_factory=list)
    expired: list[RegistrationChange] = field(default_factory=list)


class VoiceSwitchboard:
    """Turns switch events into state: node health, live legs, CDRs, registrations; and handles lost nodes."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        redis: Redis,
        settings: Settings,
        routing: RoutingEngine,
        cdr_listeners: list[CdrListener] | None = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.box = SecretBox(settings.secret_key)
        self.health = NodeHealth(sessionmaker, settings)
        self.live = LiveChannels(redis)
        from backend.channels.voice.supervision import SupervisionLegs

        listeners: list[CdrListener] = [InteractionTimeline(routing), SupervisionLegs(sessionmaker, redis)]
        self.cdrs = CdrRecorder(sessionmaker, listeners + list(cdr_listeners or []))
        self.registrations = Registrations(sessionmaker, routing)
        self.commands = SwitchCommands(redis, self.health, settings)
        """Originate, hang up, eavesdrop...: sent through Redis to whichever process holds the node's socket."""

    # --- events from a node's inbound event socket ----------------------------------------------

    async def handle_event(self, node_id: uuid.UUID, event: Event, *, received_at: datetime | None = None) -> None:
        """Any event of the node (received at `received_at`, if not now); unknown ones are ignored. Never raises
        for a bad event (it is logged)."""
        name = header(event, "Event-Name")
        try:
            if name == "HEARTBEAT":
                await self.heartbeat(node_id, event, at=received_at)
            elif name == "CHANNEL_HANGUP_COMPLETE":
                await self.hangup_complete(node_id, event)
            elif name in TRACKED_EVENTS:
                await self.channel_event(node_id, event)
            elif name == "CUSTOM" and header(event, "Event-Subclass") in REGISTRATION_EVENTS:
                await self.registration_event(node_id, event)
        except LegError as exc:
            log.warning("switch_event_unusable", node_id=str(node_id), event_name=name, error=str(exc))

    async def heartbeat(self, node_id: uuid.UUID, event: Event | None = None, *, at: datetime | None = None) -> bool:
        """A HEARTBEAT (or the connection's first sign of life) received `at`: the node is up. Returns whether it
        just came up."""
        return await self.health.heartbeat(node_id, event, at=at)

    async def channel_event(self, node_id: uuid.UUID, event: Event) -> bool:
        """CHANNEL_CREATE, PROGRESS, PROGRESS_MEDIA, ANSWER, BRIDGE, UNBRIDGE or HANGUP: the live legs follow."""
        return await self.live.update(node_id, event)

    async def hangup_complete(self, node_id: uuid.UUID, event: Event) -> Recorded:
        """CHANNEL_HANGUP_COMPLETE: the leg's CDR is stored (committed), then the leg is no longer live.

        Raises `LegError` for an event that describes no leg (the leg, if named, is forgotten anyway), and
        the database's error if it cannot be reached: the caller retries, and mod_json_cdr still delivers.
        """
        try:
            result = await self.cdrs.record_event(event, node_id)
        except LegError:
            leg = as_uuid(header(event, "Unique-ID"))
            if leg is not None:
                await self.live.forget(node_id, leg)
            raise
        await self.live.forget(node_id, result.leg_uuid)
        return result

    async def registration_event(self, node_id: uuid.UUID, event: Event) -> RegistrationChange | None:
        """`sofia::register`, `sofia::unregister` or `sofia::expire`: where the seat's softphone is."""
        return await self.registrations.handle(node_id, event)

    async def reconcile_channels(self, node_id: uuid.UUID, live_uuids: list[str]) -> list[str]:
        """After a reconnect: the node's own list of channels (`show channels as json` uuids) is the truth."""
        return await self.live.reconcile(node_id, live_uuids)

    async def reconcile_registrations(
        self, node_id: uuid.UUID, rows: Sequence[Mapping[str, Any]]
    ) -> list[RegistrationChange]:
        """After a reconnect: the node's own registrations (`show registrations as json` rows) are the truth."""
        return await self.registrations.reconcile(node_id, rows)

    async def esl_targets(self) -> list[EslTarget]:
        """Every registered node with its event socket address and (decrypted) password, for the inbound links."""
        return await esl_targets(self.sessionmaker, self.box)

    # --- questions from routing and call control ------------------------------------------------

    async def pick_node(self, exclude: list[uuid.UUID] | None = None) -> NodeChoice | None:
        """The node for a new origination (callbacks, click-to-call): up, not draining, least loaded."""
        return await self.health.pick_node(exclude or [])

    async def where_registered(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> RegisteredContact | None:
        """The node and contact where the agent's softphone is registered, if anywhere that is up."""
        return await self.registrations.where_registered(tenant_id, user_id)

    # --- the watchdog -----------------------------------------------------------------------------

    async def fail_over(self, node: FailedNode) -> FailoverReport:
        """Close every live leg of a lost node (`node_failure` CDRs, interactions ended) and free its agents."""
        report = FailoverReport(node)
        for leg in await self.live.closed_legs(node.id):
            closed = leg.closed(node.last_alive)
            try:
                await self.cdrs.record(closed, "node_failure", node.id)
            except LegError as exc:
                log.warning("node_failure_leg_unusable", node=node.name, leg=str(leg.leg_uuid), error=str(exc))
            await self.live.forget(node.id, leg.leg_uuid)
            report.legs_closed += 1
        report.agents = await self.registrations.drop_node(node.id)
        await self.health.failover_done(node.id)
        log.warning(
            "switch_node_failed_over", node=node.name, legs_closed=report.legs_closed, agents=len(report.agents)
        )
        return report

    async def watchdog_once(self, now: datetime | None = None) -> WatchdogReport:
        """One pass: silent nodes go down, unhandled failovers run, expired registrations go."""
        report = WatchdogReport()
        report.down = await self.health.mark_silent_nodes_down(now)
        for node in await self.health.claim_failovers(now):
            report.failovers.append(await self.fail_over(node))
        report.expired = await self.registrations.sweep_expired(self.settings.sip_registration_grace_seconds, now)
        return report

    async def run_watchdog(self, stop: asyncio.Event) -> None:
        """Run `watchdog_once` every `switch_watchdog_interval_seconds` until `stop` is set."""
        while not stop.is_set():
            try:
                await self.watchdog_once()
            except Exception:
                log.exception("switch_watchdog_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.switch_watchdog_interval_seconds)
