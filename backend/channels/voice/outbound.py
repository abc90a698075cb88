"""Outbound safety: which gateway a call leaves by, which caller id it shows, and whether it may go at all.

`OutboundGuard.authorize_outbound` is the one question call control asks before any
outbound leg (click-to-call, a callback, a transfer to an external number):

* the destination must be a valid number in international form, not premium
  rate (or shared cost, or a personal number) unless the tenant's policy
  allows it, and national unless international calls, or that region, are
  allowed;
* the caller id must be a number of the tenant's (assigned to it in the pool);
* a carrier gateway that provider ops configured must carry the prefix;
* the tenant must be under its cap of concurrent outbound calls: a slot is a
  lease in Redis (a sorted set scored by expiry, taken by one Lua script), so
  a process that dies without releasing it frees the slot after
  `CC_OUTBOUND_LEASE_SECONDS`; call control renews it while the call lasts.

A refusal is written to the tenant's audit log (in its own transaction, so it
stays even when the request fails) and carries a reason code the agent's
workspace can show.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

import phonenumbers
import structlog
from phonenumbers import PhoneNumberType
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.principal import Principal
from backend.channels.voice import numbers
from backend.channels.voice.models import CarrierGateway, OutboundPolicy, OutboundRoute
from backend.channels.voice.schemas import (
    GatewayIn,
    GatewayOut,
    OutboundPolicyIn,
    OutboundPolicyOut,
    OutboundRouteIn,
    OutboundRouteOut,
)
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.db.tenancy import set_tenant
from backend.lib.phones import as_e164, valid_international
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound
from backend.lib.redis_keys import tenant_key
from backend.tenants import audit
from backend.tenants import service as tenants

log = structlog.get_logger("voice.outbound")

Purpose = Literal["click_to_call", "callback", "transfer"]
Reason = Literal[
    "allowed",
    "tenant_suspended",
    "invalid_destination",
    "premium_rate",
    "international",
    "caller_id_not_owned",
    "no_caller_id",
    "no_route",
    "concurrency_limit",
]
PREMIUM_TYPES = frozenset({PhoneNumberType.PREMIUM_RATE, PhoneNumberType.SHARED_COST, PhoneNumberType.PERSONAL_NUMBER})
"""Number types that cost the caller more than a normal call (toll-fraud favourites)."""
TYPE_NAMES: dict[int, str] = {
    value: name.lower() for name, value in vars(PhoneNumberType).items() if name.isupper() and isinstance(value, int)
}
NON_GEOGRAPHIC_REGION = "001"
"""phonenumbers' region of global networks (satellite, international freephone): never national."""

EXPLANATIONS: dict[str, str] = {
    "tenant_suspended": "This workspace is suspended: it cannot place calls",
    "invalid_destination": "The number is not a valid phone number in international format (+...)",
    "premium_rate": "Calls to premium-rate, shared-cost and personal numbers are not enabled for this workspace",
    "international": "International calls to this country are not enabled for this workspace",
    "caller_id_not_owned": "The caller id is not one of this workspace's numbers",
    "no_caller_id": "This workspace has no number to show as caller id",
    "no_route": "No carrier route reaches this number",
    "concurrency_limit": "This workspace is at its limit of simultaneous outbound calls; try again in a moment",
}

_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local lease_ms = tonumber(ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[3])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + lease_ms, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease_ms * 2)
return 1
"""
_RENEW = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) < now_ms then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""
_COUNT = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
return redis.call('ZCARD', KEYS[1])
"""


def leases_key(tenant_id: uuid.UUID) -> str:
    """The tenant's outbound-call leases (member: call id, score: expiry in ms)."""
    return tenant_key(tenant_id, "outbound", "leases")


