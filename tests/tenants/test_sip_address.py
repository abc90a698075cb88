"""A SIP address (`user@domain`) resolved to its tenant and seat in one statement, without leaking tenants."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from backend.channels.voice import numbers
from backend.db.engine import driver_connection
from backend.db.tenancy import set_tenant
from backend.tenants import service as tenants
from tests.factories import Factory

_CURRENT_TENANT = text("SELECT current_setting('app.tenant_id', true)")


async def test_a_seat_is_found_by_its_address_in_its_own_tenant_only(
    factory: Factory, sessionmaker: async_sessionmaker[AsyncSession]
):
    a = await factory.tenant()
    b = await factory.tenant()
    seat_a = await factory.sip_seat(a)
    seat_b = await factory.sip_seat(b)
    async with sessionmaker() as session:
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


async def test_the_directory_lookup_leaves_no_tenant_on_the_pooled_connection(factory: Factory, engine: AsyncEngine):
    """Outside a transaction (the switch's directory) the tenant the function set lasted its one statement."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    number = await factory.number(ctx)
    async with driver_connection(engine) as connection:
        found = await numbers.seat_with_first_number(connection, seat["domain"], seat["username"])
        assert found is not None
        assert found[0].tenant_id == ctx.tenant_id and found[0].seat is not None and found[1] == number["number"]
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
        assert await connection.fetchval("SELECT count(*) FROM seats") == 0  # row-level security: no tenant


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
