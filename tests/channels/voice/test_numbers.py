"""Numbers: the provider's pool, assignment to tenants, and each tenant pointing its numbers at its own queues."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from backend.channels.voice.models import PhoneNumber
from backend.db.engine import tenant_transaction
from backend.tenants.models import ProviderAuditEntry
from tests.factories import Factory

pytestmark = pytest.mark.integration


async def test_the_pool_takes_numbers_in_e164(factory: Factory, client):
    ops = await factory.provider_headers()
    response = await client.post(
        "/api/v1/ops/numbers", json={"number": "+33 1 77 88 99 00", "label": "Paris"}, headers=ops
    )
    assert response.status_code == 201, response.text
    assert response.json()["number"] == "+33177889900"
    assert response.json()["tenant_id"] is None
    again = await client.post("/api/v1/ops/numbers", json={"number": "+33177889900"}, headers=ops)
    assert again.status_code == 409
    for bad in ("0177889900", "+999 12", "+1 555", "hello", "+33 1 77 88 99 00 11 22"):
        refused = await client.post("/api/v1/ops/numbers", json={"number": bad}, headers=ops)
        assert refused.status_code in (400, 422), bad
        assert refused.json()["errors"][0]["field"] == "number", refused.json()
    extra = await client.post("/api/v1/ops/numbers", json={"number": "+33177889901", "tenant": "x"}, headers=ops)
    assert extra.status_code == 400


async def test_assign_route_and_release_are_audited(factory: Factory, client, sessionmaker):
    a = await factory.tenant()
    b = await factory.tenant()
    ops = await factory.provider_headers()
    number = await factory.number(a)
    listed = await client.get("/api/v1/voice/numbers", headers=a.headers)
    assert [n["number"] for n in listed.json()["items"]] == [number["number"]]
    assert (await client.get("/api/v1/voice/numbers", headers=b.headers)).json()["items"] == []

    queue_a = await factory.queue(a)
    queue_b = await factory.queue(b)
    routed = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"queue_id": str(queue_a), "label": "Support"}, headers=a.headers
    )
    assert routed.status_code == 200, routed.text
    assert routed.json()["queue_id"] == str(queue_a)
    # Another tenant's queue, an IVR flow (none exist before call handling), another tenant's number.
    wrong_queue = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"queue_id": str(queue_b)}, headers=a.headers
    )
    assert wrong_queue.status_code == 422 and wrong_queue.json()["errors"][0]["field"] == "queue_id"
    flow = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"ivr_flow_id": str(uuid.uuid4())}, headers=a.headers
    )
    assert flow.status_code == 422 and flow.json()["errors"][0]["field"] == "ivr_flow_id"
    theirs = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"queue_id": str(queue_b)}, headers=b.headers
    )
    assert theirs.status_code == 404
    assert (await client.get(f"/api/v1/voice/numbers/{number['id']}", headers=a.headers)).json()["queue_id"] == str(
        queue_a
    )

    taken = await client.post(
        f"/api/v1/ops/numbers/{number['id']}/assign", json={"tenant_id": str(b.tenant_id)}, headers=ops
    )
    assert taken.status_code == 409
    released = await client.post(f"/api/v1/ops/numbers/{number['id']}/release", headers=ops)
    assert released.status_code == 200 and released.json()["tenant_id"] is None
    assert released.json()["queue_id"] is None
    assert (await client.get(f"/api/v1/voice/numbers/{number['id']}", headers=a.headers)).status_code == 404
    given = await client.post(
        f"/api/v1/ops/numbers/{number['id']}/assign", json={"tenant_id": str(b.tenant_id)}, headers=ops
    )
    assert given.status_code == 200 and given.json()["tenant_id"] == str(b.tenant_id)

    audit_a = await client.get("/api/v1/audit", params={"action": "number."}, headers=a.headers)
    assert [e["action"] for e in audit_a.json()["items"]] == ["number.release", "number.route", "number.assign"]
    async with sessionmaker() as session:
        provider = (
            await session.scalars(
                select(ProviderAuditEntry.action)
                .where(ProviderAuditEntry.detail["number"].astext == number["number"])
                .order_by(ProviderAuditEntry.created_at)
            )
        ).all()
    assert provider == ["number.add", "number.assign", "number.release", "number.assign"]


async def test_the_pool_lists_with_filters(factory: Factory, client):
    ctx = await factory.tenant()
    ops = await factory.provider_headers()
    mine = await factory.number(ctx)
    by_tenant = await client.get("/api/v1/ops/numbers", params={"tenant_id": str(ctx.tenant_id)}, headers=ops)
    assert [n["number"] for n in by_tenant.json()["items"]] == [mine["number"]]
    free = await client.get("/api/v1/ops/numbers", params={"free": "true", "limit": 200}, headers=ops)
    assert all(n["tenant_id"] is None for n in free.json()["items"])
    prefix = await client.get("/api/v1/ops/numbers", params={"prefix": mine["number"]}, headers=ops)
    assert [n["id"] for n in prefix.json()["items"]] == [str(mine["id"])]


async def test_deleting_a_queue_leaves_its_number_unrouted(factory: Factory, client, sessionmaker):
    ctx = await factory.tenant()
    queue = await factory.queue(ctx)
    number = await factory.number(ctx, queue_id=queue)
    deleted = await client.delete(f"/api/v1/routing/queues/{queue}", headers=ctx.headers)
    assert deleted.status_code == 204, deleted.text
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        row = await session.scalar(select(PhoneNumber).where(PhoneNumber.id == number["id"]))
    assert row is not None and row.tenant_id == ctx.tenant_id and row.queue_id is None
