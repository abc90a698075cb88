"""Phone numbers (DIDs): the provider's pool, numbers assigned to tenants, and where each sends its calls.

`phone_numbers` is a global table (a number is looked up before its tenant is
known), so every tenant-facing query here filters on the caller's tenant
explicitly; row-level security does not do it for us on this table.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

import msgspec
import phonenumbers
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.auth.principal import Principal
from backend.channels.voice.models import PhoneNumber
from backend.channels.voice.schemas import NumberCreate, NumberOut, NumberRouting, PoolNumberOut
from backend.db.base import utcnow
from backend.db.tenancy import set_tenant
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound
from backend.lib.validation import clean_text
from backend.routing import service as routing
from backend.tenants import audit
from backend.tenants import service as tenants

log = structlog.get_logger("voice.numbers")


class IvrFlows(Protocol):
    """Whether an IVR flow exists in the current tenant (call handling provides it)."""

    async def exists(self, session: AsyncSession, flow_id: uuid.UUID) -> bool:
        """True if the tenant in the session's context has that flow."""
        ...


class NoIvrFlows:
    """No IVR flows at all (routing's `ivr_service.TenantIvrFlows` is what the routes use)."""

    async def exists(self, session: AsyncSession, flow_id: uuid.UUID) -> bool:
        """Never."""
        return False


def clean_number(field: str, raw: str) -> str:
    """A valid public number in E.164 (`+33142685300`); the `+` and country code are required."""
    candidate = raw.strip().replace(" ", "").replace("-", "")
    if not candidate.startswith("+"):
        raise InvalidInput.field(field, "must be in international format, starting with +")
    try:
        parsed = phonenumbers.parse(candidate, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidInput.field(field, "is not a phone number") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidInput.field(field, "is not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def pool_out(number: PhoneNumber) -> PoolNumberOut:
    """The provider's view of a number."""
    return PoolNumberOut(
        id=number.id,
        number=number.e164,
        label=number.label,
        tenant_id=number.tenant_id,
        queue_id=number.queue_id,
        ivr_flow_id=number.ivr_flow_id,
        assigned_at=number.assigned_at,
        created_at=number.created_at,
    )


def number_out(number: PhoneNumber) -> NumberOut:
    """A tenant's view of one of its numbers."""
    return NumberOut(number.id, number.e164, number.label, number.queue_id, number.ivr_flow_id, number.assigned_at)


def _provider(principal: Principal) -> uuid.UUID | None:
    return principal.user_id if principal.kind == "provider" else None


async def _pool_number(session: AsyncSession, number_id: uuid.UUID) -> PhoneNumber:
    number = await session.scalar(select(PhoneNumber).where(PhoneNumber.id == number_id).with_for_update())
    if number is None:
        raise NotFound("No such number")
    return number


# --- provider operations -------------------------------------------------------------------------


async def add_number(session: AsyncSession, principal: Principal, data: NumberCreate) -> PoolNumberOut:
    """Put a number the provider holds into the free pool."""
    e164 = clean_number("number", data.number)
    if await session.scalar(select(PhoneNumber.id).where(PhoneNumber.e164 == e164)) is not None:
        raise Conflict("That number is already in the pool", errors=[{"field": "number", "message": "already added"}])
    number = PhoneNumber(e164=e164, label=clean_text("label", data.label, max_length=120, allow_empty=True))
    session.add(number)
    await session.flush()
    await audit.record_provider(
        session, provider_user_id=_provider(principal), action="number.add", detail={"number": e164}
    )
    return pool_out(number)


async def list_pool(
    session: AsyncSession,
    page: PageRequest,
    *,
    tenant_id: uuid.UUID | None = None,
    free: bool | None = None,
    prefix: str | None = None,
) -> tuple[list[PoolNumberOut], str | None]:
    """The whole pool, with filters: one tenant's numbers, free or assigned ones, numbers starting with a prefix."""
    statement = select(PhoneNumber)
    if tenant_id is not None:
        statement = statement.where(PhoneNumber.tenant_id == tenant_id)
    if free is True:
        statement = statement.where(PhoneNumber.tenant_id.is_(None))
    elif free is False:
        statement = statement.where(PhoneNumber.tenant_id.is_not(None))
    if prefix:
        statement = statement.where(PhoneNumber.e164.startswith(prefix, autoescape=True))
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"number": PhoneNumber.e164, "created_at": PhoneNumber.created_at},
        default_sort="number",
        id_column=PhoneNumber.id,
    )
    return [pool_out(n) for n in rows], cursor