@dataclass(frozen=True, slots=True)
class OutboundRequest:
    """An outbound leg about to be placed."""

    destination: str
    caller_id: str | None
    purpose: Purpose
    call_id: uuid.UUID
    """The lease's name: the leg's (or the call's) UUID."""
    actor_type: str = "system"
    actor_id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class OutboundDecision:
    """Allowed (with the normalised numbers and the gateway), or refused with a reason and its explanation."""

    allowed: bool
    reason: Reason
    detail: str
    destination: str = ""
    caller_id: str = ""
    gateway: str = ""
    number_type: str = ""
    region: str = ""
    lease: uuid.UUID | None = None
    """The slot taken (release it when the call ends); None when refused or only checked."""

    def dial_string(self) -> str:
        """`sofia/gateway/<gateway>/<destination>` for `originate` or `bridge`."""
        return f"sofia/gateway/{self.gateway}/{self.destination}"

    def problem(self) -> Forbidden:
        """The refusal as the agent sees it: 403 problem+json with the reason code."""
        return Forbidden(self.detail, kind="outbound-refused", title="Call not allowed", extra={"reason": self.reason})


def _refused(
    reason: Reason, *, destination: str = "", caller_id: str = "", region: str = "", number_type: str = ""
) -> OutboundDecision:
    return OutboundDecision(
        False,
        reason,
        EXPLANATIONS[reason],
        destination=destination,
        caller_id=caller_id,
        region=region,
        number_type=number_type,
    )


def classify(destination: str) -> tuple[str, str, int] | None:
    """(E.164, region, number type) of a valid international-format number, else None."""
    candidate = destination.strip().replace(" ", "").replace("-", "")
    if not candidate.startswith("+"):
        return None
    parsed = valid_international(candidate)
    if parsed is None:
        return None
    region = phonenumbers.region_code_for_number(parsed) or NON_GEOGRAPHIC_REGION
    return as_e164(parsed), region, phonenumbers.number_type(parsed)


def _region_of(e164: str) -> str | None:
    found = classify(e164)
    return found[1] if found else None


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """A tenant's policy with its defaults filled in."""

    home_regions: frozenset[str]
    allow_international: bool
    allowed_regions: frozenset[str]
    allow_premium: bool
    max_concurrent_calls: int


async def effective_policy(session: AsyncSession, settings: Settings, tenant_id: uuid.UUID) -> EffectivePolicy:
    """The policy in force: the tenant's row, the regions of its numbers, its plan's cap, the default cap."""
    row = await session.scalar(select(OutboundPolicy).where(OutboundPolicy.tenant_id == tenant_id))
    homes = set(row.home_regions) if row and row.home_regions else set()
    if not homes:
        homes = {r for r in map(_region_of, await numbers.owned_numbers(session, tenant_id)) if r}
    homes.discard(NON_GEOGRAPHIC_REGION)
    cap = row.max_concurrent_calls if row and row.max_concurrent_calls is not None else None
    if cap is None:
        cap = await tenants.outbound_call_cap(session, tenant_id)
    if cap is None:
        cap = settings.outbound_concurrent_calls_default
    return EffectivePolicy(
        home_regions=frozenset(homes),
        allow_international=bool(row and row.allow_international),
        allowed_regions=frozenset(row.allowed_regions if row else ()),
        allow_premium=bool(row and row.allow_premium),
        max_concurrent_calls=cap,
    )


def _policy_out(policy: EffectivePolicy) -> OutboundPolicyOut:
    return OutboundPolicyOut(
        home_regions=sorted(policy.home_regions),
        allow_international=policy.allow_international,
        allowed_regions=sorted(policy.allowed_regions),
        allow_premium=policy.allow_premium,
        max_concurrent_calls=policy.max_concurrent_calls,
    )


async def gateway_for(session: AsyncSession, destination: str) -> str | None:
    """The enabled gateway of the longest route prefix matching the number (then the lowest priority)."""
    prefixes = [destination[:n] for n in range(len(destination), 0, -1)]
    row = (
        await session.execute(
            select(CarrierGateway.name)
            .join(OutboundRoute, OutboundRoute.gateway_id == CarrierGateway.id)
            .where(OutboundRoute.prefix.in_(prefixes), CarrierGateway.enabled.is_(True))
            .order_by(OutboundRoute.prefix.desc(), OutboundRoute.priority, CarrierGateway.name)
            .limit(1)
        )
    ).first()
    return None if row is None else str(row[0])


