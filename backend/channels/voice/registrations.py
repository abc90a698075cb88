"""SIP registrations of seats: which node each agent's softphone is registered on, and at which contact.

Fed by the `sofia::register`, `sofia::unregister` and `sofia::expire` events of
each node's inbound event socket. Routing follows them: an agent is
`voice_registered` (can take calls) while at least one registration on a node
that is up has not expired, and `where_registered` tells call control which
node and contact to bridge to.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.channels.voice.legs import VAR_TENANT, Event, as_uuid, header
from backend.channels.voice.legs import text as clean
from backend.channels.voice.models import Registration, SwitchNode
from backend.db.base import utcnow
from backend.db.engine import driver_connection, tenant_transaction
from backend.db.tenancy import set_tenant
from backend.routing import service as routing
from backend.routing.engine import RoutingEngine
from backend.tenants import service as tenants

log = structlog.get_logger("voice.registrations")

REGISTER = "sofia::register"
UNREGISTER = "sofia::unregister"
EXPIRE = "sofia::expire"
REGISTRATION_EVENTS = frozenset({REGISTER, UNREGISTER, EXPIRE})
_URI = re.compile(r"<([^>]*)>")
_TRANSPORT_PARAM = re.compile(r";transport=([A-Za-z]+)", re.IGNORECASE)
_STATUS_TRANSPORT = re.compile(r"Registered\(([A-Za-z]+)", re.IGNORECASE)
_TRANSPORTS = {"udp", "tcp", "tls", "ws", "wss"}
_PROFILE_PREFIX = re.compile(r"^sofia/[^/]+/")
MAX_EXPIRES_SECONDS = 7 * 86400
_REGISTERED_CONTACT = "SELECT * FROM registered_contact($1, $2, $3)"


def contact_uri(contact: str) -> str:
    """The SIP URI inside a Contact (`"" <sip:1001@10.0.0.7:5090;transport=ws>` gives the part in brackets)."""
    match = _URI.search(contact)
    return (match.group(1) if match else contact).strip()


def transport_of(contact: str, status: str | None) -> str:
    """How the softphone reaches us: the contact's `transport=`, else sofia's status (`Registered(WSS-NAT)`)."""
    match = _TRANSPORT_PARAM.search(contact)
    if match and match.group(1).lower() in _TRANSPORTS:
        return match.group(1).lower()
    match = _STATUS_TRANSPORT.search(status or "")
    if match and match.group(1).lower() in _TRANSPORTS:
        return match.group(1).lower()
    return "udp"


@dataclass(frozen=True, slots=True)
class RegisteredContact:
    """Where to reach an agent's softphone: the node it registered on and its contact there."""

    node_id: uuid.UUID
    node_name: str
    node_sip_address: str | None
    contact: str
    transport: str
    sip_username: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class RegistrationChange:
    """What a registration event did to one agent."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    registered: bool
    """Whether the agent can take calls now (a live registration remains)."""


class Registrations:
    """Keeps seats' registrations and tells routing whether each agent can take voice."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], routing_engine: RoutingEngine) -> None:
        self.sessionmaker = sessionmaker
        self.routing = routing_engine

    async def handle(self, node_id: uuid.UUID, event: Event) -> RegistrationChange | None:
        """A `sofia::register`, `sofia::unregister` or `sofia::expire` event of the node."""
        subclass = header(event, "Event-Subclass")
        if subclass == REGISTER:
            return await self.registered(node_id, event)
        if subclass in {UNREGISTER, EXPIRE}:
            return await self.unregistered(node_id, event)
        return None

    async def _who(self, session: AsyncSession, event: Event) -> tuple[uuid.UUID, str, uuid.UUID] | None:
        """(tenant, SIP user, user id) of the event's seat; None for anyone else (logged)."""
        # sofia::register/unregister carry username and realm; sofia::expire username, realm and host
        # (sofia_reg.c); the from/to headers are the last resort.
        username = header(event, "username") or header(event, "user") or header(event, "from-user")
        realm = (
            header(event, "realm")
            or header(event, "domain_name")
            or header(event, "host")
            or header(event, "from-host")
        )
        if not username or not realm:
            log.warning("registration_event_incomplete", subclass=header(event, "Event-Subclass"))
            return None
        found = await tenants.seat_by_sip_address(session, realm, username)
        if found is None:
            log.info("registration_unknown_domain", realm=realm[:255], user=username[:64])
            return None
        hinted = as_uuid(header(event, VAR_TENANT))
        if hinted is not None and hinted != found.tenant_id:
            log.warning("registration_tenant_mismatch", realm=realm[:255], user=username[:64])
            return None
        if found.seat is None:
            log.info("registration_unknown_seat", tenant_id=str(found.tenant_id), user=username[:64])
            return None
        await set_tenant(session, found.tenant_id)
        return found.tenant_id, found.seat.sip_username, found.seat.user_id

    async def registered(self, node_id: uuid.UUID, event: Event) -> RegistrationChange | None:
        """A seat registered (or refreshed its registration) on the node."""
        contact = contact_uri(header(event, "contact") or "")
        if not contact:
            log.warning("registration_without_contact", node_id=str(node_id))
            return None
        try:
            expires = min(max(int(header(event, "expires") or "0"), 0), MAX_EXPIRES_SECONDS)
        except ValueError:
            expires = 0
        if expires == 0:
            return await self.unregistered(node_id, event)
        now = utcnow()
        async with self.sessionmaker() as session, session.begin():
            who = await self._who(session, event)
            if who is None:
                return None
            tenant_id, username, user_id = who
            port = header(event, "network-port")
            values = {
                "call_id": clean(header(event, "call-id"), 255),
                "transport": transport_of(contact, header(event, "status")),
                "network_ip": clean(header(event, "network-ip"), 64),
                "network_port": int(port) if port and port.isdigit() and int(port) < 65536 else None,
                "user_agent": clean(header(event, "user-agent"), 255),
                "registered_at": now,
                "expires_at": now + timedelta(seconds=expires),
            }
            await session.execute(
                insert(Registration)
                .values(
                    tenant_id=tenant_id,
                    id=uuid.uuid4(),
                    user_id=user_id,
                    node_id=node_id,
                    sip_username=username,
                    contact=clean(contact, 512),
                    **values,
                )
                .on_conflict_do_update(
                    index_elements=["tenant_id", "node_id", "sip_username", "contact"],
                    set_={**values, "user_id": user_id},
                )
            )
            before = await routing.get_agent_state(session, tenant_id, user_id)
            if not before.voice_registered:
                await routing.set_voice_registration(session, tenant_id, user_id, True)
        if not before.voice_registered:
            log.info("agent_voice_registered", tenant_id=str(tenant_id), user_id=str(user_id), node_id=str(node_id))
            await self.routing.sync_agent(tenant_id, user_id)
        return RegistrationChange(tenant_id, user_id, True)

    async def unregistered(self, node_id: uuid.UUID, event: Event) -> RegistrationChange | None:
        """A seat unregistered from the node, or its registration there expired."""
        contact = contact_uri(header(event, "contact") or "")
        call_id = header(event, "call-id")
        async with self.sessionmaker() as session, session.begin():
            who = await self._who(session, event)
            if who is None:
                return None
            tenant_id, username, user_id = who
            statement = delete(Registration).where(
                Registration.node_id == node_id, Registration.sip_username == username
            )
            # One contact (or `*`: all of the user's): sofia's unregister names the contact; expire may not.
            if contact and contact != "*":
                matches = Registration.contact == contact
                if call_id:
                    matches = matches | (Registration.call_id == call_id)
                statement = statement.where(matches)
            await session.execute(statement)
            still = await self._still_registered(session, user_id)
        return await self._settle(tenant_id, user_id, still)

    @staticmethod
    async def _still_registered(session: AsyncSession, user_id: uuid.UUID) -> bool:
        remaining = await session.scalar(
            select(func.count())
            .select_from(Registration)
            .join(SwitchNode, SwitchNode.id == Registration.node_id)
            .where(Registration.user_id == user_id, Registration.expires_at > utcnow(), SwitchNode.health != "down")
        )
        return bool(remaining)

    async def _settle(self, tenant_id: uuid.UUID, user_id: uuid.UUID, registered: bool) -> RegistrationChange:
        """Make routing's `voice_registered` say `registered`, and the matcher follow."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            state = await routing.get_agent_state(session, tenant_id, user_id)
            changed = state.voice_registered != registered
            if changed:
                await routing.set_voice_registration(session, tenant_id, user_id, registered)
        if changed:
            log.info("agent_voice_registration", tenant_id=str(tenant_id), user_id=str(user_id), registered=registered)
            await self.routing.sync_agent(tenant_id, user_id)
        return RegistrationChange(tenant_id, user_id, registered)

    async def _tenants_with(self, node_id: uuid.UUID | None, expired_before: datetime | None) -> list[uuid.UUID]:
        # The audited cross-tenant path: a SECURITY DEFINER function that returns tenant ids only.
        async with self.sessionmaker() as session, session.begin():
            found = await session.scalars(
                text("SELECT xt_voice_registration_tenants(:node, :before)"),
                {"node": node_id, "before": expired_before},
            )
            return list(found.all())

    async def drop_node(self, node_id: uuid.UUID) -> list[RegistrationChange]:
        """The node is lost: every registration on it goes, and agents registered nowhere else stop taking voice."""
        changes = []
        for tenant_id in await self._tenants_with(node_id, None):
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                users = (
                    await session.scalars(
                        delete(Registration).where(Registration.node_id == node_id).returning(Registration.user_id)
                    )
                ).all()
                remaining = {user: await self._still_registered(session, user) for user in set(users)}
            for user_id, still in remaining.items():
                changes.append(await self._settle(tenant_id, user_id, still))
        if changes:
            log.warning("node_registrations_dropped", node_id=str(node_id), agents=len(changes))
        return changes

    async def sweep_expired(self, grace_seconds: int, now: datetime | None = None) -> list[RegistrationChange]:
        """Registrations past their expiry (plus grace) with no expire event seen: dropped."""
        cutoff = (now or utcnow()) - timedelta(seconds=grace_seconds)
        changes = []
        for tenant_id in await self._tenants_with(None, cutoff):
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                users = (
                    await session.scalars(
                        delete(Registration).where(Registration.expires_at < cutoff).returning(Registration.user_id)
                    )
                ).all()
                remaining = {user: await self._still_registered(session, user) for user in set(users)}
            for user_id, still in remaining.items():
                changes.append(await self._settle(tenant_id, user_id, still))
        return changes

    async def reconcile(self, node_id: uuid.UUID, rows: Sequence[Mapping[str, Any]]) -> list[RegistrationChange]:
        """After a reconnect: the node's own registrations (`show registrations as json` rows) are the truth.

        Each row is (re)registered; registrations we hold for the node that it no longer lists are dropped.
        """
        now = int(utcnow().timestamp())
        present: set[tuple[uuid.UUID, str, str]] = set()
        changes: list[RegistrationChange] = []
        for row in rows:
            url = str(row.get("url") or "")
            uri = _PROFILE_PREFIX.sub("", url)
            try:
                expires = int(str(row.get("expires") or "0")) - now
            except ValueError:
                expires = 0
            event = {
                "Event-Subclass": REGISTER,
                "username": str(row.get("reg_user") or ""),
                "realm": str(row.get("realm") or ""),
                "contact": f"<{uri}>",
                "call-id": str(row.get("token") or ""),
                "expires": str(max(expires, 1)),
                "network-ip": str(row.get("network_ip") or ""),
                "network-port": str(row.get("network_port") or ""),
                "status": f"Registered({str(row.get('network_proto') or 'udp').upper()})",
            }
            change = await self.registered(node_id, event)
            if change is not None:
                changes.append(change)
                present.add((change.tenant_id, event["username"], contact_uri(event["contact"])))
        for tenant_id in await self._tenants_with(node_id, None):
            async with tenant_transaction(self.sessionmaker, tenant_id) as session:
                held = (
                    await session.execute(
                        select(
                            Registration.id, Registration.user_id, Registration.sip_username, Registration.contact
                        ).where(Registration.node_id == node_id)
                    )
                ).all()
                stale = [r for r in held if (tenant_id, r.sip_username, r.contact) not in present]
                if stale:
                    await session.execute(delete(Registration).where(Registration.id.in_([r.id for r in stale])))
                remaining = {r.user_id: await self._still_registered(session, r.user_id) for r in stale}
            for user_id, still in remaining.items():
                changes.append(await self._settle(tenant_id, user_id, still))
        return changes

    async def where_registered(self, tenant_id: uuid.UUID, user_id: uuid.UUID) -> RegisteredContact | None:
        """Where to bridge a call to the agent: their freshest live registration on a node that is up (one
        statement, `registered_contact`, migration 0016)."""
        async with driver_connection(self.sessionmaker.kw["bind"]) as driver:
            row = await driver.fetchrow(_REGISTERED_CONTACT, tenant_id, user_id, utcnow())
        return RegisteredContact(**dict(row)) if row is not None else None
