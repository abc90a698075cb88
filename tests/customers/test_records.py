"""Customer records over the API: contact points, custom fields, versions, role-based access, search, screen pop."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from backend.customers.models import Customer
from backend.db.engine import tenant_transaction
from backend.tenants.models import AuditEntry
from tests.factories import unique
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration

BASE = "/api/v1/customers"


async def _count(sessionmaker, tenant_id) -> int:
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        return int(await session.scalar(select(func.count()).select_from(Customer)) or 0)


async def test_contact_points_are_normalised_with_the_tenant_region(client, factory):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    created = await factory.customer(
        ctx,
        name="王丽",
        phones=["138 0013 8001", "+86 (139) 0013 8002", "ext. 12"],
        emails=["Wang.Li@Example.COM"],
        wechat_openids=["oAbc_123-x"],
        external_ids=["CRM-1"],
        tags=["vip", "vip", "beijing"],
    )
    assert [p["number"] for p in created["phones"]] == ["+8613800138001", "+8613900138002", "12"]
    assert [p["valid"] for p in created["phones"]] == [True, True, False]
    assert created["phones"][2]["raw"] == "ext. 12"  # kept as entered, flagged, never refused
    assert created["emails"] == ["wang.li@example.com"]
    assert created["tags"] == ["vip", "beijing"]
    assert created["version"] == 1
    assert created["etag"] == '"1"'


async def test_bad_input_is_refused_with_field_errors_and_nothing_written(client, factory, sessionmaker):
    ctx = await factory.tenant()
    await factory.customer_field(ctx, key="age", type="number", min_value=0)
    await factory.customer_field(ctx, key="tier", type="choice", choices=["gold", "silver"])
    before = await _count(sessionmaker, ctx.tenant_id)
    response = await client.post(
        BASE,
        json={
            "name": "Someone",
            "emails": ["not-an-address"],
            "custom": {"age": "forty", "tier": "bronze", "unknown": 1},
        },
        headers=ctx.headers,
    )
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    fields = {e["field"] for e in response.json()["errors"]}
    assert fields == {"emails[0]", "custom.age", "custom.tier", "custom.unknown"}
    assert await _count(sessionmaker, ctx.tenant_id) == before
    too_many = await client.post(
        BASE, json={"name": "X", "tags": ["t"] * 3 + [str(i) for i in range(60)]}, headers=ctx.headers
    )
    assert too_many.status_code == 422
    unknown_field = await client.post(BASE, json={"name": "X", "colour": "red"}, headers=ctx.headers)
    assert unknown_field.status_code == 400


async def test_writes_need_the_current_version(client, factory, sessionmaker):
    ctx = await factory.tenant()
    created = await factory.customer(ctx)
    path = f"{BASE}/{created['id']}"
    read = await client.get(path, headers=ctx.headers)
    assert read.headers["etag"] == '"1"'
    missing = await client.patch(path, json={"name": "A"}, headers=ctx.headers)
    assert missing.status_code == 428
    # Two people edit the same version at once: one wins, the other is told, nothing is overwritten silently.
    first, second = await asyncio.gather(
        client.patch(path, json={"name": "First"}, headers={**ctx.headers, "If-Match": '"1"'}),
        client.patch(path, json={"name": "Second"}, headers={**ctx.headers, "If-Match": '"1"'}),
    )
    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 412], (first.text, second.text)
    winner = first if first.status_code == 200 else second
    loser = second if winner is first else first
    assert loser.json()["current_version"] == 2
    assert winner.headers["etag"] == '"2"'
    final = (await client.get(path, headers=ctx.headers)).json()
    assert final["name"] == winner.json()["name"]
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        entries = (
            await session.scalars(
                select(AuditEntry).where(AuditEntry.target_id == created["id"], AuditEntry.action == "customer.update")
            )
        ).all()
    assert len(entries) == 1
    assert entries[0].before["name"] == created["name"]
    assert entries[0].after["name"] == final["name"]
    # Sending the same values again is not a change: no new version.
    same = await client.patch(path, json={"name": final["name"]}, headers={**ctx.headers, "If-Match": '"2"'})
    assert same.status_code == 200
    assert same.json()["version"] == 2


async def _units(client, factory):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    north, south = await factory.team(ctx), await factory.team(ctx)
    agent = await factory.member(ctx, north, role="agent")
    supervisor = await factory.member(ctx, north, role="supervisor")
    ours = await factory.customer(
        ctx, name=f"North {unique('n')}", team_id=str(north), phones=["+8613800138000"], emails=["wang.li@example.com"]
    )
    theirs = await factory.customer(ctx, name=f"South {unique('s')}", team_id=str(south), phones=["+8613700137000"])
    shared = await factory.customer(ctx, name=f"Shared {unique('x')}")
    return ctx, north, south, agent, supervisor, ours, theirs, shared


async def test_agents_see_their_units_masked_supervisors_everything(client, factory):
    ctx, north, south, agent, supervisor, ours, theirs, shared = await _units(client, factory)
    as_agent = await client.get(f"{BASE}/{ours['id']}", headers=agent["headers"])
    assert as_agent.status_code == 200
    body = as_agent.json()
    assert body["masked"] is True
    assert body["phones"] == [{"number": "+86 138****8000", "valid": True, "raw": None}]
    assert body["emails"] == ["w***@example.com"]
    assert "13800138000" not in as_agent.text
    assert (await client.get(f"{BASE}/{theirs['id']}", headers=agent["headers"])).status_code == 404
    assert (await client.get(f"{BASE}/{shared['id']}", headers=agent["headers"])).status_code == 200
    listed = (await client.get(BASE, params={"limit": 200}, headers=agent["headers"])).json()["items"]
    ids = {c["id"] for c in listed}
    assert ours["id"] in ids and shared["id"] in ids and theirs["id"] not in ids
    # Another unit's customer stays out of reach even when searched by its whole number.
    found = (await client.get(BASE, params={"phone": "137 0013 7000"}, headers=agent["headers"])).json()["items"]
    assert found == []
    as_supervisor = await client.get(f"{BASE}/{theirs['id']}", headers=supervisor["headers"])
    assert as_supervisor.status_code == 200
    assert as_supervisor.json()["phones"][0]["number"] == "+8613700137000"
    # An agent cannot hand a record to a unit they are not in, nor change another unit's record.
    moved = await client.post(BASE, json={"name": "X", "team_id": str(south)}, headers=agent["headers"])
    assert moved.status_code == 403
    # Agents hold neither delete, nor export, nor import.
    erase = await client.post(f"{BASE}/{ours['id']}/erase", headers={**agent["headers"], "If-Match": '"1"'})
    assert erase.status_code == 403
    assert (await client.get(f"{BASE}/export", headers=agent["headers"])).status_code == 403
    assert (await client.post("/api/v1/customer-imports", json={}, headers=agent["headers"])).status_code == 403


async def test_masked_viewers_search_whole_numbers_and_addresses_only(client, factory):
    """Fragments would reveal what the mask hides (`138****8000` searched as 1381, 1382...): without
    customers:read_sensitive a search names the whole number, in any common format, or the whole address."""
    ctx, north, south, agent, supervisor, ours, theirs, shared = await _units(client, factory)
    for fragment in ({"phone": "1380013"}, {"q": "13800138"}, {"email": "wang.li@"}, {"q": "li@example"}):
        refused = await client.get(BASE, params=fragment, headers=agent["headers"])
        assert refused.status_code == 422, (fragment, refused.text)
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "read_sensitive" in refused.text
    for whole in ({"phone": "138 0013 8000"}, {"phone": "+86 138-0013-8000"}, {"q": "Wang.Li@example.com"}):
        found = (await client.get(BASE, params=whole, headers=agent["headers"])).json()["items"]
        assert [c["id"] for c in found] == [ours["id"]], whole
        assert found[0]["phones"][0]["number"] == "+86 138****8000"
    # Those who see numbers unmasked keep fragment search.
    by_fragment = (await client.get(BASE, params={"phone": "1380013"}, headers=supervisor["headers"])).json()
    assert ours["id"] in [c["id"] for c in by_fragment["items"]]


async def test_the_handling_agent_sees_the_caller_whatever_the_unit(client, factory, app):
    ctx, north, south, agent, supervisor, ours, theirs, shared = await _units(client, factory)
    assert (await client.get(f"{BASE}/{theirs['id']}", headers=agent["headers"])).status_code == 404
    seat = await client.post("/api/v1/seats", json={"user_id": str(agent["id"])}, headers=ctx.headers)
    assert seat.status_code == 201
    assert (
        await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    ).status_code == 200
    queue = await factory.queue(ctx)
    ticket = (await client.post("/api/v1/auth/ws-ticket", headers=agent["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()  # hello
        created = await client.post(
            "/api/v1/interactions",
            json={"channel": "webchat", "queue_id": str(queue), "customer_ref": "0086 137 0013 7000"},
            headers=ctx.headers,
        )
        assert created.status_code == 201, created.text
        offer = await socket.receive_json()
    assert offer["type"] == "offer"
    pop = offer["screen_pop"]
    assert pop["known"] is True
    assert [c["id"] for c in pop["customers"]] == [theirs["id"]]
    assert pop["customers"][0]["phones"][0]["number"] == "+86 137****7000"  # masked: agents lack read_sensitive
    # The offer attached the interaction to the record, and the agent may now open it.
    interaction = (await client.get(f"/api/v1/interactions/{created.json()['id']}", headers=ctx.headers)).json()
    assert interaction["customer_ref"] == theirs["id"]
    assert interaction["attributes"]["customer_address"] == "0086 137 0013 7000"
    opened = await client.get(f"{BASE}/{theirs['id']}", headers=agent["headers"])
    assert opened.status_code == 200
    assert opened.json()["masked"] is True
    by_interaction = await client.get(f"{BASE}/by-interaction/{created.json()['id']}", headers=agent["headers"])
    assert [c["id"] for c in by_interaction.json()["customers"]] == [theirs["id"]]
    # Another agent of the same unit, not handling it, still cannot.
    other = await factory.member(ctx, north, role="agent")
    assert (await client.get(f"{BASE}/{theirs['id']}", headers=other["headers"])).status_code == 404


async def test_screen_pop_by_any_format_and_unknown_callers(client, factory):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    customer = await factory.customer(
        ctx, phones=["+8613812345678"], emails=["li@example.com"], wechat_openids=["oWx_42"]
    )
    ticket = await factory.ticket(ctx, customer_id=customer["id"], subject="Broken phone")
    for typed in ("13812345678", "+86 138-1234-5678", "0086 13812345678", "tel:+8613812345678"):
        pop = (await client.get(f"{BASE}/screen-pop", params={"phone": typed}, headers=ctx.headers)).json()
        assert [c["id"] for c in pop["customers"]] == [customer["id"]], typed
        assert [t["id"] for t in pop["open_tickets"]] == [ticket["id"]]
    assert (await client.get(f"{BASE}/screen-pop", params={"email": "LI@example.com"}, headers=ctx.headers)).json()[
        "known"
    ]
    assert (await client.get(f"{BASE}/screen-pop", params={"wechat_openid": "oWx_42"}, headers=ctx.headers)).json()[
        "known"
    ]
    unknown = (await client.get(f"{BASE}/screen-pop", params={"phone": "13900000000"}, headers=ctx.headers)).json()
    assert unknown["known"] is False
    assert unknown["customers"] == [] and unknown["interactions"] == [] and unknown["open_tickets"] == []
    assert unknown["new_customer"] == {"name": "", "phones": ["+8613900000000"]}
    made = await client.post(BASE, json={**unknown["new_customer"], "name": "New caller"}, headers=ctx.headers)
    assert made.status_code == 201
    none = await client.get(f"{BASE}/screen-pop", headers=ctx.headers)
    assert none.status_code == 422


async def test_screen_pop_shows_the_last_twenty_interactions(client, factory):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    customer = await factory.customer(ctx, phones=["+8613811112222"])
    queue = await factory.queue(ctx, skills=[])
    for index in range(22):
        ref = customer["id"] if index % 2 else "+8613811112222"
        response = await client.post(
            "/api/v1/interactions",
            json={"channel": "webchat", "queue_id": str(queue), "customer_ref": ref},
            headers=ctx.headers,
        )
        assert response.status_code == 201
    pop = (await client.get(f"{BASE}/screen-pop", params={"phone": "13811112222"}, headers=ctx.headers)).json()
    assert len(pop["interactions"]) == 20
    stamps = [i["created_at"] for i in pop["interactions"]]
    assert stamps == sorted(stamps, reverse=True)


async def test_search_by_name_phone_email_and_tags_with_cursor(client, factory):
    ctx = await factory.tenant()
    marker = unique("zq")
    made = [
        await factory.customer(
            ctx,
            name=f"{marker} 张伟 {i}",
            phones=[f"+3314268{i:04d}"],
            emails=[f"p{i}@{marker}.test"],
            tags=["vip"] if i % 2 else [],
        )
        for i in range(5)
    ]
    by_name = (await client.get(BASE, params={"q": marker, "sort": "name", "limit": 2}, headers=ctx.headers)).json()
    assert len(by_name["items"]) == 2 and by_name["next_cursor"]
    rest = (
        await client.get(
            BASE,
            params={"q": marker, "sort": "name", "limit": 2, "cursor": by_name["next_cursor"]},
            headers=ctx.headers,
        )
    ).json()
    names = [c["name"] for c in by_name["items"] + rest["items"]]
    assert names == sorted(names) and len(set(names)) == 4
    assert len((await client.get(BASE, params={"q": "张伟"}, headers=ctx.headers)).json()["items"]) == 5
    by_phone = (await client.get(BASE, params={"phone": "268 0003"}, headers=ctx.headers)).json()["items"]
    assert [c["id"] for c in by_phone] == [made[3]["id"]]
    by_email = (await client.get(BASE, params={"q": f"p4@{marker}"}, headers=ctx.headers)).json()["items"]
    assert [c["id"] for c in by_email] == [made[4]["id"]]
    tagged = (await client.get(BASE, params={"q": marker, "tag": "vip"}, headers=ctx.headers)).json()["items"]
    assert {c["id"] for c in tagged} == {made[1]["id"], made[3]["id"]}
    assert (await client.get(BASE, params={"phone": "1"}, headers=ctx.headers)).status_code == 422


async def test_sensitive_custom_fields_are_masked(client, factory):
    ctx = await factory.tenant()
    await factory.customer_field(ctx, key="id_card", type="text", sensitive=True)
    await factory.customer_field(ctx, key="since", type="date")
    created = await factory.customer(ctx, custom={"id_card": "110101199003074512", "since": "2020-01-31"})
    assert created["custom"] == {"id_card": "110101199003074512", "since": "2020-01-31"}
    agent = await factory.user(ctx, role="agent", login=True)
    seen = (await client.get(f"{BASE}/{created['id']}", headers=agent["headers"])).json()
    assert seen["custom"] == {"id_card": "********12", "since": "2020-01-31"}


async def test_history_is_one_ordered_view(client, factory):
    ctx = await factory.tenant()
    customer = await factory.customer(ctx)
    queue = await factory.queue(ctx)
    for channel in ("voice", "wechat"):
        await client.post(
            "/api/v1/interactions",
            json={"channel": channel, "queue_id": str(queue), "customer_ref": customer["phones"][0]["number"]},
            headers=ctx.headers,
        )
    note = await client.post(f"{BASE}/{customer['id']}/notes", json={"body": "Prefers e-mail"}, headers=ctx.headers)
    assert note.status_code == 201
    assert note.json()["author_id"] == str(ctx.owner_id)
    await factory.ticket(ctx, customer_id=customer["id"], subject="Invoice wrong")
    history = (await client.get(f"{BASE}/{customer['id']}/history", headers=ctx.headers)).json()["items"]
    assert [h["kind"] for h in history] == ["ticket", "note", "interaction", "interaction"]
    assert [h["channel"] for h in history[2:]] == ["wechat", "voice"]
    assert history[0]["text"] == "Invoice wrong" and history[0]["ticket_number"] >= 1
    first = (await client.get(f"{BASE}/{customer['id']}/history", params={"limit": 3}, headers=ctx.headers)).json()
    second = (
        await client.get(
            f"{BASE}/{customer['id']}/history", params={"limit": 3, "cursor": first["next_cursor"]}, headers=ctx.headers
        )
    ).json()
    assert [h["id"] for h in first["items"] + second["items"]] == [h["id"] for h in history]


async def test_merge_keeps_both_histories_and_is_audited(client, factory, sessionmaker):
    ctx = await factory.tenant()
    target = await factory.customer(ctx, tags=["vip"], external_ids=["CRM-T"])
    source = await factory.customer(ctx, tags=["late-payer"], emails=["dup@example.com"])
    queue = await factory.queue(ctx)
    await client.post(
        "/api/v1/interactions",
        json={"channel": "voice", "queue_id": str(queue), "customer_ref": source["id"]},
        headers=ctx.headers,
    )
    await client.post(f"{BASE}/{source['id']}/notes", json={"body": "source note"}, headers=ctx.headers)
    await client.post(f"{BASE}/{target['id']}/notes", json={"body": "target note"}, headers=ctx.headers)
    stale = await client.post(
        f"{BASE}/{target['id']}/merge",
        json={"source_id": source["id"], "source_version": 7},
        headers={**ctx.headers, "If-Match": target["etag"]},
    )
    assert stale.status_code == 412
    merged = await client.post(
        f"{BASE}/{target['id']}/merge",
        json={"source_id": source["id"], "source_version": 1},
        headers={**ctx.headers, "If-Match": target["etag"]},
    )
    assert merged.status_code == 200, merged.text
    body = merged.json()
    assert body["version"] == 2
    assert set(body["tags"]) == {"vip", "late-payer"}
    assert len(body["phones"]) == 2 and body["emails"] == ["dup@example.com"]
    history = (await client.get(f"{BASE}/{target['id']}/history", headers=ctx.headers)).json()["items"]
    assert sorted(h["kind"] for h in history) == ["interaction", "note", "note"]
    old = (await client.get(f"{BASE}/{source['id']}", headers=ctx.headers)).json()
    assert old["merged_into_id"] == target["id"]
    assert source["id"] not in {
        c["id"] for c in (await client.get(BASE, params={"limit": 200}, headers=ctx.headers)).json()["items"]
    }
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        entry = await session.scalar(
            select(AuditEntry).where(AuditEntry.action == "customer.merge", AuditEntry.target_id == target["id"])
        )
    assert entry is not None
    assert entry.before["source"]["id"] == source["id"]
    assert entry.after["moved"] == {"notes": 1, "tickets": 0, "interactions": 1}


async def test_settings_region_changes_how_local_numbers_read(client, factory):
    ctx = await factory.tenant(time_zone="UTC")
    assert (await client.get("/api/v1/customer-store/settings", headers=ctx.headers)).json()["effective_region"] is None
    local = await factory.customer(ctx, phones=["01 42 68 53 00"])
    assert local["phones"][0]["valid"] is False
    changed = await client.put("/api/v1/customer-store/settings", json={"default_region": "FR"}, headers=ctx.headers)
    assert changed.json()["effective_region"] == "FR"
    again = await factory.customer(ctx, phones=["01 42 68 53 00"])
    assert again["phones"][0]["number"] == "+33142685300"
    bad = await client.put("/api/v1/customer-store/settings", json={"default_region": "XX"}, headers=ctx.headers)
    assert bad.status_code == 422


async def test_external_ids_are_unique_per_tenant(client, factory):
    ctx = await factory.tenant()
    await factory.customer(ctx, external_ids=["CRM-9"])
    clash = await client.post(BASE, json={"name": "Other", "external_ids": ["CRM-9"]}, headers=ctx.headers)
    assert clash.status_code == 409
    other_tenant = await factory.tenant()
    assert (await factory.customer(other_tenant, external_ids=["CRM-9"]))["external_ids"] == ["CRM-9"]


async def test_delete_needs_the_version_and_permission(client, factory):
    ctx = await factory.tenant()
    created = await factory.customer(ctx)
    supervisor = await factory.user(ctx, role="supervisor", login=True)
    path = f"{BASE}/{created['id']}"
    assert (await client.delete(path, headers={**supervisor["headers"], "If-Match": '"1"'})).status_code == 403
    assert (await client.delete(path, headers={**ctx.headers, "If-Match": '"9"'})).status_code == 412
    assert (await client.delete(path, headers={**ctx.headers, "If-Match": '"1"'})).status_code == 204
    assert (await client.get(path, headers=ctx.headers)).status_code == 404
