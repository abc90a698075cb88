"""The routing engine: interactions move between PostgreSQL (the truth), the matcher (Redis) and agents (the hub).

Order of work for every step: the durable change first (interaction row and
timeline event in one transaction), then the matcher, then the notification.
A crash between two steps leaves PostgreSQL ahead of Redis, and `rebuild`
brings Redis back from PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

import msgspec
import phonenumbers
import structlog
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.db.base import utcnow
from backend.db.engine import driver_connection, session_driver, tenant_transaction
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound
from backend.routing import interactions, service
from backend.routing.hours import Schedule
from backend.routing.hub import AgentHub
from backend.routing.matcher import AgentRouting, Matcher, Offer, WaitingInteraction
from backend.routing.models import (
    DEFAULT_PRIORITY,
    AgentProfile,
    AgentState,
    Interaction,
    Queue,
)
from backend.routing.offers import OfferRecorder
from backend.routing.schemas import InteractionCreate, InteractionOut, QueueStats
from backend.routing.signals import RoutingSignal, SignalPublisher
from backend.tenants import service as tenants_service

log = structlog.get_logger("routing")

DEFAULT_CAPACITY = {"voice": 1, "webchat": 3, "wechat": 3}
ACCEPTING_STATES = ("available", "busy")
RECENT_HANDLED = 50
"""How many recent handled interactions of a queue the estimated wait is computed from."""
STATS_COALESCE_MS = 500
"""Queue figures are pushed at most this often per queue, however busy it is."""
MAX_CALLBACK_DAYS = 7
"""How far ahead a customer may schedule a callback."""
DEFAULT_HANDLE_SECONDS = 180.0
"""The handle time assumed for a queue that has handled nothing yet."""

OfferContextProvider = Callable[[uuid.UUID, uuid.UUID, InteractionOut], Awaitable[dict[str, Any]]]
"""Adds to an offer what the agent needs with it (tenant, agent, interaction -> extra payload): the screen pop."""


def now_ms() -> int:
    """Milliseconds since the epoch: the matcher's clock."""
    return int(time.time() * 1000)


def capacity_channel(channel: str) -> str:
    """Which capacity an interaction uses: a callback is a voice call."""
    return "voice" if channel in ("voice", "callback") else channel


@dataclass(frozen=True, slots=True)
class QueueRules:
    """The parts of a queue's settings the engine acts on, read in one statement (`queue_rules`, migration 0023)."""

    queue: Queue
    requirements: list[tuple[str, list[tuple[int, int]]]]
    schedule: Schedule | None
    """Its business hours (None without hours, or hours deleted since: open)."""
    anyone_logged_in: bool | None
    """For a queue with a no-agents action: whether any agent of the tenant is logged in."""

    def open_at(self, at: datetime) -> bool:
        return self.schedule is None or self.schedule.is_open(at)

    def refusal(self, at: datetime) -> tuple[str, dict[str, Any]] | None:
        """The outcome and action when the queue does not take a new contact now (closed, nobody logged in)."""
        if not self.open_at(at):
            return "closed", self.queue.closed_action
        if self.queue.no_agents_action.get("type", "none") != "none" and self.anyone_logged_in is False:
            return "no_agents", self.queue.no_agents_action
        return None


_QUEUE_RULES = "SELECT (r.r_queue).*, r.r_requirements, r.r_hours, r.r_anyone_logged_in FROM queue_rules($1, $2) AS r"
_QUEUE_COLUMNS = tuple(column.key for column in Queue.__table__.columns)


