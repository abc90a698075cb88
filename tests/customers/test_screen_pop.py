"""The screen pop in one statement (`customer_screen_pop`): the same answer as the general path, one tenant only."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from backend.auth.principal import Principal
from backend.customers import service
from backend.customers.access import viewer_of
from backend.db.engine import driver_connection, tenant_transaction
from backend.tenants import service as tenants_service

pytestmark = pytest.mark.integration

BASE = "/api/v1/customers"


async def _principal(sessionmaker, tenant_id: uuid.UUID, user_id: uuid.UUID) -> Principal:
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        found = await tenants_service.user_permissions(session, user_id)
    assert found is not None
    return Principal(kind="user", tenant_id=tenant_id, user_id=user_id, permissions=found[1])


async def _both(engine, sessionmaker, principal: Principal, **address: str) -> tuple[bytes, bytes]:
    """The screen pop through the ORM session (as before) and through the one statement, as JSON."""
    async with tenant_transaction(sessionmaker, principal.tenant_id) as session:
        general = await service.screen_pop(session, await viewer_of(session, principal), **address)
    fast = await service.screen_pop_for_caller(engine, sessionmaker, principal, **address)
    return msgspec.json.encode(general), msgspec.json.encode(fast)


async def test_one_statement_answers_exactly_as_the_general_path(client, factory, engine, sessionmaker):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    north, south = await factory.team(ctx), await factory.team(ctx)
    await factory.customer_field(ctx, key="id_card", type="text", sensitive=True)
    ours = await factory.customer(
        ctx,
        team_id=str(north),
        phones=["+8613800138000", "ext. 7"],
        emails=["Wang.Li@example.com"],
        wechat_openids=["oWx_ours"],
        tags=["vip"],
        custom={"id_card": "110101199003074512"},
    )
    theirs = await factory.customer(ctx, team_id=str(south), phones=["+8613700137000"])
    # Two records share a number: both pop, newest first.
    await factory.customer(ctx, phones=["+8613600136000"], name="First")
    await factory.customer(ctx, phones=["+8613600136000"], name="Second")
    await factory.ticket(ctx, customer_id=ours["id"], subject="Broken phone")
    await factory.ticket(ctx, customer_id=ours["id"], subject="Invoice", priority="high")
    queue = await factory.queue(ctx, skills=[])
    for ref in (ours["id"], "+8613800138000", "wang.li@example.com", theirs["id"]):
        made = await client.post(
            "/api/v1/interactions",
            json={"channel": "webchat", "queue_id": str(queue), "customer_ref": ref},
            headers=ctx.headers,
        )
        assert made.status_code == 201, made.text
    agent = await factory.member(ctx, north, role="agent")
    supervisor = await factory.member(ctx, north, role="supervisor")
    viewers = [
        ctx.system(),
        await _principal(sessionmaker, ctx.tenant_id, ctx.owner_id),
        await _principal(sessionmaker, ctx.tenant_id, agent["id"]),  # masked, scoped to north
        await _principal(sessionmaker, ctx.tenant_id, supervisor["id"]),
    ]
    lookups = [
        {"phone": "138 0013 8000"},
        {"phone": "+86 137-0013-7000"},  # another unit's record: the agent goes down the general path
        {"phone": "0086 13600136000"},
        {"phone": "ext. 7"},
        {"phone": "13900000000"},
        {"email": "WANG.LI@example.com"},
        {"email": "nobody@example.com"},
        {"wechat_openid": "oWx_ours"},
    ]
    for principal in viewers:
        for address in lookups:
            general, fast = await _both(engine, sessionmaker, principal, **address)
            assert fast == general, (principal.permissions, address)
    pop = msgspec.json.decode(
        (await _both(engine, sessionmaker, viewers[2], phone="13800138000"))[1]
    )  # what the agent sees
    assert [c["id"] for c in pop["customers"]] == [ours["id"]]
    assert pop["customers"][0]["phones"][0]["number"] == "+86 138****8000"
    assert pop["customers"][0]["custom"] == {"id_card": "********12"}
    assert len(pop["interactions"]) == 3 and len(pop["open_tickets"]) == 2
    hidden = msgspec.json.decode((await _both(engine, sessionmaker, viewers[2], phone="13700137000"))[1])
    assert hidden["known"] is False and hidden["interactions"] == []
    two = msgspec.json.decode((await _both(engine, sessionmaker, viewers[0], phone="13600136000"))[1])
    assert [c["name"] for c in two["customers"]] == ["Second", "First"]


async def test_the_function_reads_one_tenant_and_leaves_no_tenant_behind(factory, engine, settings_obj):
    a, b = await factory.tenant(time_zone="Asia/Shanghai"), await factory.tenant(time_zone="Asia/Shanghai")
    number = f"+86138{uuid.uuid4().int % 10**8:08d}"
    mine = await factory.customer(a, phones=[number])

    async def pop(tenant_id: uuid.UUID | None) -> list[object]:
        async with driver_connection(engine) as connection:
            raw = await connection.fetchval(
                "SELECT customer_screen_pop($1, 'phone', $2, 10, 20, NULL)::text", tenant_id, [number]
            )
        return list(msgspec.json.decode(raw)[0])

    found = await pop(a.tenant_id)
    assert [row[0] for row in found] == [mine["id"]]  # type: ignore[index]
    assert await pop(b.tenant_id) == []  # the same number, another tenant: nothing
    with pytest.raises(Exception, match="needs a tenant"):
        await pop(None)
    # One connection, so the next statement runs where the function ran: the tenant it set died with its
    # statement's implicit transaction, and a plain read of tenant rows sees nothing again (fail closed).
    single = create_async_engine(settings_obj.database_url, pool_size=1, max_overflow=0)
    try:
        async with driver_connection(single) as connection:
            await connection.fetchval(
                "SELECT customer_screen_pop($1, 'phone', $2, 10, 20, NULL)", a.tenant_id, [number]
            )
            assert await connection.fetchval("SELECT current_setting('app.tenant_id', true)") in (None, "")
            assert await connection.fetchval("SELECT count(*) FROM customers") == 0
        async with single.connect() as connection:
            assert (await connection.execute(text("SELECT count(*) FROM customer_identities"))).scalar() == 0
    finally:
        await single.dispose()


async def test_a_pop_inside_a_tenant_transaction_cannot_reach_another_tenant(factory, sessionmaker):
    """Even called by hand inside another tenant's transaction, it answers for the tenant it is given only."""
    a, b = await factory.tenant(time_zone="Asia/Shanghai"), await factory.tenant(time_zone="Asia/Shanghai")
    number = f"+86137{uuid.uuid4().int % 10**8:08d}"
    await factory.customer(a, phones=[number])
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        raw = await session.scalar(
            text("SELECT customer_screen_pop(:t, 'phone', CAST(:v AS text[]), 10, 20, NULL)::text"),
            {"t": b.tenant_id, "v": [number]},
        )
    assert msgspec.json.decode(raw)[0] == []