async def assign_number(
    session: AsyncSession, principal: Principal, number_id: uuid.UUID, tenant_id: uuid.UUID
) -> PoolNumberOut:
    """Give a free number to a tenant; recorded in the provider's audit log and in the tenant's."""
    number = await _pool_number(session, number_id)
    tenant = await tenants.find_tenant(session, tenant_id)
    if tenant is None:
        raise InvalidInput.field("tenant_id", "is not a tenant")
    if number.tenant_id == tenant_id:
        return pool_out(number)
    if number.tenant_id is not None:
        raise Conflict("The number belongs to another tenant; release it first", kind="number-assigned")
    number.tenant_id = tenant_id
    number.queue_id = None
    number.ivr_flow_id = None
    number.assigned_at = utcnow()
    await session.flush()
    await audit.record_provider(
        session,
        provider_user_id=_provider(principal),
        action="number.assign",
        target_tenant_id=tenant_id,
        detail={"number": number.e164},
    )
    await set_tenant(session, tenant_id)
    await audit.record(
        session,
        tenant_id=tenant_id,
        actor_type="provider",
        actor_id=None,
        action="number.assign",
        target_type="phone_number",
        target_id=number.id,
        after={"number": number.e164},
    )
    return pool_out(number)


async def release_number(session: AsyncSession, principal: Principal, number_id: uuid.UUID) -> PoolNumberOut:
    """Take a number back into the free pool; it stops reaching its former tenant at once."""
    number = await _pool_number(session, number_id)
    former = number.tenant_id
    if former is None:
        return pool_out(number)
    before = {"number": number.e164, "queue_id": str(number.queue_id) if number.queue_id else None}
    number.tenant_id = None
    number.queue_id = None
    number.ivr_flow_id = None
    number.assigned_at = None
    await session.flush()
    await audit.record_provider(
        session,
        provider_user_id=_provider(principal),
        action="number.release",
        target_tenant_id=former,
        detail={"number": number.e164},
    )
    await set_tenant(session, former)
    await audit.record(
        session,
        tenant_id=former,
        actor_type="provider",
        actor_id=None,
        action="number.release",
        target_type="phone_number",
        target_id=number.id,
        before=before,
    )
    return pool_out(number)


# --- the tenant's own numbers --------------------------------------------------------------------


async def _own_number(session: AsyncSession, tenant_id: uuid.UUID, number_id: uuid.UUID, *, lock: bool) -> PhoneNumber:
    statement = select(PhoneNumber).where(PhoneNumber.id == number_id, PhoneNumber.tenant_id == tenant_id)
    if lock:
        statement = statement.with_for_update()
    number = await session.scalar(statement)
    if number is None:
        raise NotFound("No such number")
    return number


async def list_numbers(
    session: AsyncSession, tenant_id: uuid.UUID, page: PageRequest
) -> tuple[list[NumberOut], str | None]:
    """The tenant's numbers."""
    rows, cursor = await paginate(
        session,
        select(PhoneNumber).where(PhoneNumber.tenant_id == tenant_id),
        page,
        sortable={"number": PhoneNumber.e164, "assigned_at": PhoneNumber.assigned_at},
        default_sort="number",
        id_column=PhoneNumber.id,
    )
    return [number_out(n) for n in rows], cursor


async def get_number(session: AsyncSession, tenant_id: uuid.UUID, number_id: uuid.UUID) -> NumberOut:
    """One of the tenant's numbers."""
    return number_out(await _own_number(session, tenant_id, number_id, lock=False))


