"""Supervision: a supervisor listens to, whispers to or barges into an agent's live call, checked and recorded.

Each mode is its own permission (`calls:listen`, `calls:whisper`,
`calls:barge`); supervisors hold all three. A refusal is audited in its own
transaction and raised as 403 problem+json. `SupervisionDesk` keeps the record
(sessions, modes, audit); `LiveSupervision` drives the switch:

* start: the supervisor's softphone is rung where it is registered, from the
  node carrying the call (`originate ... &eavesdrop(<agent leg>)` through the
  node's holder; a phone registered on another node is reached at its contact),
  and the session opens once it answered. The supervisor's leg UUID is the
  session's id; it carries `cc_interaction_id`, `cc_call_id` (so its CDR joins
  the call without being its caller leg) and `cc_leg_role=supervision` (so it
  never counts as an agent's leg).
* modes: eavesdrop runs on the agent's leg. switch_ivr_eavesdrop_session mixes
  the eavesdropper into what is written to its target with ED_MUX_WRITE (the
  agent hears: whisper) and into what the target reads with ED_MUX_READ (the
  agent's partner, the caller, hears); barge is both. The starting mode is set
  by the leg's variables (`eavesdrop_whisper_bleg` = MUX_WRITE,
  `eavesdrop_whisper_aleg` = MUX_READ, as mod_dptools' eavesdrop_function reads
  them); a change is one of eavesdrop's DTMF commands (0 listen, 2 whisper, 3
  barge) queued on the supervisor's leg as received DTMF with `uuid_recv_dtmf`
  (`uuid_send_dtmf` would send the tones out to the phone: eavesdrop never sees
  those).
* end: `uuid_kill` of the supervisor's leg. Whichever way the leg ends (that,
  the supervisor hanging up, or eavesdrop returning because the agent's leg
  ended with the call) its CDR, which arrives through the node's link, closes
  the session (`SupervisionLegs`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice.commands import CommandTimeout, NodeUnavailable, SwitchCommandError
from backend.channels.voice.legs import (
    LEG_ROLE_SUPERVISION,
    VAR_CALL,
    VAR_INTERACTION,
    VAR_LEG_ROLE,
    VAR_SUPERVISION,
    VAR_TENANT,
    as_uuid,
)
from backend.channels.voice.models import SupervisionSession
from backend.channels.voice.registrations import contact_uri
from backend.channels.voice.schemas import SupervisionSessionOut
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, Forbidden, NotFound, Problem
from backend.lib.redis_keys import tenant_key
from backend.routing import interactions
from backend.tenants import audit
from backend.tenants import service as tenants

if TYPE_CHECKING:
    from backend.channels.voice.call_control.records import CallStore
    from backend.channels.voice.cdrs import Outcome
    from backend.channels.voice.legs import LegFacts
    from backend.channels.voice.service import VoiceSwitchboard

log = structlog.get_logger("voice.supervision")

Mode = Literal["listen", "whisper", "barge"]

MODE_KEYS: dict[str, str] = {"listen": "0", "whisper": "2", "barge": "3"}
"""switch_ivr_eavesdrop_session's DTMF commands, eavesdrop running on the agent's leg: 0 = neither MUX flag (listen),
2 = ED_MUX_WRITE only (the agent hears the supervisor), 3 = MUX_READ and MUX_WRITE (agent and caller hear)."""
START_VARIABLES: dict[str, dict[str, str]] = {
    "listen": {},
    "whisper": {"eavesdrop_whisper_bleg": "true"},
    "barge": {"eavesdrop_whisper_aleg": "true", "eavesdrop_whisper_bleg": "true"},
}
"""The same flags for the session's first mode, as eavesdrop_function reads them from the eavesdropper's leg."""
LIVE_TTL_SECONDS = 86_400


def permission_for(mode: Mode) -> str:
    """The permission a mode needs."""
    return f"calls:{mode}"


def session_out(row: SupervisionSession) -> SupervisionSessionOut:
    """The API's view of a supervision session."""
    return SupervisionSessionOut(
        row.id, row.supervisor_id, row.agent_id, row.interaction_id, row.call_uuid, row.mode, row.modes,
        row.started_at, row.ended_at,
    )  # fmt: skip


