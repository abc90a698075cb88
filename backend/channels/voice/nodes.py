"""Switch nodes: registered by provider operations, known by their source addresses, kept healthy by heartbeats.

A node's `health` is what its HEARTBEAT events say (`unknown` until the first
one, `up`, or `down` once silent longer than the timeout); `draining` is the
operators' decision to give it no new calls. Transitions are single UPDATE
statements, so several processes can watch the same nodes and each transition
(and each failover) happens once.
"""

from __future__ import annotations

import ipaddress
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.crypto import SecretBox
from backend.auth.principal import Principal
from backend.channels.voice.legs import Event, header
from backend.channels.voice.models import SwitchNode
from backend.channels.voice.schemas import SwitchNodeCreate, SwitchNodeOut, SwitchNodePatch
from backend.config import Settings
from backend.db.base import utcnow
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.tenants import audit

log = structlog.get_logger("voice.nodes")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_HEARTBEAT_STATS = {
    "FreeSWITCH-Version": "version",
    "Session-Count": "sessions",
    "Max-Sessions": "max_sessions",
    "Session-Peak-Max": "session_peak",
    "Idle-CPU": "idle_cpu",
    "Uptime-msec": "uptime_ms",
}


def status_of(node: SwitchNode) -> str:
    """One word for operators: down and unknown win over draining, draining over up."""
    if node.health != "up":
        return node.health
    return "draining" if node.draining else "up"


def node_out(node: SwitchNode) -> SwitchNodeOut:
    """The API's view of a node (never its ESL password)."""
    return SwitchNodeOut(
        id=node.id,
        name=node.name,
        status=status_of(node),
        health=node.health,
        draining=node.draining,
        esl_host=node.esl_host,
        esl_port=node.esl_port,
        xml_curl_sources=list(node.xml_curl_sources),
        sip_address=node.sip_address,
        last_heartbeat_at=node.last_heartbeat_at,
        went_down_at=node.went_down_at,
        stats=dict(node.stats),
        created_at=node.created_at,
    )


def clean_sources(field: str, sources: Sequence[str]) -> list[str]:
    """Addresses or CIDR networks, normalised (`10.0.0.5/32`, `fd00::/64`)."""
    cleaned: list[str] = []
    for index, source in enumerate(sources):
        try:
            network = ipaddress.ip_network(source.strip(), strict=False)
        except ValueError as exc:
            raise InvalidInput.field(f"{field}[{index}]", "is not an IP address or network") from exc
        if network.num_addresses > 65536:
            raise InvalidInput.field(f"{field}[{index}]", "is wider than a /16: name the nodes' addresses")
        if str(network) not in cleaned:
            cleaned.append(str(network))
    return cleaned


def _provider(principal: Principal) -> uuid.UUID | None:
    return principal.user_id if principal.kind == "provider" else None


async def _node(session: AsyncSession, node_id: uuid.UUID, *, lock: bool = False) -> SwitchNode:
    statement = select(SwitchNode).where(SwitchNode.id == node_id)
    if lock:
        statement = statement.with_for_update()
    node = await session.scalar(statement)
    if node is None:
        raise NotFound("No such switch node")
    return node


async def register_node(
    session: AsyncSession, principal: Principal, data: SwitchNodeCreate, box: SecretBox
) -> SwitchNodeOut:
    """A new node of the cluster; it takes calls once its first heartbeat arrives."""
    if await session.scalar(select(SwitchNode.id).where(SwitchNode.name == data.name)) is not None:
        raise Conflict("A switch node has that name", errors=[{"field": "name", "message": "already registered"}])
    node = SwitchNode(
        name=data.name,
        esl_host=data.esl_host.strip(),
        esl_port=data.esl_port,
        esl_password_sealed=box.seal(data.esl_password),
        xml_curl_sources=clean_sources("xml_curl_sources", data.xml_curl_sources),
        sip_address=data.sip_address,
        health="unknown",
        draining=False,
        stats={},
    )
    session.add(node)
    await session.flush()
    await audit.record_provider(
        session,
        provider_user_id=_provider(principal),
        action="switch_node.register",
        detail={"node": node.name, "esl": f"{node.esl_host}:{node.esl_port}", "sources": node.xml_curl_sources},
    )
    return node_out(node)


async def list_nodes(session: AsyncSession, page: PageRequest) -> tuple[list[SwitchNodeOut], str | None]:
    """Every node, by name by default."""
    rows, cursor = await paginate(
        session,
        select(SwitchNode),
        page,
        sortable={"name": SwitchNode.name, "created_at": SwitchNode.created_at},
        default_sort="name",
        id_column=SwitchNode.id,
    )
    return [node_out(n) for n in rows], cursor


async def get_node(session: AsyncSession, node_id: uuid.UUID) -> SwitchNodeOut:
    """One node."""
    return node_out(await _node(session, node_id))


