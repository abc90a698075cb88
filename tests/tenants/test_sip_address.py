"""A SIP address (`user@domain`) resolved to its tenant and seat in one statement, without leaking tenants."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.db.engine import make_lookup_sessionmaker
from backend.db.tenancy import set_tenant
from backend.tenants import service as tenants
from tests.factories import Factory

_CURRENT_TENANT = text("SELECT current_setting('app.tenant_id', true)")


async def test_a_seat_is_found_by_its_address_in_its_own_tenant_only(factory: Factory, engine: AsyncEngine):
    a = await factory.tenant()
    b = await factory.tenant()
    seat_a = await factory.sip_seat(a)
    seat_b = await factory.sip_seat(b)
    lookups = make_lookup_sessionmaker(engine)
    async with lookups() as session:
        found = await tenants.seat_by_sip_address(session, f"  {seat_a['domain'].upper()} ", seat_a["username"])
        assert found is not None and found.seat is not None
        assert (found.tenant_id, found.sip_domain, found.tenant_status) == (a.tenant_id, seat_a["domain"], "trial")
        assert (found.seat.seat_id, found.seat.user_id) == (seat_a["seat_id"], uuid.UUID(str(seat_a["user_id"])))
        assert found.seat.sip_a1_hash and found.seat.user_status == "active"

        # B's seat asked for in A's domain: A is found, the seat is not (it is not A's).
        other = await tenants.seat_by_sip_address(session, seat_a["domain"], "no-such-user")
        assert other is not None and other.tenant_id == a.tenant_id and other.seat is None
        if seat_b["username"] != seat_a["username"]:
            crossed = await tenants.seat_by_sip_address(session, seat_a["domain"], seat_b["username"])
            assert crossed is not None and crossed.seat is None
        assert await tenants.seat_by_sip_address(session, "nobody.example.com", seat_a["username"]) is None

        # Outside a transaction the tenant setting it made lasted one statement: the pooled connection has none.
        assert not await session.scalar(_CURRENT_TENANT)


async def test_inside_a_transaction_the_callers_tenant_is_put_back(
    factory: Factory, sessionmaker: async_sessionmaker[AsyncSession]
):
    a = await factory.tenant()
    b = await factory.tenant()
    seat_a = await factory.sip_seat(a)
    async with sessionmaker() as session, session.begin():
        assert await tenants.seat_by_sip_address(session, seat_a["domain"], seat_a["username"]) is not None
        assert not await session.scalar(_CURRENT_TENANT)
        await set_tenant(session, b.tenant_id)
        found = await tenants.seat_by_sip_address(session, seat_a["domain"], seat_a["username"])
        assert found is not None and found.seat is not None and found.tenant_id == a.tenant_id
        assert await session.scalar(_CURRENT_TENANT) == str(b.tenant_id)