class OutboundGuard:
    """Decides whether a tenant may place an outbound leg, and holds its concurrency slots."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], redis: Redis, settings: Settings) -> None:
        self.sessionmaker = sessionmaker
        self.redis = redis
        self.settings = settings
        self._take = redis.register_script(_TAKE)
        self._renew = redis.register_script(_RENEW)
        self._count = redis.register_script(_COUNT)

    async def _decide(self, session: AsyncSession, tenant_id: uuid.UUID, request: OutboundRequest) -> OutboundDecision:
        tenant = await tenants.find_tenant(session, tenant_id)
        if tenant is None or tenant.status == "suspended":
            return _refused("tenant_suspended")
        await set_tenant(session, tenant_id)
        found = classify(request.destination)
        if found is None:
            return _refused("invalid_destination", destination=request.destination[:32])
        destination, region, kind = found
        facts = {"destination": destination, "region": region, "number_type": TYPE_NAMES.get(kind, "unknown")}
        policy = await effective_policy(session, self.settings, tenant_id)
        if kind in PREMIUM_TYPES and not policy.allow_premium:
            return _refused("premium_rate", **facts)
        national = region in policy.home_regions
        if not national and not policy.allow_international and region not in policy.allowed_regions:
            return _refused("international", **facts)
        owned = await numbers.owned_numbers(session, tenant_id)
        if request.caller_id is not None:
            shown = classify(request.caller_id)
            caller_id = shown[0] if shown else request.caller_id
            if caller_id not in owned:
                return _refused("caller_id_not_owned", caller_id=request.caller_id[:32], **facts)
        elif owned:
            caller_id = owned[0]
        else:
            return _refused("no_caller_id", **facts)
        gateway = await gateway_for(session, destination)
        if gateway is None:
            return _refused("no_route", caller_id=caller_id, **facts)
        return OutboundDecision(
            True,
            "allowed",
            "",
            destination=destination,
            caller_id=caller_id,
            gateway=gateway,
            number_type=facts["number_type"],
            region=region,
        )

    async def authorize_outbound(
        self, tenant_id: uuid.UUID, request: OutboundRequest, *, take_slot: bool = True
    ) -> OutboundDecision:
        """The decision for one outbound leg; when allowed and `take_slot`, a concurrency slot is leased."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            decision = await self._decide(session, tenant_id, request)
            cap = (await effective_policy(session, self.settings, tenant_id)).max_concurrent_calls
        if decision.allowed:
            if take_slot:
                taken = await self._take(
                    keys=[leases_key(tenant_id)],
                    args=[self.settings.outbound_lease_seconds * 1000, cap, str(request.call_id)],
                )
                if not taken:
                    decision = _refused(
                        "concurrency_limit",
                        destination=decision.destination,
                        caller_id=decision.caller_id,
                        region=decision.region,
                        number_type=decision.number_type,
                    )
                else:
                    decision = _with_lease(decision, request.call_id)
            elif await self.active_calls(tenant_id) >= cap:
                decision = _refused(
                    "concurrency_limit",
                    destination=decision.destination,
                    caller_id=decision.caller_id,
                    region=decision.region,
                    number_type=decision.number_type,
                )
        if not decision.allowed:
            await self._audit_refusal(tenant_id, request, decision)
        else:
            log.info(
                "outbound_allowed",
                tenant_id=str(tenant_id),
                purpose=request.purpose,
                region=decision.region,
                gateway=decision.gateway,
            )
        return decision

    async def _audit_refusal(self, tenant_id: uuid.UUID, request: OutboundRequest, decision: OutboundDecision) -> None:
        log.warning(
            "outbound_refused",
            tenant_id=str(tenant_id),
            reason=decision.reason,
            purpose=request.purpose,
            region=decision.region,
            call_id=str(request.call_id),
        )
        if decision.reason == "tenant_suspended":
            return  # a suspended (or unknown) tenant's context is not opened for an audit entry
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            await audit.record(
                session,
                tenant_id=tenant_id,
                actor_type=request.actor_type,
                actor_id=request.actor_id,
                action="outbound.refused",
                target_type="call",
                target_id=request.call_id,
                after={
                    "reason": decision.reason,
                    "purpose": request.purpose,
                    "destination": decision.destination or request.destination[:32],
                    "caller_id": decision.caller_id or (request.caller_id or ""),
                    "region": decision.region,
                    "number_type": decision.number_type,
                },
            )

    async def renew(self, tenant_id: uuid.UUID, call_id: uuid.UUID) -> bool:
        """Keep a call's slot (call control does this well within the lease while the call lasts)."""
        renewed = await self._renew(
            keys=[leases_key(tenant_id)], args=[self.settings.outbound_lease_seconds * 1000, str(call_id)]
        )
        return bool(renewed)

    async def release(self, tenant_id: uuid.UUID, call_id: uuid.UUID) -> None:
        """The call ended: its slot is free."""
        await self.redis.zrem(leases_key(tenant_id), str(call_id))

    async def active_calls(self, tenant_id: uuid.UUID) -> int:
        """Slots held now (expired leases are dropped first)."""
        return int(await self._count(keys=[leases_key(tenant_id)], args=[]))

    async def check_for_agent(self, principal: Principal, destination: str, caller_id: str | None) -> OutboundDecision:
        """The agent's workspace asks before dialling: the same rules, no slot taken; refusals raise 403."""
        assert principal.tenant_id is not None
        decision = await self.authorize_outbound(
            principal.tenant_id,
            OutboundRequest(
                destination=destination,
                caller_id=caller_id,
                purpose="click_to_call",
                call_id=uuid.uuid4(),
                actor_type=principal.actor_type,
                actor_id=principal.actor_id,
            ),
            take_slot=False,
        )
        if not decision.allowed:
            raise decision.problem()
        return decision