async def update_node(
    session: AsyncSession, principal: Principal, node_id: uuid.UUID, data: SwitchNodePatch, box: SecretBox
) -> SwitchNodeOut:
    """Change how a node is reached; a new ESL password is sealed like the first."""
    node = await _node(session, node_id, lock=True)
    changed: list[str] = []
    if not isinstance(data.esl_host, msgspec.UnsetType):
        node.esl_host = data.esl_host.strip()
        changed.append("esl_host")
    if not isinstance(data.esl_port, msgspec.UnsetType):
        node.esl_port = data.esl_port
        changed.append("esl_port")
    if not isinstance(data.esl_password, msgspec.UnsetType):
        node.esl_password_sealed = box.seal(data.esl_password)
        changed.append("esl_password")
    if not isinstance(data.xml_curl_sources, msgspec.UnsetType):
        node.xml_curl_sources = clean_sources("xml_curl_sources", data.xml_curl_sources)
        changed.append("xml_curl_sources")
    if not isinstance(data.sip_address, msgspec.UnsetType):
        node.sip_address = data.sip_address
        changed.append("sip_address")
    await session.flush()
    await audit.record_provider(
        session,
        provider_user_id=_provider(principal),
        action="switch_node.update",
        detail={"node": node.name, "changed": changed},
    )
    return node_out(node)


async def set_draining(
    session: AsyncSession, principal: Principal, node_id: uuid.UUID, draining: bool
) -> SwitchNodeOut:
    """Drain a node (no new calls or originations; calls on it go on) or put it back in service."""
    node = await _node(session, node_id, lock=True)
    if node.draining != draining:
        node.draining = draining
        await session.flush()
        await audit.record_provider(
            session,
            provider_user_id=_provider(principal),
            action="switch_node.drain" if draining else "switch_node.undrain",
            detail={"node": node.name},
        )
        log.info("switch_node_draining" if draining else "switch_node_in_service", node=node.name)
    return node_out(node)


def esl_password(node: SwitchNode, box: SecretBox) -> str:
    """The node's event socket password, for the process that holds its inbound connection."""
    return box.open(node.esl_password_sealed)


@dataclass(frozen=True, slots=True)
class EslTarget:
    """How to open a node's inbound event socket."""

    id: uuid.UUID
    name: str
    host: str
    port: int
    password: str


async def esl_targets(sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox) -> list[EslTarget]:
    """Every registered node's event socket, password decrypted (for the process that holds its lease)."""
    async with sessionmaker() as session:
        found = (await session.scalars(select(SwitchNode).order_by(SwitchNode.name))).all()
    return [EslTarget(n.id, n.name, n.esl_host, n.esl_port, esl_password(n, box)) for n in found]


async def node_by_name(session: AsyncSession, name: str) -> SwitchNode | None:
    """The registered node with that switchname."""
    return await session.scalar(select(SwitchNode).where(SwitchNode.name == name))


def address_in(address: str, sources: Sequence[str]) -> bool:
    """Whether `address` lies in one of a node's source networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for source in sources:
        try:
            if ip in ipaddress.ip_network(source, strict=False):
                return True
        except ValueError:
            continue
    return False


@dataclass(frozen=True, slots=True)
class KnownNode:
    """What a request handler needs to know about the node that called."""

    id: uuid.UUID
    name: str
    networks: tuple[Network, ...]

    def covers(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether requests from `address` may come from this node."""
        return any(address in network for network in self.networks)