async def route_number(
    session: AsyncSession,
    principal: Principal,
    number_id: uuid.UUID,
    data: NumberRouting,
    flows: IvrFlows | None = None,
) -> NumberOut:
    """Point a number at one of the tenant's queues, or a published IVR flow of the tenant (`flows` decides)."""
    tenant_id = principal.tenant_id
    assert tenant_id is not None
    number = await _own_number(session, tenant_id, number_id, lock=True)
    before = {
        "queue_id": str(number.queue_id) if number.queue_id else None,
        "ivr_flow_id": str(number.ivr_flow_id) if number.ivr_flow_id else None,
        "label": number.label,
    }
    if not isinstance(data.queue_id, msgspec.UnsetType):
        if data.queue_id is not None:
            try:
                await routing.get_queue(session, data.queue_id)  # row-level security: the tenant's queues only
            except NotFound as exc:
                raise InvalidInput.field("queue_id", "is not a queue of this tenant") from exc
        number.queue_id = data.queue_id
    if not isinstance(data.ivr_flow_id, msgspec.UnsetType):
        if data.ivr_flow_id is not None and not await (flows or NoIvrFlows()).exists(session, data.ivr_flow_id):
            raise InvalidInput.field("ivr_flow_id", "is not a published IVR flow of this tenant")
        number.ivr_flow_id = data.ivr_flow_id
    if not isinstance(data.label, msgspec.UnsetType):
        number.label = clean_text("label", data.label, max_length=120, allow_empty=True)
    await session.flush()
    await audit.record(
        session,
        tenant_id=tenant_id,
        actor_type=principal.actor_type,
        actor_id=principal.actor_id,
        action="number.route",
        target_type="phone_number",
        target_id=number.id,
        before=before,
        after={
            "queue_id": str(number.queue_id) if number.queue_id else None,
            "ivr_flow_id": str(number.ivr_flow_id) if number.ivr_flow_id else None,
            "label": number.label,
        },
    )
    return number_out(number)


# --- lookups for the switch ----------------------------------------------------------------------


async def number_for_did(session: AsyncSession, e164: str) -> PhoneNumber | None:
    """The pool's number for a dialled DID, assigned or not."""
    return await session.scalar(select(PhoneNumber).where(PhoneNumber.e164 == e164))


_SEAT_WITH_FIRST_NUMBER = (
    "SELECT seat.*, (SELECT n.e164 FROM phone_numbers n WHERE n.tenant_id = seat.tenant_id ORDER BY n.e164 LIMIT 1)"
    " FROM seat_by_sip_address($1, $2) AS seat"
)


async def seat_with_first_number(
    connection: Any, domain: str, sip_username: str
) -> tuple[tenants.SipAddressSeat, str | None] | None:
    """`tenants.seat_by_sip_address` and the tenant's lowest number (what its seats present when they call out), in
    one statement on a driver connection.

    The switch's directory asks this on every REGISTER (`db.engine.driver_connection`: no transaction, one
    round trip); the number pool is a global table, so the join needs no tenant context of its own.
    """
    row = await connection.fetchrow(_SEAT_WITH_FIRST_NUMBER, domain, sip_username)
    if row is None:
        return None
    return tenants.SipAddressSeat.from_row(tuple(row)), row[-1]


async def numbers_routed_to_flow(session: AsyncSession, tenant_id: uuid.UUID, flow_id: uuid.UUID) -> list[str]:
    """The tenant's numbers that send their calls to an IVR flow (E.164)."""
    return list(
        (
            await session.scalars(
                select(PhoneNumber.e164)
                .where(PhoneNumber.tenant_id == tenant_id, PhoneNumber.ivr_flow_id == flow_id)
                .order_by(PhoneNumber.e164)
            )
        ).all()
    )


async def owned_numbers(session: AsyncSession, tenant_id: uuid.UUID) -> list[str]:
    """Every number assigned to the tenant (E.164): the caller ids it may present."""
    return list(
        (
            await session.scalars(
                select(PhoneNumber.e164).where(PhoneNumber.tenant_id == tenant_id).order_by(PhoneNumber.e164)
            )
        ).all()
    )
