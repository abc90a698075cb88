"""Tenants, users, roles, teams and seats through the API and the services."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from sqlalchemy import select, text

from backend.db.engine import tenant_transaction
from backend.tenants import service
from backend.tenants.models import Tenant
from backend.tenants.schemas import SignupRequest
from tests.factories import PASSWORD, unique

pytestmark = pytest.mark.integration


def _signup_body(slug: str, **changes):
    body = {
        "company_name": "北京客服中心 Ltd",
        "slug": slug,
        "admin_email": f"boss@{slug}.test",
        "admin_name": "Zhang Wei",
        "password": PASSWORD,
        "time_zone": "Asia/Shanghai",
        "plan": "team",
    }
    body.update(changes)
    return body


async def test_signup_creates_everything_in_one_go(client, sessionmaker, settings_obj):
    slug = unique("s")
    response = await client.post("/api/v1/signup", json=_signup_body(slug))
    assert response.status_code == 201, response.text
    tenant = response.json()["tenant"]
    assert tenant["status"] == "trial"
    assert tenant["sip_domain"] == f"{slug}.{settings_obj.provider_sip_domain}"
    assert tenant["name"] == "北京客服中心 Ltd"
    async with tenant_transaction(sessionmaker, tenant["id"]) as session:
        roles = set((await session.scalars(text("SELECT name FROM roles"))).all())
        mails = (await session.scalars(text("SELECT kind FROM mail_outbox"))).all()
        audit = (await session.scalars(text("SELECT action FROM audit_log"))).all()
    assert roles == {"owner", "admin", "supervisor", "agent"}
    assert mails == ["verify_email"]
    assert "tenant.signup" in audit


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"slug": "Bad Slug"}, "slug"),
        ({"slug": "ab"}, "slug"),
        ({"slug": "admin"}, "slug"),
        ({"time_zone": "Europe/Atlantis"}, "time_zone"),
        ({"admin_email": "not-an-email"}, "admin_email"),
        ({"plan": "platinum"}, "plan"),
        ({"password": "short"}, "password"),
        ({"company_name": "Evil\u202eCorp"}, "company_name"),
        ({"company_name": "   "}, "company_name"),
    ],
)
async def test_signup_rejects_bad_fields_and_leaves_nothing(client, sessionmaker, changes, field):
    body = _signup_body(unique("s"))
    body.update(changes)
    response = await client.post("/api/v1/signup", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert field in str(response.json())
    async with sessionmaker() as session:
        assert await session.scalar(select(Tenant.id).where(Tenant.slug == body["slug"])) is None


async def test_duplicate_slug_is_a_conflict(client):
    slug = unique("s")
    assert (await client.post("/api/v1/signup", json=_signup_body(slug))).status_code == 201
    again = await client.post("/api/v1/signup", json=_signup_body(slug, admin_email=f"x@{slug}.test"))
    assert again.status_code == 409
    assert again.json()["errors"][0]["field"] == "slug"


async def test_signup_failing_late_leaves_nothing(sessionmaker, settings_obj, monkeypatch):
    """The tenant row written first is rolled back when a later step fails: one transaction."""
    slug = unique("s")

    async def broken(*args, **kwargs):
        raise RuntimeError("mail server on fire")

    monkeypatch.setattr(service, "queue_mail", broken)
    with pytest.raises(RuntimeError):
        async with sessionmaker() as session, session.begin():
            await service.signup(session, SignupRequest(**_signup_body(slug)), settings_obj)
    async with sessionmaker() as session:
        assert await session.scalar(select(Tenant.id).where(Tenant.slug == slug)) is None


async def test_invite_accept_and_email_uniqueness(client, factory, sessionmaker):
    ctx = await factory.tenant()
    roles = (await client.get("/api/v1/roles", headers=ctx.headers)).json()
    agent_role = next(r["id"] for r in roles if r["name"] == "agent")
    team = await factory.team(ctx)
    email = f"New.Person@{ctx.slug}.test"
    invited = await client.post(
        "/api/v1/users/invitations",
        json={"email": email, "name": "New Person", "role_id": agent_role, "team_ids": [str(team)]},
        headers=ctx.headers,
    )
    assert invited.status_code == 201, invited.text
    assert invited.json()["status"] == "invited"
    assert invited.json()["team_ids"] == [str(team)]
    duplicate = await client.post(
        "/api/v1/users/invitations",
        json={"email": email.lower(), "name": "Again", "role_id": agent_role},
        headers=ctx.headers,
    )
    assert duplicate.status_code == 409
    other = await factory.tenant()
    other_role = next(
        r["id"] for r in (await client.get("/api/v1/roles", headers=other.headers)).json() if r["name"] == "agent"
    )
    elsewhere = await client.post(
        "/api/v1/users/invitations",
        json={"email": email, "name": "Same mail", "role_id": other_role},
        headers=other.headers,
    )
    assert elsewhere.status_code == 201
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        body = await session.scalar(text("SELECT body FROM mail_outbox WHERE kind = 'invite'"))
    token = body.split("token=")[1].strip()
    accepted = await client.post(
        "/api/v1/auth/accept-invite", json={"token": token, "password": "Brand-New-Agent-Pass-1"}
    )
    assert accepted.status_code == 200, accepted.text
    me = (
        await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {accepted.json()['access_token']}"})
    ).json()
    assert me["email"].lower() == email.lower()
    assert me["role"] == "agent"
    again = await client.post("/api/v1/auth/accept-invite", json={"token": token, "password": "Brand-New-Agent-Pass-1"})
    assert again.status_code == 422


async def test_email_verification(client, factory, sessionmaker):
    ctx = await factory.tenant()
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        body = await session.scalar(text("SELECT body FROM mail_outbox WHERE kind = 'verify_email'"))
    token = body.split("token=")[1].strip()
    assert (await client.post("/api/v1/auth/verify-email", json={"token": token})).status_code == 204
    user = (await client.get(f"/api/v1/users/{ctx.owner_id}", headers=ctx.headers)).json()
    assert user["email_verified"] is True
    assert (await client.post("/api/v1/auth/verify-email", json={"token": token})).status_code == 422
    forged = f"{ctx.tenant_id.hex}.{'x' * 40}"
    assert (await client.post("/api/v1/auth/verify-email", json={"token": forged})).status_code == 422


async def test_users_pagination_sort_and_filters(client, factory):
    ctx = await factory.tenant()
    for _ in range(7):
        await factory.user(ctx)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, "sort": "email"}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/v1/users", params=params, headers=ctx.headers)).json()
        seen.extend(u["email"] for u in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 8
    assert seen == sorted(seen)
    newest = (await client.get("/api/v1/users", params={"sort": "-created_at", "limit": 1}, headers=ctx.headers)).json()
    assert newest["items"][0]["email"] != ctx.owner_email
    owners = (await client.get("/api/v1/users", params={"q": "owner@"}, headers=ctx.headers)).json()["items"]
    assert [u["email"] for u in owners] == [ctx.owner_email]
    for params, field in (
        ({"sort": "password_hash"}, "sort"),
        ({"limit": 1000}, "limit"),
        ({"cursor": "garbage!"}, "cursor"),
    ):
        bad = await client.get("/api/v1/users", params=params, headers=ctx.headers)
        assert bad.status_code in (400, 422), bad.text
        assert field in str(bad.json())


async def test_last_owner_stays(client, factory):
    ctx = await factory.tenant()
    roles = {r["name"]: r["id"] for r in (await client.get("/api/v1/roles", headers=ctx.headers)).json()}
    demote = await client.patch(f"/api/v1/users/{ctx.owner_id}", json={"role_id": roles["admin"]}, headers=ctx.headers)
    assert demote.status_code == 409
    deactivate = await client.post(f"/api/v1/users/{ctx.owner_id}/deactivate", headers=ctx.headers)
    assert deactivate.status_code == 409
    admin = await factory.user(ctx, role="admin", login=True)
    promote = await client.patch(
        f"/api/v1/users/{admin['id']}", json={"role_id": roles["owner"]}, headers=admin["headers"]
    )
    assert promote.status_code == 403
    demote_owner = await client.patch(
        f"/api/v1/users/{ctx.owner_id}", json={"name": "Renamed"}, headers=admin["headers"]
    )
    assert demote_owner.status_code == 200


async def test_two_owners_demoted_at_once_leave_one(client, factory):
    ctx = await factory.tenant()
    roles = {r["name"]: r["id"] for r in (await client.get("/api/v1/roles", headers=ctx.headers)).json()}
    second = await factory.user(ctx, role="owner", login=True)
    responses = await asyncio.gather(
        client.patch(f"/api/v1/users/{ctx.owner_id}", json={"role_id": roles["admin"]}, headers=second["headers"]),
        client.patch(f"/api/v1/users/{second['id']}", json={"role_id": roles["admin"]}, headers=ctx.headers),
    )
    assert sorted(r.status_code for r in responses) in ([200, 409], [200, 401])
    fresh, _ = await factory.login(ctx.slug, ctx.owner_email)
    users = (
        await client.get(
            "/api/v1/users", params={"role_id": roles["owner"]}, headers={"Authorization": f"Bearer {fresh}"}
        )
    ).json()
    if not users["items"]:
        token, _ = await factory.login(ctx.slug, second["email"])
        users = (
            await client.get(
                "/api/v1/users", params={"role_id": roles["owner"]}, headers={"Authorization": f"Bearer {token}"}
            )
        ).json()
    assert len(users["items"]) == 1


async def test_roles_and_permissions(client, factory):
    ctx = await factory.tenant()
    roles = {r["name"]: r for r in (await client.get("/api/v1/roles", headers=ctx.headers)).json()}
    assert (
        await client.patch(f"/api/v1/roles/{roles['agent']['id']}", json={"description": "x"}, headers=ctx.headers)
    ).status_code == 409
    assert (await client.delete(f"/api/v1/roles/{roles['agent']['id']}", headers=ctx.headers)).status_code == 409
    unknown = await client.post(
        "/api/v1/roles", json={"name": "x", "permissions": ["rockets:launch"]}, headers=ctx.headers
    )
    assert unknown.status_code == 422
    custom = await factory.role(ctx, ["users:read", "teams:read"])
    holder = await factory.user(ctx, role="agent", login=True)
    await client.patch(f"/api/v1/users/{holder['id']}", json={"role_id": str(custom)}, headers=ctx.headers)
    token, _ = await factory.login(ctx.slug, holder["email"])
    headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/teams", headers=headers)).status_code == 200
    changed = await client.patch(f"/api/v1/roles/{custom}", json={"permissions": ["users:read"]}, headers=ctx.headers)
    assert changed.status_code == 200
    assert (await client.get("/api/v1/teams", headers=headers)).status_code == 401  # rights changed: token revoked
    assert (await client.delete(f"/api/v1/roles/{custom}", headers=ctx.headers)).status_code == 409  # still held
    limited = await factory.role(ctx, ["roles:write", "roles:read"])
    maker = await factory.user(ctx, role="agent")
    await client.patch(f"/api/v1/users/{maker['id']}", json={"role_id": str(limited)}, headers=ctx.headers)
    maker_token, _ = await factory.login(ctx.slug, maker["email"])
    escalate = await client.post(
        "/api/v1/roles",
        json={"name": "root", "permissions": ["audit:read"]},
        headers={"Authorization": f"Bearer {maker_token}"},
    )
    assert escalate.status_code == 403


async def test_agent_is_refused_admin_routes(client, factory):
    ctx = await factory.tenant()
    agent = await factory.user(ctx, login=True)
    for method, path, body in (
        ("POST", "/api/v1/teams", {"name": "x"}),
        ("POST", "/api/v1/roles", {"name": "x", "permissions": ["users:read"]}),
        ("POST", "/api/v1/seats", {"user_id": str(agent["id"])}),
        ("GET", "/api/v1/audit", None),
        ("PATCH", "/api/v1/tenant", {"name": "x"}),
    ):
        response = await client.request(method, path, json=body, headers=agent["headers"])
        assert response.status_code == 403, f"{method} {path}"


async def test_teams_membership(client, factory):
    ctx = await factory.tenant()
    team = await factory.team(ctx)
    user = await factory.user(ctx)
    for _ in range(2):
        added = await client.put(f"/api/v1/teams/{team}/members/{user['id']}", headers=ctx.headers)
        assert added.status_code == 200
        assert added.json()["member_ids"] == [str(user["id"])]
    assert (await client.get(f"/api/v1/users/{user['id']}", headers=ctx.headers)).json()["team_ids"] == [str(team)]
    removed = await client.delete(f"/api/v1/teams/{team}/members/{user['id']}", headers=ctx.headers)
    assert removed.json()["member_ids"] == []


async def test_seat_credentials_store_only_the_a1_hash(client, factory, sessionmaker):
    ctx = await factory.tenant()
    user = await factory.user(ctx)
    created = await client.post("/api/v1/seats", json={"user_id": str(user["id"])}, headers=ctx.headers)
    assert created.status_code == 201
    body = created.json()
    username, domain, password = body["seat"]["sip_username"], body["seat"]["sip_domain"], body["sip_password"]
    assert body["sip_uri"] == f"sip:{username}@{domain}"
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        row = (
            (await session.execute(text("SELECT * FROM seats WHERE id = :i"), {"i": body["seat"]["id"]}))
            .mappings()
            .one()
        )
    assert row["sip_a1_hash"] == hashlib.md5(f"{username}:{domain}:{password}".encode()).hexdigest()
    assert password not in str(dict(row))
    rotated = (await client.post(f"/api/v1/seats/{body['seat']['id']}/rotate-credentials", headers=ctx.headers)).json()
    assert rotated["sip_password"] != password
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        new_hash = await session.scalar(text("SELECT sip_a1_hash FROM seats WHERE id = :i"), {"i": body["seat"]["id"]})
    assert new_hash == hashlib.md5(f"{username}:{domain}:{rotated['sip_password']}".encode()).hexdigest()
    listed = (await client.get("/api/v1/seats", headers=ctx.headers)).text
    assert rotated["sip_password"] not in listed


async def test_seat_cap_holds_under_twenty_parallel_requests(client, factory, sessionmaker):
    """The trial plan has 5 seats: with 4 taken, 20 simultaneous requests for the last one give exactly one seat."""
    ctx = await factory.tenant(plan="trial")
    for _ in range(4):
        await factory.seat(ctx)
    users = [await factory.user(ctx) for _ in range(20)]
    responses = await asyncio.gather(
        *(client.post("/api/v1/seats", json={"user_id": str(u["id"])}, headers=ctx.headers) for u in users)
    )
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] + [409] * 19, codes
    assert all(r.json()["type"].endswith("/seat-cap-reached") for r in responses if r.status_code == 409)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        assert await session.scalar(text("SELECT count(*) FROM seats")) == 5