class NodeAddressBook:
    """The registered nodes' source addresses, cached per process for `switch_source_cache_seconds`.

    The authentication middleware asks it whether a switch request comes from a
    registered node; xml_curl handlers ask which node. Operators' changes reach
    this process at once (`invalidate`) and the others within the cache time.
    """

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], ttl_seconds: float) -> None:
        self.sessionmaker = sessionmaker
        self.ttl_seconds = ttl_seconds
        self._nodes: tuple[KnownNode, ...] = ()
        self._loaded_at = float("-inf")

    def invalidate(self) -> None:
        """Forget the cached copy (after a node is registered or changed)."""
        self._loaded_at = float("-inf")

    async def nodes(self) -> tuple[KnownNode, ...]:
        """Every registered node with its networks."""
        if time.monotonic() - self._loaded_at > self.ttl_seconds:
            async with self.sessionmaker() as session:
                statement = select(SwitchNode.id, SwitchNode.name, SwitchNode.xml_curl_sources)
                rows = (await session.execute(statement)).all()
            known = []
            for node_id, name, sources in rows:
                networks = []
                for source in sources:
                    try:
                        networks.append(ipaddress.ip_network(source, strict=False))
                    except ValueError:
                        log.warning("switch_node_bad_source", node=name, source=source)
                known.append(KnownNode(node_id, name, tuple(networks)))
            self._nodes = tuple(known)
            self._loaded_at = time.monotonic()
        return self._nodes

    async def is_known(self, address: str) -> bool:
        """Whether a registered node may send requests from `address`."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(node.covers(ip) for node in await self.nodes())

    async def identify(self, address: str, name: str | None) -> KnownNode | None:
        """The node called `name` (FreeSWITCH's `hostname` field) if `address` is one of its; else None."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        candidates = [node for node in await self.nodes() if node.covers(ip)]
        if name:
            return next((node for node in candidates if node.name == name), None)
        return candidates[0] if len(candidates) == 1 else None


@dataclass(frozen=True, slots=True)
class NodeChoice:
    """A node picked for an origination, and how to reach it."""

    id: uuid.UUID
    name: str
    esl_host: str
    esl_port: int
    sip_address: str | None


@dataclass(frozen=True, slots=True)
class FailedNode:
    """A node that went down and whose calls and agents must be dealt with."""

    id: uuid.UUID
    name: str
    last_alive: datetime


class NodeHealth:
    """Heartbeats in, down nodes out: the watchdog's half of the cluster's state."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings

    async def heartbeat(self, node_id: uuid.UUID, event: Event | None = None, *, at: datetime | None = None) -> bool:
        """The node is alive (a HEARTBEAT, or any sign of life from its event socket) as of `at` (when it was
        received; now by default); returns whether it came up.

        A node that was down comes back up; its earlier failover, done or not, stays done. A sign of life older
        than the one recorded does not move the record back.
        """
        stats: dict[str, Any] = {}
        core_uuid = None
        if event is not None:
            for name, key in _HEARTBEAT_STATS.items():
                value = header(event, name)
                if value is not None:
                    stats[key] = value[:120]
            core_uuid = header(event, "Core-UUID")
        now = at or utcnow()
        async with self.sessionmaker() as session, session.begin():
            node = await session.scalar(select(SwitchNode).where(SwitchNode.id == node_id).with_for_update())
            if node is None:
                log.warning("heartbeat_from_unknown_node", node_id=str(node_id))
                return False
            came_up = node.health != "up"
            if node.core_uuid and core_uuid and core_uuid != node.core_uuid:
                log.warning("switch_node_restarted", node=node.name, core_uuid=core_uuid)
            node.health = "up"
            if node.last_heartbeat_at is None or now > node.last_heartbeat_at:
                node.last_heartbeat_at = now
            if stats:
                node.stats = stats
            if core_uuid:
                node.core_uuid = core_uuid[:64]
            name = node.name
        if came_up:
            log.info("switch_node_up", node=name)
        return came_up

    async def mark_silent_nodes_down(self, now: datetime | None = None) -> list[FailedNode]:
        """Nodes up but silent longer than the heartbeat timeout become down (once, whichever process sees it)."""
        moment = now or utcnow()
        cutoff = moment - timedelta(seconds=self.settings.switch_heartbeat_timeout_seconds)
        async with self.sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    update(SwitchNode)
                    .where(SwitchNode.health == "up", SwitchNode.last_heartbeat_at < cutoff)
                    .values(health="down", went_down_at=moment, failover_claimed_at=None, failover_done_at=None)
                    .returning(SwitchNode.id, SwitchNode.name, SwitchNode.last_heartbeat_at)
                )
            ).all()
        for node_id, name, last in rows:
            log.warning("switch_node_down", node=name, node_id=str(node_id), silent_since=str(last))
        return [FailedNode(node_id, name, last or moment) for node_id, name, last in rows]

    async def claim_failovers(self, now: datetime | None = None) -> list[FailedNode]:
        """Down nodes whose failover nobody finished (or whose claimant died): this process takes them."""
        moment = now or utcnow()
        stale = moment - timedelta(seconds=self.settings.switch_failover_claim_seconds)
        async with self.sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    update(SwitchNode)
                    .where(
                        SwitchNode.health == "down",
                        SwitchNode.failover_done_at.is_(None),
                        SwitchNode.went_down_at.is_not(None),
                        or_(SwitchNode.failover_claimed_at.is_(None), SwitchNode.failover_claimed_at < stale),
                    )
                    .values(failover_claimed_at=moment)
                    .returning(SwitchNode.id, SwitchNode.name, SwitchNode.last_heartbeat_at, SwitchNode.went_down_at)
                )
            ).all()
        return [FailedNode(node_id, name, last or went_down or moment) for node_id, name, last, went_down in rows]

    async def failover_done(self, node_id: uuid.UUID) -> None:
        """The node's calls are closed and its agents freed."""
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(SwitchNode)
                .where(SwitchNode.id == node_id, SwitchNode.health == "down")
                .values(failover_done_at=utcnow())
            )

    async def pick_node(self, exclude: Sequence[uuid.UUID] = ()) -> NodeChoice | None:
        """The node for a new origination: up, not draining, the fewest sessions (ties broken at random)."""
        async with self.sessionmaker() as session:
            statement = select(SwitchNode).where(SwitchNode.health == "up", SwitchNode.draining.is_(False))
            if exclude:
                statement = statement.where(SwitchNode.id.not_in(list(exclude)))
            nodes = list((await session.scalars(statement)).all())
        if not nodes:
            return None

        def load(node: SwitchNode) -> tuple[int, float]:
            raw = node.stats.get("sessions", "0")
            sessions = int(raw) if isinstance(raw, str) and raw.isdigit() else 0
            return sessions, random.random()  # noqa: S311 - spreading load, not security

        best = min(nodes, key=load)
        return NodeChoice(best.id, best.name, best.esl_host, best.esl_port, best.sip_address)