class SupervisionDesk:
    """Opens, switches and closes supervision sessions, checking the mode's permission each time."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self.sessionmaker = sessionmaker

    async def _refuse(self, principal: Principal, mode: Mode, interaction_id: uuid.UUID | None) -> Forbidden:
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            await audit.record_by(
                session,
                principal,
                action="supervision.refused",
                target_type="interaction",
                target_id=interaction_id,
                after={"mode": mode, "missing": permission_for(mode)},
            )
        log.warning(
            "supervision_refused",
            tenant_id=str(principal.tenant_id),
            user_id=str(principal.user_id),
            mode=mode,
            interaction=str(interaction_id),
        )
        return Forbidden(
            f"Requires permission {permission_for(mode)}",
            kind="supervision-forbidden",
            extra={"permission": permission_for(mode)},
        )

    async def check(self, principal: Principal, interaction_id: uuid.UUID, mode: Mode) -> uuid.UUID | None:
        """May this principal supervise this call in this mode now? Returns the call's agent.

        403 (audited) without the mode's permission, 404 for an interaction the tenant does not have, 409
        for one that is not a connected call or that the principal is handling.
        """
        assert principal.tenant_id is not None
        if not principal.can(permission_for(mode)):
            raise await self._refuse(principal, mode, interaction_id)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            interaction, _ = await interactions.get(session, interaction_id)  # 404 for another tenant's
            if interaction.state != "connected" or interaction.channel not in ("voice", "callback"):
                raise Conflict("Only a connected call can be supervised", kind="not-a-live-call")
            if interaction.agent_id == principal.user_id:
                raise Conflict("You are the agent on this call", kind="own-call")
            return interaction.agent_id

    async def start(
        self,
        principal: Principal,
        interaction_id: uuid.UUID,
        mode: Mode,
        call_uuid: uuid.UUID | None = None,
        *,
        session_id: uuid.UUID | None = None,
    ) -> SupervisionSessionOut:
        """A supervisor joins a connected call in a mode (`session_id`: the supervisor's leg, when there is one)."""
        assert principal.tenant_id is not None
        assert principal.user_id is not None
        if not principal.can(permission_for(mode)):
            raise await self._refuse(principal, mode, interaction_id)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            interaction, _ = await interactions.get(session, interaction_id)  # 404 for another tenant's
            if interaction.state != "connected" or interaction.channel not in ("voice", "callback"):
                raise Conflict("Only a connected call can be supervised", kind="not-a-live-call")
            if interaction.agent_id == principal.user_id:
                raise Conflict("You are the agent on this call", kind="own-call")
            now = utcnow()
            row = SupervisionSession(
                id=session_id or uuid.uuid4(),
                tenant_id=principal.tenant_id,
                supervisor_id=principal.user_id,
                agent_id=interaction.agent_id,
                interaction_id=interaction_id,
                call_uuid=call_uuid,
                mode=mode,
                modes=[{"mode": mode, "at": now.isoformat()}],
                started_at=now,
            )
            session.add(row)
            await session.flush()
            await audit.record_by(
                session,
                principal,
                action="supervision.start",
                target_type="interaction",
                target_id=interaction_id,
                after={"mode": mode, "agent_id": str(interaction.agent_id), "session_id": str(row.id)},
            )
            return session_out(row)

    async def check_mode(self, principal: Principal, session_id: uuid.UUID, mode: Mode) -> SupervisionSessionOut:
        """The principal's open session, if they may switch it to `mode` (403 audited, 404, 409 ended)."""
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            out = session_out(row)
        if not principal.can(permission_for(mode)):
            raise await self._refuse(principal, mode, out.interaction_id)
        return out

    async def own(self, principal: Principal, session_id: uuid.UUID) -> SupervisionSessionOut:
        """The principal's own session, open or not (404 for anyone else's)."""
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await session.scalar(select(SupervisionSession).where(SupervisionSession.id == session_id))
            if row is None or row.supervisor_id != principal.user_id:
                raise NotFound("No such supervision session")
            return session_out(row)

    async def change_mode(self, principal: Principal, session_id: uuid.UUID, mode: Mode) -> SupervisionSessionOut:
        """Switch an open session to another mode (listen → whisper → barge), with that mode's permission."""
        assert principal.tenant_id is not None
        await self.check_mode(principal, session_id, mode)
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            if row.mode != mode:
                row.modes = [*row.modes, {"mode": mode, "at": utcnow().isoformat()}]
                await audit.record_by(
                    session,
                    principal,
                    action="supervision.mode",
                    target_type="interaction",
                    target_id=row.interaction_id,
                    before={"mode": row.mode},
                    after={"mode": mode, "session_id": str(row.id)},
                )
                row.mode = mode
            return session_out(row)

    async def end(self, principal: Principal, session_id: uuid.UUID) -> SupervisionSessionOut:
        """The supervisor left (or the call ended)."""
        assert principal.tenant_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            row = await self._own_open(session, principal, session_id)
            row.ended_at = utcnow()
            await audit.record_by(
                session,
                principal,
                action="supervision.end",
                target_type="interaction",
                target_id=row.interaction_id,
                after={"session_id": str(row.id)},
            )
            return session_out(row)

    async def ended_by_switch(
        self, tenant_id: uuid.UUID, session_id: uuid.UUID, *, at: datetime | None = None, cause: str | None = None
    ) -> bool:
        """The supervisor's leg is gone (hung up, ended with the call, or killed by `end`): close the session if it
        is still open. Idempotent; True if this closed it."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            row = await session.scalar(
                select(SupervisionSession).where(SupervisionSession.id == session_id).with_for_update()
            )
            if row is None or row.ended_at is not None:
                return False
            row.ended_at = max(at or utcnow(), row.started_at)
            await audit.record(
                session,
                tenant_id=tenant_id,
                actor_type="system",
                actor_id=None,
                action="supervision.end",
                target_type="interaction",
                target_id=row.interaction_id,
                after={"session_id": str(row.id), "hangup_cause": cause},
            )
        log.info("supervision_ended_by_switch", tenant_id=str(tenant_id), session_id=str(session_id), cause=cause)
        return True

    @staticmethod
    async def _own_open(session: AsyncSession, principal: Principal, session_id: uuid.UUID) -> SupervisionSession:
        row = await session.scalar(
            select(SupervisionSession).where(SupervisionSession.id == session_id).with_for_update()
        )
        if row is None or row.supervisor_id != principal.user_id:
            raise NotFound("No such supervision session")
        if row.ended_at is not None:
            raise Conflict("The supervision session has ended", kind="supervision-ended")
        return row


async def list_sessions(
    session: AsyncSession,
    page: PageRequest,
    *,
    agent_id: uuid.UUID | None = None,
    supervisor_id: uuid.UUID | None = None,
) -> tuple[list[SupervisionSessionOut], str | None]:
    """Supervision sessions, newest first; filter by agent or supervisor."""
    statement = select(SupervisionSession)
    if agent_id is not None:
        statement = statement.where(SupervisionSession.agent_id == agent_id)
    if supervisor_id is not None:
        statement = statement.where(SupervisionSession.supervisor_id == supervisor_id)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"started_at": SupervisionSession.started_at},
        default_sort="-started_at",
        id_column=SupervisionSession.id,
    )
    return [session_out(r) for r in rows], cursor


class SupervisionLive(msgspec.Struct, frozen=True):
    """Where a running session's leg is (Redis, for the mode changes and the end)."""

    node_id: uuid.UUID
    leg: uuid.UUID
    interaction_id: uuid.UUID
    call_uuid: uuid.UUID
    target_leg: uuid.UUID


_LIVE = msgspec.json.Decoder(SupervisionLive)


def _live_key(tenant_id: uuid.UUID, session_id: uuid.UUID) -> str:
    return tenant_key(tenant_id, "supervision", str(session_id))


class SupervisorUnreachable(Conflict):
    """The supervisor's softphone is not registered (or did not answer): nothing was started."""

    kind = "supervisor-phone-unavailable"


class SwitchUnavailable(Problem):
    """The call's node cannot be reached now (no holder, or no answer in time): try again shortly."""

    status = 503
    kind = "switch-unavailable"
    title = "Switch unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "3"})


class LiveSupervision:
    """Supervision on the switch: rings the supervisor, runs eavesdrop on the agent's leg, switches modes, hangs up."""

    def __init__(
        self,
        desk: SupervisionDesk,
        switchboard: VoiceSwitchboard,
        calls: CallStore,
        redis: Redis,
        settings: Settings,
    ) -> None:
        self.desk = desk
        self.switchboard = switchboard
        self.calls = calls
        self.redis = redis
        self.settings = settings

    async def start(self, principal: Principal, interaction_id: uuid.UUID, mode: Mode) -> SupervisionSessionOut:
        """Ring the supervisor's phone and, once answered, eavesdrop on the call's agent leg in `mode`.

        403 (audited) without the mode's permission; 404 for another tenant's call; 409 when the call is not
        connected to an agent through call control, or the supervisor's phone is not registered or does not
        answer; 503 when the call's node cannot be reached.
        """
        assert principal.tenant_id is not None and principal.user_id is not None
        tenant_id = principal.tenant_id
        agent_id = await self.desk.check(principal, interaction_id, mode)
        record = await self.calls.for_interaction(tenant_id, interaction_id)
        if (
            record is None
            or record.phase != "bridged"
            or record.agent_leg is None
            or record.node_id is None
            or record.pending is not None
        ):
            raise Conflict("The call is not connected to an agent now", kind="not-bridged")
        contact = await self.switchboard.where_registered(tenant_id, principal.user_id)
        if contact is None:
            raise SupervisorUnreachable(
                "Your softphone is not registered: sign in to the workspace phone (or register your SIP phone) and "
                "try again"
            )
        async with tenant_transaction(self.desk.sessionmaker, tenant_id) as session:
            tenant = await tenants.find_tenant(session, tenant_id)
        if tenant is None:
            raise NotFound("No such tenant")
        if contact.node_id == record.node_id:
            endpoint = f"user/{contact.sip_username}@{tenant.sip_domain}"
        else:
            # Registered on another node: eavesdrop must run where the call is, so that node calls the contact.
            endpoint = f"sofia/{self.settings.switch_sip_profile}/{contact_uri(contact.contact)}"
        session_id = uuid.uuid4()
        ring = self.settings.supervision_ring_seconds
        variables = {
            VAR_TENANT: str(tenant_id),
            VAR_CALL: str(record.call_uuid),
            VAR_INTERACTION: str(interaction_id),
            VAR_LEG_ROLE: LEG_ROLE_SUPERVISION,
            VAR_SUPERVISION: str(session_id),
            "originate_timeout": str(ring),
            "origination_caller_id_name": "Supervision",
            "origination_caller_id_number": "0",
            "eavesdrop_enable_dtmf": "true",
            **START_VARIABLES[mode],
        }
        bound = log.bind(
            tenant_id=str(tenant_id), interaction_id=str(interaction_id), session_id=str(session_id), mode=mode
        )
        try:
            origination = await self.switchboard.commands.eavesdrop(
                record.node_id,
                record.agent_leg,
                endpoint,
                variables=variables,
                leg_uuid=session_id,
                within=ring + self.settings.switch_command_timeout_seconds,
            )
        except NodeUnavailable as exc:
            bound.warning("supervision_node_unavailable", error=str(exc))
            raise SwitchUnavailable("The call's switch node cannot be reached now") from exc
        except CommandTimeout as exc:
            bound.warning("supervision_originate_unknown", error=str(exc))
            raise SwitchUnavailable("The switch did not answer in time") from exc
        if not origination.ok:
            bound.info("supervision_not_answered", cause=origination.cause)
            raise SupervisorUnreachable(f"Your phone did not answer ({origination.cause or 'no answer'})")
        live = SupervisionLive(record.node_id, session_id, interaction_id, record.call_uuid, record.agent_leg)
        await self.redis.set(_live_key(tenant_id, session_id), msgspec.json.encode(live), ex=LIVE_TTL_SECONDS)
        try:
            out = await self.desk.start(principal, interaction_id, mode, record.call_uuid, session_id=session_id)
        except Exception:
            # The call ended meanwhile (or the record could not be written): the supervisor's leg goes.
            await self._hang_up(live, tenant_id)
            raise
        bound.info("supervision_started", agent_id=str(agent_id), node_id=str(record.node_id))
        # The leg may have ended between the answer and the row (the call ended): its CDR found no session.
        exists = await self._api(live, f"uuid_exists {session_id}")
        if exists is not None and exists.strip() == "false":
            await self.desk.ended_by_switch(tenant_id, session_id)
            return await self.desk.own(principal, session_id)
        return out

    async def change_mode(
        self, principal: Principal, interaction_id: uuid.UUID, session_id: uuid.UUID, mode: Mode
    ) -> SupervisionSessionOut:
        """Switch the running session to another mode: one of eavesdrop's DTMF commands on the supervisor's leg."""
        assert principal.tenant_id is not None
        current = await self.desk.check_mode(principal, session_id, mode)
        if current.interaction_id != interaction_id:
            raise NotFound("No such supervision session")
        if current.mode == mode:
            return current
        live = await self._live(principal.tenant_id, session_id)
        answer = await self._api(live, f"uuid_recv_dtmf {session_id} {MODE_KEYS[mode]}") if live else None
        if answer is None or not answer.startswith("+OK"):
            log.info("supervision_mode_not_sent", session_id=str(session_id), answer=(answer or "")[:80])
            if live is None or answer is not None:
                # The supervisor's leg is gone: the session is over (its CDR closes it, if not yet).
                await self.desk.ended_by_switch(principal.tenant_id, session_id)
                raise Conflict("The supervision session has ended", kind="supervision-ended")
            raise SwitchUnavailable("The call's switch node cannot be reached now")
        return await self.desk.change_mode(principal, session_id, mode)

    async def end(
        self, principal: Principal, interaction_id: uuid.UUID, session_id: uuid.UUID
    ) -> SupervisionSessionOut:
        """The supervisor leaves: their leg is hung up and the session closed."""
        assert principal.tenant_id is not None
        current = await self.desk.own(principal, session_id)
        if current.interaction_id != interaction_id:
            raise NotFound("No such supervision session")
        if current.ended_at is not None:
            raise Conflict("The supervision session has ended", kind="supervision-ended")
        live = await self._live(principal.tenant_id, session_id)
        if live is not None:
            await self._hang_up(live, principal.tenant_id)
        try:
            return await self.desk.end(principal, session_id)
        except Conflict:
            # Its CDR closed it first.
            return await self.desk.own(principal, session_id)

    async def _live(self, tenant_id: uuid.UUID, session_id: uuid.UUID) -> SupervisionLive | None:
        raw = await self.redis.get(_live_key(tenant_id, session_id))
        try:
            return _LIVE.decode(raw) if raw else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def _api(self, live: SupervisionLive, command: str) -> str | None:
        """An API command on the session's node: its output, or None when the node could not be reached."""
        try:
            reply = await self.switchboard.commands.api(live.node_id, command)
        except SwitchCommandError as exc:
            log.warning("supervision_command_failed", command=command.split(maxsplit=1)[0], error=str(exc))
            return None
        return reply.text

    async def _hang_up(self, live: SupervisionLive, tenant_id: uuid.UUID) -> None:
        await self._api(live, f"uuid_kill {live.leg} NORMAL_CLEARING")
        await self.redis.delete(_live_key(tenant_id, live.leg))


class SupervisionLegs:
    """A CDR listener: the end of a supervisor's leg (reported through the node's link) closes its session."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], redis: Redis | None = None) -> None:
        self.desk = SupervisionDesk(sessionmaker)
        self.redis = redis

    async def leg_recorded(self, tenant_id: uuid.UUID, cdr_id: uuid.UUID, leg: LegFacts, outcome: Outcome) -> None:
        """Close the session whose leg this is (idempotent)."""
        if leg.details.get(VAR_LEG_ROLE) != LEG_ROLE_SUPERVISION:
            return
        session_id = as_uuid(leg.details.get(VAR_SUPERVISION))
        if session_id is None:
            return
        await self.desk.ended_by_switch(tenant_id, session_id, at=leg.ended_at, cause=leg.hangup_cause)
        if self.redis is not None:
            await self.redis.delete(_live_key(tenant_id, session_id))