async def read_rules(driver: Any, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> QueueRules:
    """A queue's routing rules in one statement (422 when it is not a queue of the tenant). `driver` is a pooled
    asyncpg connection, or a transaction's (`session_driver`)."""
    row = await driver.fetchrow(_QUEUE_RULES, tenant_id, queue_id)
    if row is None:
        raise InvalidInput.field("queue_id", "is not a queue of this tenant")
    hours = row["r_hours"]
    return QueueRules(
        Queue(**{name: row[name] for name in _QUEUE_COLUMNS}),
        [
            (skill, [(int(s["after_seconds"]), int(s["min_level"])) for s in steps])
            for skill, steps in row["r_requirements"]
        ],
        Schedule.build(**hours) if hours else None,
        row["r_anyone_logged_in"],
    )


class RoutingEngine:
    """Creates, offers, connects and ends interactions; keeps agents' routing state in step."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        matcher: Matcher,
        hub: AgentHub,
        *,
        away_on_missed_offer: bool = True,
        signals: SignalPublisher | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.offers = OfferRecorder(sessionmaker)
        self.matcher = matcher
        self.hub = hub
        self.away_on_missed_offer = away_on_missed_offer
        self.signals = signals or SignalPublisher(matcher.redis)
        """Tells the channel holding a contact (voice call control) what routing did with it (`signals.py`)."""
        self.offer_context: list[OfferContextProvider] = []
        """Filled by the app's wiring (the customer store's screen pop); a failing provider never blocks an offer."""

    @property
    def _engine(self) -> AsyncEngine:
        """The engine under the sessionmaker: its pooled connections run the single-statement steps."""
        return cast(AsyncEngine, self.sessionmaker.kw["bind"])

    # --- queue rules --------------------------------------------------------------------------

    @staticmethod
    async def _rules(session: AsyncSession, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> QueueRules:
        """`read_rules` in the session's transaction (begun: `tenant_transaction` set its tenant)."""
        return await read_rules(await session_driver(session), tenant_id, queue_id)

    def _waiting(self, interaction: Interaction, rules: QueueRules) -> WaitingInteraction:
        assert interaction.queued_at is not None
        assert interaction.queue_id is not None
        return WaitingInteraction(
            interaction_id=interaction.id,
            queue_id=interaction.queue_id,
            channel=capacity_channel(interaction.channel),
            priority=interaction.priority,
            enqueued_ms=int(interaction.queued_at.timestamp() * 1000),
            offer_timeout_ms=rules.queue.offer_timeout_seconds * 1000,
            strategy=rules.queue.strategy,
            requirements=rules.requirements,
        )

    # --- interactions -------------------------------------------------------------------------

    async def create(self, tenant_id: uuid.UUID, data: InteractionCreate) -> InteractionOut:
        """Create an interaction durably and queue it (or apply the queue's closed action)."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            rules = await self._rules(session, tenant_id, data.queue_id)
            now = utcnow()
            interaction = Interaction(
                tenant_id=tenant_id,
                channel=data.channel,
                queue_id=data.queue_id,
                customer_ref=data.customer_ref,
                priority=data.priority if data.priority is not None else rules.queue.priority,
                attributes=dict(data.attributes),
                state="new",
                created_at=now,
            )
            session.add(interaction)
            await session.flush()
            await interactions.record(session, interaction, "created", channel=data.channel)
            waiting = await self._admit(session, interaction, rules, now)
            if waiting is None:
                return interactions.out(interaction)
        await self._queued(tenant_id, waiting, rules)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            found, _ = await interactions.get(session, interaction.id)
            return await self.describe(session, tenant_id, found)

    async def _admit(
        self, session: AsyncSession, interaction: Interaction, rules: QueueRules, now: datetime
    ) -> WaitingInteraction | None:
        """Put the interaction in the queue's line durably, or end it by the queue's closed or no-agent action."""
        refusal = rules.refusal(now)
        if refusal is not None:
            outcome, action = refusal
            await self._end(session, interaction, outcome, action=action)
            return None
        interaction.state = "queued"
        interaction.queue_id = rules.queue.id
        interaction.queued_at = now
        await interactions.record(session, interaction, "queued", queue_id=rules.queue.id)
        return self._waiting(interaction, rules)

    async def _queued(self, tenant_id: uuid.UUID, waiting: WaitingInteraction, rules: QueueRules) -> None:
        """After the durable write: the matcher holds it, it is offered if someone may take it, timers are set."""
        await self.matcher.enqueue(tenant_id, waiting)
        await self._offer(tenant_id, waiting)
        await self._schedule_wait(tenant_id, waiting, rules.queue.max_wait_seconds * 1000, waiting.enqueued_ms)
        await self.queue_changed(tenant_id, waiting.queue_id)

    async def describe(
        self, session: AsyncSession, tenant_id: uuid.UUID, interaction: Interaction, timeline: list[Any] | None = None
    ) -> InteractionOut:
        """The interaction as the API shows it: while waiting, with its place and estimated wait."""
        position = estimate = None
        if interaction.state == "queued" and interaction.queue_id is not None:
            position = await self.matcher.position(tenant_id, interaction.queue_id, interaction.id)
            if position is not None:
                estimate = await self.estimated_wait_seconds(session, tenant_id, interaction.queue_id, position)
        return interactions.out(interaction, position=position, estimated_wait=estimate, timeline=timeline)

    async def _schedule_wait(
        self, tenant_id: uuid.UUID, waiting: WaitingInteraction, max_wait_ms: int, after_ms: int
    ) -> None:
        """The next moment this waiting interaction needs attention: a skill step relaxing, or its maximum wait."""
        boundaries = [waiting.enqueued_ms + max_wait_ms]
        for _, steps in waiting.requirements:
            boundaries += [waiting.enqueued_ms + after * 1000 for after, _ in steps if after > 0]
        upcoming = [b for b in boundaries if b > after_ms]
        if upcoming:
            await self.matcher.schedule(tenant_id, f"wait:{waiting.interaction_id}", min(upcoming))

    async def estimated_wait_seconds(
        self, session: AsyncSession, tenant_id: uuid.UUID, queue_id: uuid.UUID, position: int
    ) -> int:
        """Position times the queue's recent average handle time, shared by the agents who can take work now."""
        recent = (
            select(func.extract("epoch", Interaction.ended_at - Interaction.connected_at).label("seconds"))
            .where(
                Interaction.queue_id == queue_id,
                Interaction.outcome == "handled",
                Interaction.connected_at.is_not(None),
            )
            .order_by(Interaction.ended_at.desc())
            .limit(RECENT_HANDLED)
            .subquery()
        )
        measured = await session.scalar(select(func.avg(recent.c.seconds)))
        average = float(measured) if measured is not None else DEFAULT_HANDLE_SECONDS
        agents = await session.scalar(
            select(func.count()).select_from(AgentState).where(AgentState.state.in_(ACCEPTING_STATES))
        )
        return round(position * average / max(1, agents or 0))

    async def _offer(self, tenant_id: uuid.UUID, waiting: WaitingInteraction, at_ms: int | None = None) -> list[Offer]:
        offers = await self.matcher.offer_interaction(tenant_id, waiting, at_ms if at_ms is not None else now_ms())
        for offer in offers:
            await self._offered(tenant_id, offer.interaction_id, offer.agents, offer.timeout_ms)
        return offers

    async def _offered(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agents: Sequence[uuid.UUID], timeout_ms: int
    ) -> None:
        """Record the offer durably (group-committed with concurrent offers), then push it to the agent, or to
        every agent a ring-all call rings."""
        offered = await self.offers.record(tenant_id, interaction_id, agents, timeout_ms)
        if offered is None:
            # It ended (the customer left) between the match and the write: free the agents it took.
            await self.matcher.finish(tenant_id, interaction_id)
            return
        await self.signals.publish(
            RoutingSignal(tenant_id, interaction_id, "offered", agents=tuple(agents), timeout_ms=timeout_ms)
        )
        payload = {
            "type": "offer",
            # Masked until an offer-context provider that knows the agent's rights shows more.
            "interaction": _plain(interactions.as_seen_by(offered, ())),
            "timeout_ms": timeout_ms,
            "ringing_agents": len(agents),
        }
        await self.matcher.wake(tenant_id, now_ms() + timeout_ms)
        for agent in agents:
            # What each agent sees with the offer (the caller's record, masked by their rights) is theirs.
            personal = dict(payload)
            for provide in self.offer_context:
                try:
                    personal.update(await provide(tenant_id, agent, offered))
                except Exception:
                    log.warning("offer_context_failed", interaction_id=str(interaction_id), exc_info=True)
            await self.hub.publish(tenant_id, agent, personal)

    async def accept(self, principal: Principal, interaction_id: uuid.UUID) -> InteractionOut:
        """The agent takes an offer: it is connected (for a chat; voice connects when the agent leg answers)."""
        tenant_id, agent = _who(principal)
        acceptance = await self.matcher.accept(tenant_id, interaction_id, agent, now_ms())
        if not acceptance.ok:
            await self._explain_refusal(tenant_id, interaction_id, acceptance.verdict)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state == "ended":
                # The customer left between the offer and the answer; ending it frees the agent in routing.
                raise Conflict("The customer has left", kind="interaction-ended")
            interaction.state = "connected"
            interaction.agent_id = agent
            interaction.connected_at = utcnow()
            await interactions.record(session, interaction, "offer_accepted", agent_id=agent)
            await interactions.record(session, interaction, "connected", agent_id=agent)
            state = await service.get_agent_state(session, tenant_id, agent)
            if state.state == "available":
                await service.set_system_state(session, tenant_id, agent, "busy")
            result = interactions.out(interaction)
        for other in acceptance.withdrawn:
            await self.hub.publish(
                tenant_id, other, {"type": "offer_withdrawn", "interaction_id": str(interaction_id), "reason": "taken"}
            )
        await self.signals.publish(
            RoutingSignal(tenant_id, interaction_id, "connected", agents=(agent,), channel=result.channel)
        )
        await self.queue_changed(tenant_id, result.queue_id)
        return result

    async def _explain_refusal(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, reason: str) -> None:
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            await interactions.get(session, interaction_id)  # 404 for other tenants' ids
        if reason == "not_yours":
            raise Forbidden("This interaction was offered to someone else", kind="not-your-offer")
        if reason == "expired":
            raise Conflict("The offer timed out and went back to the queue", kind="offer-expired")
        raise Conflict("This interaction has no open offer", kind="no-offer")

    async def reject(self, principal: Principal, interaction_id: uuid.UUID) -> None:
        """The agent declines: the interaction goes back to its old place and is offered again."""
        tenant_id, agent = _who(principal)
        result = await self.matcher.reject(tenant_id, interaction_id, agent)
        if result == "ringing":
            # A ring-all call goes on ringing the others; only this agent's refusal is recorded.
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                interaction = await interactions.lock(session, interaction_id)
                if interaction.state != "ended":
                    await interactions.record(session, interaction, "offer_rejected", agent_id=agent)
            await self.signals.publish(
                RoutingSignal(tenant_id, interaction_id, "offer_ended", agents=(agent,), reason="offer_rejected")
            )
            return
        if result != "ok":
            await self._explain_refusal(tenant_id, interaction_id, result)
        await self._returned(tenant_id, interaction_id, (agent,), "offer_rejected")

    async def _returned(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agents: Sequence[uuid.UUID], event: str, **data: Any
    ) -> None:
        """The offer ended without an answer: record it per agent, then offer the interaction again."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state == "ended":
                return  # the customer left meanwhile: nothing to put back
            # Another process may have offered it again already (Redis decides): then its offer stands.
            if await self.matcher.state(tenant_id, interaction_id) == "waiting":
                interaction.state = "queued"
                interaction.agent_id = None
            for agent in agents or (None,):
                await interactions.record(session, interaction, event, agent_id=agent, **data)
            assert interaction.queue_id is not None
            waiting = self._waiting(interaction, await self._rules(session, tenant_id, interaction.queue_id))
        if agents:
            await self.signals.publish(
                RoutingSignal(tenant_id, interaction_id, "offer_ended", agents=tuple(agents), reason=event)
            )
        await self._offer(tenant_id, waiting)

    async def end(self, principal: Principal, interaction_id: uuid.UUID, outcome: str = "handled") -> InteractionOut:
        """End an interaction (the agent finishes, the customer leaves); the agent goes to wrap-up."""
        tenant_id, actor = _who(principal)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state in ("ended", "wrap_up"):
                raise Conflict("The interaction has already ended", kind="already-ended")
            if interaction.agent_id is not None and interaction.agent_id != actor and not principal.can("queues:write"):
                raise Forbidden("Only the agent handling it, or a supervisor, may end this interaction")
            agent, wrap_up = await self._close(session, interaction, outcome)
            result = interactions.out(interaction)
        await self._released(tenant_id, interaction_id, agent, wrap_up, result.queue_id, result.outcome)
        return result

    async def end_from_channel(
        self,
        tenant_id: uuid.UUID,
        interaction_id: uuid.UUID,
        *,
        outcome: str | None = None,
        at: datetime | None = None,
        **data: Any,
    ) -> InteractionOut | None:
        """A channel reports the contact is over (the caller hung up, the call's switch node was lost).

        The interaction ends as handled if an agent had it, abandoned if it was still waiting, or with
        `outcome` when given (`node_failure`); its agent's capacity is freed. Idempotent: an interaction
        already ended (or unknown to this tenant) is left alone and None is returned.
        """
        # The end is reported by call control and by both CDR paths: those that come second learn it in one read;
        # the first writes the end in one more, made on the state it read (read again if that changed meanwhile).
        for _ in range(_END_ATTEMPTS):
            async with driver_connection(self._engine) as driver:
                interaction = await interactions.row(driver, tenant_id, interaction_id)
            if interaction is None:
                log.warning(
                    "channel_end_unknown_interaction", tenant_id=str(tenant_id), interaction=str(interaction_id)
                )
                return None
            if interaction.state in ("ended", "wrap_up"):
                return None
            if (
                interaction.channel == "callback"
                and interaction.state in ("queued", "offered")
                and outcome
                in (
                    None,
                    "node_failure",
                )
            ):
                # The caller hung up after asking to be called back: the callback keeps its place.
                return None
            ending = outcome
            disposition = data.get("disposition")
            if ending is None and disposition not in (None, "answered"):
                if interaction.channel == "callback" and interaction.state == "connected":
                    # Our dial-out's agent leg was not answered: the voice channel decides what follows.
                    return None
                if _outbound(interaction) and interaction.state != "connected":
                    ending = outbound_outcome(str(disposition))
            closing = _closing(interaction, ending or "handled")
            async with driver_connection(self._engine) as driver:
                ended, wrap_up, interaction = await interactions.end(
                    driver,
                    interaction,
                    closing.outcome,
                    at=at or utcnow(),
                    wrap_up_lookup=closing.wraps_up,
                    data=data,
                )
            if ended:
                agent = interaction.agent_id if closing.releases_agent else None
                result = interactions.out(interaction)
                await self._released(tenant_id, interaction_id, agent, wrap_up, result.queue_id, result.outcome)
                return result
        raise RuntimeError(f"interaction {interaction_id} kept changing while its end was written")

    # --- contacts a channel holds itself (a call in its IVR, bridged by call control) ---------------

    async def open(
        self,
        tenant_id: uuid.UUID,
        *,
        channel: str,
        customer_ref: str | None = None,
        attributes: dict[str, str] | None = None,
    ) -> InteractionOut:
        """A contact that does not wait for an agent yet (a call in its IVR): `created`, state new, no queue.

        The channel records its own steps with `note` and queues it with `enqueue` (or ends it).
        """
        # One statement (`open_interaction`, migration 0017): the row and its `created` event.
        interaction = Interaction(
            tenant_id=tenant_id,
            id=uuid.uuid4(),
            channel=channel,
            queue_id=None,
            customer_ref=customer_ref[:120] if customer_ref else None,
            team_id=None,
            priority=DEFAULT_PRIORITY,
            attributes=dict(attributes or {}),
            state="new",
            agent_id=None,
            outcome=None,
            queued_at=None,
            connected_at=None,
            ended_at=None,
            last_seq=1,
            created_at=utcnow(),
        )
        async with driver_connection(self._engine) as driver:
            await interactions.open_new(driver, interaction)
        return interactions.out(interaction)

    async def open_outbound(
        self,
        tenant_id: uuid.UUID,
        agent_id: uuid.UUID,
        *,
        customer_ref: str | None,
        queue_id: uuid.UUID | None = None,
        attributes: dict[str, str] | None = None,
    ) -> InteractionOut:
        """A call an agent places (click-to-call): `created` with the agent, who is busy from now on.

        The interaction stays `new` (no queue line; `queue_id` only attributes it) while the channel dials;
        the channel connects it with `connect_direct` when the customer answers, or ends it with the outcome of
        the attempt (`agent_no_answer`, `customer_busy`, ...), which frees the agent without wrap-up. Refused
        with 409 when the agent already uses their voice capacity.
        """
        load = await self.matcher.load(tenant_id, agent_id)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            if queue_id is not None:
                await self._rules(session, tenant_id, queue_id)  # the tenant's queue, or 422
            profile = await session.scalar(select(AgentProfile).where(AgentProfile.user_id == agent_id))
            capacity = (profile.capacity if profile is not None else DEFAULT_CAPACITY).get("voice", 1)
            if load.get("voice", 0) >= capacity:
                raise Conflict("You are already on a call", kind="agent-on-a-call")
            interaction = Interaction(
                tenant_id=tenant_id,
                channel="voice",
                queue_id=queue_id,
                customer_ref=customer_ref[:120] if customer_ref else None,
                attributes={**(attributes or {}), "direction": "outbound"},
                state="new",
                agent_id=agent_id,
                created_at=utcnow(),
            )
            session.add(interaction)
            await session.flush()
            await interactions.record(
                session, interaction, "created", agent_id=agent_id, channel="voice", direction="outbound"
            )
            await service.mark_busy(session, tenant_id, agent_id)
            result = interactions.out(interaction)
            waiting = _unqueued(interaction)
        await self.matcher.restore_connected(tenant_id, waiting, agent_id)
        await self.sync_agent(tenant_id, agent_id)
        return result

    async def note(
        self,
        tenant_id: uuid.UUID,
        interaction_id: uuid.UUID,
        name: str,
        *,
        agent_id: uuid.UUID | None = None,
        **data: Any,
    ) -> bool:
        """Append one of the channel's own events (`ivr_step`, `held`, `resumed`) to the timeline, durably.

        Nothing moves in routing. Returns False (and records nothing) once the interaction has ended, or when the
        tenant has no such interaction. One statement (`record_channel_event`, migration 0013).
        """
        if name not in CHANNEL_EVENTS:
            raise ValueError(f"{name!r} is not an event a channel records itself")
        payload = msgspec.json.encode({k: str(v) if isinstance(v, uuid.UUID) else v for k, v in data.items()})
        async with driver_connection(self._engine) as driver:
            recorded = await driver.fetchval(
                _RECORD_CHANNEL_EVENT, tenant_id, interaction_id, name, agent_id, utcnow(), payload.decode()
            )
        return bool(recorded)

    async def enqueue(
        self,
        tenant_id: uuid.UUID,
        interaction_id: uuid.UUID,
        queue_id: uuid.UUID,
        *,
        priority: int | None = None,
        attributes: dict[str, str] | None = None,
    ) -> InteractionOut:
        """Queue a contact the channel held so far (state new), exactly as `create` queues a new one.

        The queue's closed and no-agent actions apply: the result is then ended with their outcome. Otherwise it
        is the interaction as it was queued, without its place in line (`place` tells that, when it is wanted).
        """
        # What the decision needs in one statement, then the contact queued in one more; only a queue that refuses
        # it (closed, nobody logged in) takes the transaction that ends it.
        async with driver_connection(self._engine) as driver:
            rules = await read_rules(driver, tenant_id, queue_id)
        now = utcnow()
        chosen = priority if priority is not None else rules.queue.priority
        if rules.refusal(now) is None:
            async with driver_connection(self._engine) as driver:
                result, interaction = await interactions.queue(
                    driver, tenant_id, interaction_id, queue_id, priority=chosen, attributes=attributes or {}, at=now
                )
            if result != "queued":
                raise Conflict("Only a contact that is not queued yet can be queued", kind="not-new")
            queued = interactions.out(interaction)
            await self._queued(tenant_id, self._waiting(interaction, rules), rules)
            await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "queued", queue_id=queue_id))
            return queued
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state != "new":
                raise Conflict("Only a contact that is not queued yet can be queued", kind="not-new")
            interaction.priority = chosen
            if attributes:
                interaction.attributes = {**interaction.attributes, **attributes}
            waiting = await self._admit(session, interaction, rules, now)
            queued = interactions.out(interaction)
        if waiting is not None:  # the queue opened, or someone logged in, since the read: as above
            await self._queued(tenant_id, waiting, rules)
            await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "queued", queue_id=queue_id))
        return queued

    async def place(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> InteractionOut:
        """The interaction with its place in line and estimated wait (what a waiting caller is told)."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            found, _ = await interactions.get(session, interaction_id)
            return await self.describe(session, tenant_id, found)

    async def current_offer(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> Offer | None:
        """The interaction's open offer (agents and time left), for a channel that may have missed its signal."""
        return await self.matcher.current_offer(tenant_id, interaction_id)

    async def connect_from_channel(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID
    ) -> InteractionOut | None:
        """The channel reports the agent took the contact (voice: the agent's leg answered and is bridged).

        The switch is the truth: the customer is talking to this agent, so the interaction is connected to
        them even if the offer expired or went to someone else meanwhile (those are withdrawn). None when it
        has ended (the customer left first).
        """
        acceptance = await self.matcher.accept(tenant_id, interaction_id, agent_id, now_ms())
        withdrawn = list(acceptance.withdrawn)
        forced = not acceptance.ok
        if forced:
            # The matcher did not offer it to this agent: its routing state is rebuilt as connected to them while
            # the row is locked, so an end reported meanwhile waits and frees the agent after.
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                interaction = await interactions.lock(session, interaction_id)
                if interaction.state in ("ended", "wrap_up"):
                    return None
                if interaction.state == "connected" and interaction.agent_id == agent_id:
                    return interactions.out(interaction)
                current = await self.matcher.current_offer(tenant_id, interaction_id)
                withdrawn = [a for a in (current.agents if current else ()) if a != agent_id]
                await self.matcher.finish(tenant_id, interaction_id)
                outcome, interaction = await interactions.connect(
                    await session_driver(session), tenant_id, interaction_id, agent_id, forced=True
                )
                if interaction.queue_id is not None:
                    rules = await self._rules(session, tenant_id, interaction.queue_id)
                    await self.matcher.restore_connected(tenant_id, self._waiting(interaction, rules), agent_id)
        else:
            # The usual case, in one statement.
            async with driver_connection(self._engine) as driver:
                outcome, interaction = await interactions.connect(
                    driver, tenant_id, interaction_id, agent_id, forced=False
                )
            if outcome == "ended":
                await self.matcher.finish(tenant_id, interaction_id)
                return None
        result = interactions.out(interaction)
        if outcome == "already":
            return result
        for other in withdrawn:
            await self.hub.publish(
                tenant_id, other, {"type": "offer_withdrawn", "interaction_id": str(interaction_id), "reason": "taken"}
            )
        await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "connected", agents=(agent_id,)))
        if forced:
            await self.sync_agent(tenant_id, agent_id)
        await self.queue_changed(tenant_id, result.queue_id)
        return result

    async def decline_from_channel(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID, reason: str, **data: Any
    ) -> str:
        """The channel reports the agent did not take it (voice: their leg was not answered, busy or failed).

        `reason` is `no_answer` (recorded as `offer_timed_out`), `unreachable` (the phone could not be rung)
        or `declined` (busy or refused on the phone: `offer_rejected`). In each case the agent goes away like
        one who misses an offer, so the call is not put straight back to the same phone. The interaction
        goes back to its old place and is offered again. Returns the matcher's verdict: `ok`, `ringing` (a
        ring-all call still rings others), or why nothing was done (`not_offered`, `not_yours`, `expired`:
        the offer had already ended).
        """
        result = await self.matcher.reject(tenant_id, interaction_id, agent_id)
        event = "offer_rejected" if reason == "declined" else "offer_timed_out"
        if result not in ("ok", "ringing"):
            return result
        if self.away_on_missed_offer:
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                await service.set_system_state(session, tenant_id, agent_id, "away", "offer_timeout")
        await self.sync_agent(tenant_id, agent_id)
        if result == "ringing":
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                interaction = await interactions.lock(session, interaction_id)
                if interaction.state != "ended":
                    await interactions.record(session, interaction, event, agent_id=agent_id, reason=reason, **data)
            await self.signals.publish(
                RoutingSignal(tenant_id, interaction_id, "offer_ended", agents=(agent_id,), reason=event)
            )
            return result
        await self._returned(tenant_id, interaction_id, (agent_id,), event, reason=reason, **data)
        return result

    async def connect_direct(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID, **data: Any
    ) -> InteractionOut | None:
        """The channel put the contact straight through to an agent, outside any queue (an IVR transfer to an agent,
        a blind transfer): connected to them, the previous agent (if any) released to wrap-up; `transferred` is
        recorded when it had one. None when it has ended meanwhile."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state in ("ended", "wrap_up"):
                return None
            previous = interaction.agent_id if interaction.state == "connected" else None
            wrap_up = 0
            if previous is not None and previous != agent_id:
                await interactions.record(
                    session, interaction, "transferred", agent_id=previous, to_agent=agent_id, **data
                )
                if interaction.queue_id is not None:
                    queue = await session.scalar(select(Queue).where(Queue.id == interaction.queue_id))
                    wrap_up = queue.wrap_up_seconds if queue else 0
            interaction.state = "connected"
            interaction.agent_id = agent_id
            interaction.connected_at = interaction.connected_at or utcnow()
            if interaction.queued_at is None:
                interaction.queued_at = utcnow()
            await interactions.record(session, interaction, "connected", agent_id=agent_id, direct=True)
            await service.mark_busy(session, tenant_id, agent_id)
            rules = await self._rules(session, tenant_id, interaction.queue_id) if interaction.queue_id else None
            result = interactions.out(interaction)
            waiting = self._waiting(interaction, rules) if rules is not None else _unqueued(interaction)
        await self.matcher.finish(tenant_id, interaction_id)
        await self.matcher.restore_connected(tenant_id, waiting, agent_id)
        if previous is not None and previous != agent_id:
            await self._after_interaction(tenant_id, previous, wrap_up)
        await self.sync_agent(tenant_id, agent_id)
        await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "connected", agents=(agent_id,)))
        await self.queue_changed(tenant_id, result.queue_id)
        return result

    async def transfer_to_queue(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, queue_id: uuid.UUID, **data: Any
    ) -> InteractionOut:
        """The contact leaves its agent for another queue (a transfer): `transferred`, then `queued` there.

        The agent goes to wrap-up as after any interaction; the contact waits in the new queue from now.
        Raises NotFound for a queue that is not the tenant's (nothing changes).
        """
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            target = await session.scalar(select(Queue).where(Queue.id == queue_id))
            if target is None:
                raise NotFound("No such queue")
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state in ("ended", "wrap_up"):
                raise Conflict("The interaction has already ended", kind="already-ended")
            previous = interaction.agent_id if interaction.state == "connected" else None
            wrap_up = 0
            if previous is not None and interaction.queue_id is not None:
                queue = await session.scalar(select(Queue).where(Queue.id == interaction.queue_id))
                wrap_up = queue.wrap_up_seconds if queue else 0
            await interactions.record(session, interaction, "transferred", agent_id=previous, to_queue=queue_id, **data)
            rules = await self._rules(session, tenant_id, queue_id)
            interaction.agent_id = None
            interaction.state = "new"
            waiting = await self._admit(session, interaction, rules, utcnow())
            if waiting is None:
                result = interactions.out(interaction)
        await self.matcher.finish(tenant_id, interaction_id)
        if previous is not None:
            await self._after_interaction(tenant_id, previous, wrap_up)
        if waiting is None:
            await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "ended", outcome=result.outcome))
            return result
        await self._queued(tenant_id, waiting, rules)
        await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "queued", queue_id=queue_id))
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            found, _ = await interactions.get(session, interaction_id)
            return await self.describe(session, tenant_id, found)

    async def record_voicemail(
        self,
        tenant_id: uuid.UUID,
        *,
        voicemail_id: uuid.UUID,
        queue_id: uuid.UUID | None,
        agent_id: uuid.UUID | None,
        caller_number: str,
        duration_ms: int | None,
        interaction_id: uuid.UUID | None = None,
    ) -> InteractionOut:
        """A caller left a voicemail: a voice interaction that ends with the outcome `voicemail`.

        The call's own interaction is ended that way when it is given and still open (a caller who
        chose voicemail while waiting leaves the queue); otherwise a new one is created, with the
        `created` and `ended` events, so the message shows in the queue's (or agent's) history.
        """
        attributes = {"voicemail_id": str(voicemail_id), "caller_number": caller_number}
        if interaction_id is not None:
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                try:
                    existing = await interactions.lock(session, interaction_id)
                except NotFound:
                    existing = None
                if existing is not None and existing.state not in ("ended", "wrap_up"):
                    existing.attributes = {**existing.attributes, **attributes}
                    agent, wrap_up = await self._close(
                        session, existing, "voicemail", voicemail_id=voicemail_id, duration_ms=duration_ms
                    )
                    result = interactions.out(existing)
                elif existing is not None and existing.outcome == "voicemail":
                    # The call's channel already ended it as a voicemail when the caller began the message
                    # (so the caller's hang-up could not make it abandoned): the message joins it.
                    existing.attributes = {**existing.attributes, **attributes}
                    return interactions.out(existing)
                else:
                    existing = None
            if existing is not None:
                await self._released(tenant_id, interaction_id, agent, wrap_up, result.queue_id, result.outcome)
                return result
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            if queue_id is not None:
                await self._rules(session, tenant_id, queue_id)  # the tenant's queue, or 422
            now = utcnow()
            interaction = Interaction(
                tenant_id=tenant_id,
                channel="voice",
                queue_id=queue_id,
                customer_ref=caller_number[:120] or None,
                attributes={**attributes, "voicemail": "true"},
                state="new",
                agent_id=agent_id,
                created_at=now,
            )
            session.add(interaction)
            await session.flush()
            await interactions.record(session, interaction, "created", channel="voice", voicemail=True)
            await self._end(session, interaction, "voicemail", voicemail_id=voicemail_id, duration_ms=duration_ms)
            result = interactions.out(interaction)
        await self.queue_changed(tenant_id, queue_id)
        return result

    async def _close(
        self, session: AsyncSession, interaction: Interaction, outcome: str, *, at: datetime | None = None, **data: Any
    ) -> tuple[uuid.UUID | None, int]:
        """End the interaction in the transaction; returns its agent (if one had it) and their wrap-up time."""
        closing = _closing(interaction, outcome)
        agent = interaction.agent_id if closing.releases_agent else None
        await self._end(session, interaction, closing.outcome, at=at, **data)
        wrap_up = 0
        if agent is not None and closing.wraps_up and interaction.queue_id is not None:
            wrap_up = await session.scalar(select(Queue.wrap_up_seconds).where(Queue.id == interaction.queue_id)) or 0
        return agent, wrap_up

    async def _released(
        self,
        tenant_id: uuid.UUID,
        interaction_id: uuid.UUID,
        agent: uuid.UUID | None,
        wrap_up: int,
        queue_id: uuid.UUID | None,
        outcome: str | None = None,
    ) -> None:
        if agent is None:
            await self.matcher.finish(tenant_id, interaction_id)
        else:
            # The agent comes free: ending the interaction and offering them their next one is one matcher step
            # (one round trip, and no other process can take the agent in between).
            freed = await self.matcher.finish_and_offer(tenant_id, interaction_id, agent, now_ms(), wrap_up=wrap_up > 0)
            await self._after_interaction(tenant_id, agent, wrap_up, held_nothing=freed.held_nothing, offer=freed.offer)
        await self.queue_changed(tenant_id, queue_id)
        await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "ended", outcome=outcome))

    async def _end(
        self, session: AsyncSession, interaction: Interaction, outcome: str, *, at: datetime | None = None, **data: Any
    ) -> None:
        interaction.state = "ended"
        interaction.outcome = outcome
        interaction.ended_at = at or utcnow()
        if outcome == "abandoned":
            waited = (interaction.ended_at - interaction.queued_at).total_seconds() if interaction.queued_at else 0.0
            await interactions.record(
                session, interaction, "abandoned", at=interaction.ended_at, waited_seconds=round(max(0.0, waited), 3)
            )
        await interactions.record(
            session,
            interaction,
            "ended",
            agent_id=interaction.agent_id,
            at=interaction.ended_at,
            outcome=outcome,
            **data,
        )

    async def _after_interaction(
        self,
        tenant_id: uuid.UUID,
        agent: uuid.UUID,
        wrap_up_seconds: int,
        *,
        held_nothing: bool | None = None,
        offer: Offer | None = None,
    ) -> None:
        """The agent's state once an interaction left them: available or wrap-up if they hold nothing else.

        `held_nothing` and `offer` come from `Matcher.finish_and_offer` when the matcher already offered the
        agent their next interaction: the state follows from what they held before that offer, and the offer
        is recorded after the state so their timeline reads available, then offered."""
        if held_nothing is None:
            held_nothing = not any((await self.matcher.load(tenant_id, agent)).values())
        try:
            # The release and what the matcher is told of the agent after it, in one statement.
            wrapping, routing = await self._agent_routing(
                tenant_id, agent, release=held_nothing, wrap_up=wrap_up_seconds > 0
            )
        finally:
            # The matcher made the offer already: even if the state could not be written, the offer is recorded
            # and reaches the agent (unannounced, it would time out and send them away for a missed offer).
            if offer is not None:
                await self._offered(tenant_id, offer.interaction_id, offer.agents, offer.timeout_ms)
        if wrapping:
            await self.matcher.schedule(tenant_id, f"wrapup:{agent}", now_ms() + wrap_up_seconds * 1000)
        await self._route_agent(tenant_id, routing)

    async def request_callback(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, number: str, at: datetime | None
    ) -> InteractionOut:
        """Turn a waiting interaction into a callback that keeps its place (or is scheduled for `at`)."""
        parsed = _phone(number)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state != "queued" or interaction.queue_id is None:
                raise Conflict("Only a waiting interaction can become a callback", kind="not-waiting")
            rules = await self._rules(session, tenant_id, interaction.queue_id)
            if at is not None:
                self._check_callback_time(rules, at)
            interaction.channel = "callback"
            interaction.attributes = {**interaction.attributes, "callback_number": parsed}
            if at is not None:
                interaction.attributes = {**interaction.attributes, "callback_at": at.isoformat()}
            await interactions.record(
                session, interaction, "callback_requested", number=parsed, scheduled_for=at.isoformat() if at else None
            )
            waiting = self._waiting(interaction, rules)
        rank = await self.matcher.finish_keep_rank(tenant_id, interaction_id)
        if at is None:
            # Same place in the line: the old rank, now as a voice-capacity callback.
            await self.matcher.enqueue(tenant_id, waiting, rank=rank)
            await self._offer(tenant_id, waiting)
        else:
            await self.matcher.schedule(tenant_id, f"callback:{interaction_id}", int(at.timestamp() * 1000))
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            found, _ = await interactions.get(session, interaction_id)
            return await self.describe(session, tenant_id, found)

    @staticmethod
    def _check_callback_time(rules: QueueRules, at: datetime) -> None:
        if at.tzinfo is None:
            raise InvalidInput.field("at", "must carry a UTC offset")
        now = utcnow()
        if at <= now or (at - now).total_seconds() > MAX_CALLBACK_DAYS * 86_400:
            raise InvalidInput.field("at", f"must be in the future and within {MAX_CALLBACK_DAYS} days")
        if not rules.open_at(at):
            raise InvalidInput.field("at", "is outside the queue's business hours")

    async def _callback_due(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, moment: int) -> None:
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state != "queued" or interaction.queue_id is None:
                return
            # A scheduled callback joins the line as if it had arrived at its time.
            interaction.queued_at = utc_from_ms(moment)
            await interactions.record(session, interaction, "queued", queue_id=interaction.queue_id, scheduled=True)
            rules = await self._rules(session, tenant_id, interaction.queue_id)
            waiting = self._waiting(interaction, rules)
        await self.matcher.enqueue(tenant_id, waiting)
        await self._offer(tenant_id, waiting, moment)
        await self._schedule_wait(tenant_id, waiting, rules.queue.max_wait_seconds * 1000, moment)

    # --- real-time view -----------------------------------------------------------------------

    async def queue_stats(self, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> QueueStats:
        """Waiting count, longest wait, agents by state, and today's service level and abandonment."""
        waiting_ids = await self.matcher.waiting(tenant_id, queue_id)
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            queue = await session.scalar(select(Queue).where(Queue.id == queue_id))
            if queue is None:
                raise NotFound("No such queue")
            tenant = await tenants_service.get_tenant(session, tenant_id)
            zone = ZoneInfo(tenant.time_zone)
            start_of_day = datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0)
            longest = 0.0
            if waiting_ids:
                oldest = await session.scalar(
                    select(func.min(Interaction.queued_at)).where(Interaction.id.in_(waiting_ids))
                )
                longest = max(0.0, (utcnow() - oldest).total_seconds()) if oldest else 0.0
            # Counted by the database: pushed every STATS_COALESCE_MS while calls move, this must not grow with
            # the day's calls (it loaded every one of them).
            answered_at = Interaction.connected_at.is_not(None)
            waited = func.extract("epoch", Interaction.connected_at - Interaction.queued_at)
            today = (
                await session.execute(
                    select(
                        func.count(),
                        func.count().filter(answered_at),
                        func.count().filter(Interaction.outcome == "abandoned"),
                        func.count().filter(answered_at, waited <= queue.service_level_seconds),
                    ).where(Interaction.queue_id == queue_id, Interaction.queued_at >= start_of_day)
                )
            ).one()
            by_state = dict(
                (await session.execute(select(AgentState.state, func.count()).group_by(AgentState.state))).all()
            )
        offered, answered, abandoned, within = (int(count) for count in today)
        decided = answered + abandoned
        return QueueStats(
            queue_id=queue_id,
            waiting=len(waiting_ids),
            longest_wait_seconds=round(longest, 1),
            agents={state: int(count) for state, count in by_state.items()},
            offered_today=offered,
            answered_today=answered,
            abandoned_today=abandoned,
            answered_within_target_today=within,
            service_level_percent=round(100 * within / decided, 1) if decided else None,
            abandonment_percent=round(100 * abandoned / decided, 1) if decided else None,
            at=utcnow(),
        )

    async def queue_changed(self, tenant_id: uuid.UUID, queue_id: uuid.UUID | None) -> None:
        """Ask for the queue's figures to be pushed to supervisors soon (changes within that delay coalesce)."""
        if queue_id is not None:
            await self.matcher.schedule_once(tenant_id, f"stats:{queue_id}", now_ms() + STATS_COALESCE_MS)

    async def _push_stats(self, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> None:
        stats = await self.queue_stats(tenant_id, queue_id)
        await self.hub.publish_to_permitted(tenant_id, "reports:read", {"type": "queue_stats", **_plain(stats)})

    # --- agents -------------------------------------------------------------------------------

    async def sync_agent(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> None:
        """Copy an agent's state, capacity and skills to the matcher; if they can take work, offer them some."""
        _, routing = await self._agent_routing(tenant_id, user_id)
        await self._route_agent(tenant_id, routing)

    async def _agent_routing(
        self, tenant_id: uuid.UUID, user_id: uuid.UUID, *, release: bool = False, wrap_up: bool = False
    ) -> tuple[bool, AgentRouting]:
        """What the matcher needs of an agent: availability, capacity (no voice without a softphone) and skills;
        first released from busy when `release` (their last contact is over). Returns whether they now wrap up."""
        facts = await service.agent_facts(self._engine, tenant_id, user_id, release=release, wrap_up=wrap_up)
        capacity = dict(facts.capacity if facts.capacity is not None else DEFAULT_CAPACITY)
        if not facts.voice_registered:
            capacity["voice"] = 0  # no softphone, no calls
        return facts.moved and wrap_up, AgentRouting(
            user_id=user_id,
            available=facts.state in ACCEPTING_STATES,
            capacity=capacity,
            skills=facts.skills,
            idle_since_ms=int(facts.since.timestamp() * 1000) if facts.since is not None else 0,
        )

    async def _route_agent(self, tenant_id: uuid.UUID, routing: AgentRouting) -> None:
        await self.matcher.set_agent(tenant_id, routing)
        if routing.available:
            await self.offer_agent(tenant_id, routing.user_id)

    async def offer_agent(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> int:
        """Offer the agent waiting work until their capacity is used; returns how many offers were made."""
        made = 0
        while (found := await self.matcher.offer_agent(tenant_id, user_id, now_ms())) is not None:
            await self._offered(tenant_id, found.interaction_id, found.agents, found.timeout_ms)
            made += 1
        return made

    # --- timers and recovery ------------------------------------------------------------------

    async def tick(self, tenant_id: uuid.UUID, at_ms: int | None = None) -> int:
        """Run the tenant's due timers: offers past their time, relaxing skills, maximum waits, wrap-ups.

        Returns how many offers expired. Each timer is popped atomically, so several processes may tick.
        """
        moment = at_ms if at_ms is not None else now_ms()
        expired = await self.matcher.expire_offers(tenant_id, moment)
        missed: dict[uuid.UUID, list[uuid.UUID]] = {}
        for interaction_id, agent in expired:
            missed.setdefault(interaction_id, []).append(agent)
        if self.away_on_missed_offer:
            # Everyone who missed an offer is away before any of those interactions is offered again.
            for agent in {a for agents in missed.values() for a in agents}:
                async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                    await service.set_system_state(session, tenant_id, agent, "away", "offer_timeout")
                await self.sync_agent(tenant_id, agent)
        for interaction_id, agents in missed.items():
            await self._returned(tenant_id, interaction_id, agents, "offer_timed_out")
        for timer in await self.matcher.due_timers(tenant_id, moment):
            kind, _, ident = timer.partition(":")
            try:
                if kind == "wait":
                    await self._wait_timer(tenant_id, uuid.UUID(ident), moment)
                elif kind == "wrapup":
                    await self._wrap_up_over(tenant_id, uuid.UUID(ident))
                elif kind == "callback":
                    await self._callback_due(tenant_id, uuid.UUID(ident), moment)
                elif kind == "stats":
                    await self._push_stats(tenant_id, uuid.UUID(ident))
            except NotFound:
                continue  # the interaction or agent is gone
        following = await self.matcher.next_due(tenant_id)
        if following is not None:
            await self.matcher.wake(tenant_id, following)
        return len(missed)

    async def _wait_timer(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, moment: int) -> None:
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            interaction = await interactions.lock(session, interaction_id)
            if interaction.state != "queued" or interaction.queue_id is None:
                return
            rules = await self._rules(session, tenant_id, interaction.queue_id)
            waiting = self._waiting(interaction, rules)
            overdue = moment >= waiting.enqueued_ms + rules.queue.max_wait_seconds * 1000
            action = rules.queue.overflow_action
            target: uuid.UUID | None = None
            if overdue and action.get("type", "none") != "none":
                await interactions.record(session, interaction, "overflowed", action=action.get("type"))
                if action.get("type") == "queue" and action.get("queue_id"):
                    target = uuid.UUID(action["queue_id"])
                    interaction.queue_id = target
                    interaction.queued_at = utcnow()
                    await interactions.record(session, interaction, "queued", queue_id=target)
                    moved = self._waiting(interaction, await self._rules(session, tenant_id, target))
                else:
                    await self._end(session, interaction, "overflowed", action=action)
        if overdue and action.get("type", "none") != "none":
            await self.matcher.finish(tenant_id, interaction_id)
            if target is not None:
                target_rules_wait = moved
                await self.matcher.enqueue(tenant_id, target_rules_wait)
                await self.signals.publish(RoutingSignal(tenant_id, interaction_id, "queued", queue_id=target))
                await self._offer(tenant_id, target_rules_wait)
            else:
                await self.signals.publish(
                    RoutingSignal(tenant_id, interaction_id, "ended", outcome="overflowed", action=dict(action))
                )
            return
        # A skill requirement relaxed: someone may now qualify.
        await self._offer(tenant_id, waiting, moment)
        await self._schedule_wait(tenant_id, waiting, rules.queue.max_wait_seconds * 1000, moment)

    async def _wrap_up_over(self, tenant_id: uuid.UUID, agent: uuid.UUID) -> None:
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            state = await service.get_agent_state(session, tenant_id, agent)
            if state.state != "wrap_up":
                return
            await service.set_system_state(session, tenant_id, agent, "available")
        await self.sync_agent(tenant_id, agent)

    async def ensure_state(self) -> int:
        """If Redis lost routing state (restart, flush), rebuild every tenant's from PostgreSQL, once.

        The marker key disappears with the state; the first process to notice takes a short lock and
        rebuilds, the others wait for the marker. Returns how many interactions were restored here.
        """
        if await self.matcher.state_marker_present():
            return 0
        if not await self.matcher.take_rebuild_lock():
            return 0
        restored = 0
        try:
            async with self.sessionmaker() as session:
                tenant_ids = await tenants_service.active_tenant_ids(session)
            for tenant_id in tenant_ids:
                restored += await self.rebuild(tenant_id)
            await self.matcher.set_state_marker()
            log.warning("routing_state_rebuilt", tenants=len(tenant_ids), interactions=restored)
        finally:
            await self.matcher.release_rebuild_lock()
        return restored

    async def run_timers(self, stop: asyncio.Event, max_sleep_seconds: float = 1.0) -> None:
        """Tick tenants when their timers fall due; sleeps until the earliest one (at most `max_sleep_seconds`)."""
        while not stop.is_set():
            try:
                await self.ensure_state()
            except Exception:
                log.exception("routing_rebuild_failed")
            moment = now_ms()
            for tenant_id in await self.matcher.due_tenants(moment):
                try:
                    await self.tick(tenant_id, moment)
                except Exception:
                    log.exception("routing_tick_failed", tenant_id=str(tenant_id))
                    await self.matcher.wake(tenant_id, now_ms() + 1000)
            earliest = await self.matcher.earliest_timer()
            delay = (
                max_sleep_seconds
                if earliest is None
                else min(max_sleep_seconds, max(0.0, (earliest - now_ms()) / 1000))
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def rebuild(self, tenant_id: uuid.UUID) -> int:
        """Restore the tenant's routing state in Redis from PostgreSQL (after Redis lost it)."""
        await self.matcher.clear(tenant_id)
        restored = 0
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            open_items = await interactions.open_interactions(session)
            agents = (await session.scalars(select(AgentState.user_id))).all()
            plans: list[tuple[Interaction, WaitingInteraction]] = []
            for interaction in open_items:
                if interaction.queue_id is not None and interaction.queued_at is not None:
                    plans.append(
                        (
                            interaction,
                            self._waiting(interaction, await self._rules(session, tenant_id, interaction.queue_id)),
                        )
                    )
        for interaction, waiting in plans:
            await self.matcher.enqueue(tenant_id, waiting)
            if interaction.state == "offered":
                # The offer may have been lost with Redis: the interaction waits again at its old place.
                rang = (interaction.agent_id,) if interaction.agent_id else ()
                await self._returned(tenant_id, interaction.id, rang, "offer_timed_out")
                restored += 1
                continue
            if interaction.state == "connected" and interaction.agent_id is not None:
                await self.matcher.restore_connected(tenant_id, waiting, interaction.agent_id)
            restored += 1
        for user_id in agents:
            await self.sync_agent(tenant_id, user_id)
        return restored


CHANNEL_EVENTS = frozenset({"ivr_step", "held", "resumed"})
_RECORD_CHANNEL_EVENT = "SELECT record_channel_event($1, $2, $3, $4, $5, $6::jsonb)"
"""Timeline events a channel records itself through `RoutingEngine.note` (routing records the rest)."""


@dataclass(frozen=True, slots=True)
class _Closing:
    """How an interaction ends, decided on its state before the end is written."""

    outcome: str
    releases_agent: bool
    """Whether its agent comes free (it was connected, or it was the agent's own call still dialling)."""
    wraps_up: bool
    """Whether its queue's wrap-up time applies to that agent."""


def _closing(interaction: Interaction, outcome: str) -> _Closing:
    dialling = _outbound(interaction) and interaction.state == "new"
    connected = interaction.state == "connected"
    final = outcome if connected or outcome != "handled" else "abandoned"
    if dialling and outcome == "handled":
        final = "cancelled"  # the agent's own call ended before the customer answered
    return _Closing(final, releases_agent=connected or dialling, wraps_up=connected and not dialling)


_END_ATTEMPTS = 10
"""Times a channel's end is read and written again because the interaction's state changed in between."""


NO_QUEUE = uuid.UUID(int=0)
"""The matcher's queue for a contact connected outside any queue (it never waits in a line)."""


def _unqueued(interaction: Interaction) -> WaitingInteraction:
    return WaitingInteraction(
        interaction_id=interaction.id,
        queue_id=NO_QUEUE,
        channel=capacity_channel(interaction.channel),
        priority=interaction.priority,
        enqueued_ms=int((interaction.queued_at or interaction.created_at).timestamp() * 1000),
        offer_timeout_ms=0,
        strategy="longest_idle",
    )


def _who(principal: Principal) -> tuple[uuid.UUID, uuid.UUID]:
    if principal.tenant_id is None or principal.user_id is None:
        raise NotFound("No such interaction")
    return principal.tenant_id, principal.user_id


def _phone(number: str) -> str:
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidInput.field("number", "is not a phone number in international format (+...)") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidInput.field("number", "is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def utc_from_ms(ms: int) -> datetime:
    """A matcher timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(ms / 1000, UTC)


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def _outbound(interaction: Interaction) -> bool:
    return interaction.attributes.get("direction") == "outbound"


OUTBOUND_AGENT_OUTCOMES = {
    "no_answer": "agent_no_answer",
    "busy": "agent_busy",
    "refused": "agent_busy",
    "cancelled": "cancelled",
    "node_failure": "node_failure",
}


def outbound_outcome(disposition: str) -> str:
    """How an agent's own call ends when their leg ended (`LegFacts.disposition`) before the customer answered."""
    if disposition == "answered":
        return "cancelled"
    return OUTBOUND_AGENT_OUTCOMES.get(disposition, "agent_unreachable")