async def test_screen_pop_route_keeps_masking_units_and_tenants(client, factory):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    other = await factory.tenant(time_zone="Asia/Shanghai")
    north = await factory.team(ctx)
    customer = await factory.customer(ctx, team_id=str(north), phones=["+8613512345678"])
    agent = await factory.member(ctx, north, role="agent")
    as_agent = (
        await client.get(f"{BASE}/screen-pop", params={"phone": "13512345678"}, headers=agent["headers"])
    ).json()
    assert [c["id"] for c in as_agent["customers"]] == [customer["id"]]
    assert as_agent["value"] == "+86 135****5678" and as_agent["customers"][0]["masked"] is True
    stranger = await client.get(f"{BASE}/screen-pop", params={"phone": "13512345678"}, headers=other.headers)
    assert stranger.status_code == 200 and stranger.json()["known"] is False
    assert (await client.get(f"{BASE}/screen-pop", params={"phone": "13512345678"})).status_code == 401


async def test_the_function_plans_generically_so_lookups_use_the_btree(engine, factory):
    """With custom plans the planner answered `value = ANY(...)` from the partial trigram GiST, which it costs
    below the (tenant, kind, value) B-tree but which reads thousands of pages on a large store."""
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    async with driver_connection(engine) as connection:
        config = await connection.fetchval(
            "SELECT proconfig FROM pg_proc WHERE proname = 'customer_screen_pop' AND NOT prosecdef"
        )
        assert "plan_cache_mode=force_generic_plan" in config
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(ctx.tenant_id))
            await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await connection.execute(
                "PREPARE pop_lookup(text, text[]) AS SELECT i.customer_id FROM customer_identities i "
                "WHERE i.kind = $1 AND i.value = ANY($2)"
            )
            plan = "\n".join(
                r[0] for r in await connection.fetch("EXPLAIN EXECUTE pop_lookup('phone', ARRAY['+8613800138000'])")
            )
            await connection.execute("DEALLOCATE pop_lookup")
    assert "ix_customer_identities_value_trgm" not in plan, plan