def _with_lease(decision: OutboundDecision, lease: uuid.UUID) -> OutboundDecision:
    return OutboundDecision(
        True,
        decision.reason,
        decision.detail,
        destination=decision.destination,
        caller_id=decision.caller_id,
        gateway=decision.gateway,
        number_type=decision.number_type,
        region=decision.region,
        lease=lease,
    )


# --- provider operations: gateways, routes, tenants' policies ---------------------------------


def _gateway_out(row: CarrierGateway) -> GatewayOut:
    return GatewayOut(row.id, row.name, row.description, row.enabled, row.created_at)


async def list_gateways(session: AsyncSession) -> list[GatewayOut]:
    """Every carrier gateway."""
    return [_gateway_out(g) for g in (await session.scalars(select(CarrierGateway).order_by(CarrierGateway.name)))]


async def create_gateway(session: AsyncSession, principal: Principal, data: GatewayIn) -> GatewayOut:
    """Register a carrier gateway (the sofia gateway of that name must exist on every node)."""
    if await session.scalar(select(CarrierGateway.id).where(CarrierGateway.name == data.name)) is not None:
        raise Conflict("A gateway with that name exists", errors=[{"field": "name", "message": "already used"}])
    row = CarrierGateway(name=data.name, description=data.description, enabled=data.enabled)
    session.add(row)
    await session.flush()
    await audit.record_provider(
        session, provider_user_id=principal.user_id, action="gateway.create", detail={"name": data.name}
    )
    return _gateway_out(row)


async def update_gateway(
    session: AsyncSession, principal: Principal, gateway_id: uuid.UUID, data: GatewayIn
) -> GatewayOut:
    """Rename, describe, enable or disable a gateway (disabled: no route uses it)."""
    row = await session.scalar(select(CarrierGateway).where(CarrierGateway.id == gateway_id).with_for_update())
    if row is None:
        raise NotFound("No such gateway")
    if data.name != row.name and await session.scalar(
        select(CarrierGateway.id).where(CarrierGateway.name == data.name)
    ):
        raise Conflict("A gateway with that name exists", errors=[{"field": "name", "message": "already used"}])
    before = {"name": row.name, "enabled": row.enabled}
    row.name, row.description, row.enabled, row.updated_at = data.name, data.description, data.enabled, utcnow()
    await audit.record_provider(
        session,
        provider_user_id=principal.user_id,
        action="gateway.update",
        detail={"before": before, "after": {"name": row.name, "enabled": row.enabled}},
    )
    return _gateway_out(row)


async def list_routes(session: AsyncSession) -> list[OutboundRouteOut]:
    """Every route, by prefix then priority."""
    rows = await session.execute(
        select(OutboundRoute, CarrierGateway.name)
        .join(CarrierGateway, CarrierGateway.id == OutboundRoute.gateway_id)
        .order_by(OutboundRoute.prefix, OutboundRoute.priority)
    )
    return [OutboundRouteOut(r.id, r.prefix, r.gateway_id, name, r.priority, r.created_at) for r, name in rows.all()]


async def create_route(session: AsyncSession, principal: Principal, data: OutboundRouteIn) -> OutboundRouteOut:
    """Send numbers starting with a prefix through a gateway."""
    gateway = await session.scalar(select(CarrierGateway).where(CarrierGateway.id == data.gateway_id))
    if gateway is None:
        raise InvalidInput.field("gateway_id", "is not a gateway")
    exists = await session.scalar(
        select(OutboundRoute.id).where(OutboundRoute.prefix == data.prefix, OutboundRoute.gateway_id == data.gateway_id)
    )
    if exists is not None:
        raise Conflict("That prefix already goes through that gateway")
    row = OutboundRoute(prefix=data.prefix, gateway_id=data.gateway_id, priority=data.priority)
    session.add(row)
    await session.flush()
    await audit.record_provider(
        session,
        provider_user_id=principal.user_id,
        action="outbound_route.create",
        detail={"prefix": data.prefix, "gateway": gateway.name, "priority": data.priority},
    )
    return OutboundRouteOut(row.id, row.prefix, row.gateway_id, gateway.name, row.priority, row.created_at)


async def delete_route(session: AsyncSession, principal: Principal, route_id: uuid.UUID) -> None:
    """Remove a route."""
    row = await session.scalar(select(OutboundRoute).where(OutboundRoute.id == route_id))
    if row is None:
        raise NotFound("No such route")
    await session.delete(row)
    await audit.record_provider(
        session, provider_user_id=principal.user_id, action="outbound_route.delete", detail={"prefix": row.prefix}
    )


async def get_policy(session: AsyncSession, settings: Settings, tenant_id: uuid.UUID) -> OutboundPolicyOut:
    """A tenant's outbound policy as it applies now."""
    return _policy_out(await effective_policy(session, settings, tenant_id))


async def put_policy(
    session: AsyncSession, settings: Settings, principal: Principal, tenant_id: uuid.UUID, data: OutboundPolicyIn
) -> OutboundPolicyOut:
    """Provider ops set a tenant's outbound policy (audited in both logs)."""
    if await tenants.find_tenant(session, tenant_id) is None:
        raise NotFound("No such tenant")
    await set_tenant(session, tenant_id)
    for field, regions in (("home_regions", data.home_regions), ("allowed_regions", data.allowed_regions)):
        for index, region in enumerate(regions):
            if region not in phonenumbers.SUPPORTED_REGIONS:
                raise InvalidInput.field(f"{field}[{index}]", "is not a region with phone numbers")
    row = await session.scalar(select(OutboundPolicy).where(OutboundPolicy.tenant_id == tenant_id).with_for_update())
    before = (
        None if row is None else {"allow_international": row.allow_international, "allow_premium": row.allow_premium}
    )
    if row is None:
        row = OutboundPolicy(tenant_id=tenant_id)
        session.add(row)
    row.home_regions = sorted(set(data.home_regions))
    row.allow_international = data.allow_international
    row.allowed_regions = sorted(set(data.allowed_regions))
    row.allow_premium = data.allow_premium
    row.max_concurrent_calls = data.max_concurrent_calls
    row.updated_at = utcnow()
    await session.flush()
    after = {
        "home_regions": row.home_regions,
        "allow_international": row.allow_international,
        "allowed_regions": row.allowed_regions,
        "allow_premium": row.allow_premium,
        "max_concurrent_calls": row.max_concurrent_calls,
    }
    await audit.record_provider(
        session,
        provider_user_id=principal.user_id,
        action="outbound_policy.set",
        target_tenant_id=tenant_id,
        detail=after,
    )
    await audit.record(
        session,
        tenant_id=tenant_id,
        actor_type="provider",
        actor_id=None,
        action="outbound_policy.set",
        target_type="tenant",
        target_id=tenant_id,
        before=before,
        after=after,
    )
    return _policy_out(await effective_policy(session, settings, tenant_id))
