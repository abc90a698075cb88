"""Sign-in, tokens, sessions and revocation end to end (OWASP ASVS 5.0 ids in each docstring)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import timedelta

import pyotp
import pytest
from sqlalchemy import text, update

from backend.auth.models import RefreshToken
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.lib.redis_keys import global_key
from tests.factories import PASSWORD, unique
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration


async def _login(client, slug, email, password=PASSWORD, **extra):
    return await client.post(
        "/api/v1/auth/login", json={"workspace": slug, "email": email, "password": password, **extra}
    )


async def test_failures_look_the_same(client, factory):
    """V6.3.x: unknown workspace, unknown e-mail and wrong password give one and the same answer."""
    ctx = await factory.tenant(login=False)
    answers = [
        await _login(client, "no-such-workspace", ctx.owner_email),
        await _login(client, ctx.slug, "nobody@x.test"),
        await _login(client, ctx.slug, ctx.owner_email, "Wrong-Password-123456"),
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.json()["detail"] for r in answers}) == 1
    assert all(r.headers["content-type"].startswith("application/problem+json") for r in answers)


async def test_password_hash_is_argon2id(factory, sessionmaker):
    """V6.2.x / V11.4.2: passwords are stored as argon2id hashes only."""
    ctx = await factory.tenant(login=False)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        stored = await session.scalar(text("SELECT password_hash FROM users WHERE id = :u"), {"u": ctx.owner_id})
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


async def test_account_throttle_gives_429_with_retry_after(client, factory, redis):
    """V6.3.1: more than 10 failures for one account in 15 minutes gives 429 with Retry-After."""
    ctx = await factory.tenant(login=False)
    for _ in range(10):
        assert (await _login(client, ctx.slug, ctx.owner_email, "Wrong-Password-123456")).status_code == 401
    blocked = await _login(client, ctx.slug, ctx.owner_email)  # even the right password
    assert blocked.status_code == 429
    assert 1 <= int(blocked.headers["retry-after"]) <= 900
    await redis.delete(global_key("loginfail", "addr", "127.0.0.1"))


async def test_address_throttle_gives_429(client, factory, redis):
    """V6.3.1: 30 failures from one address within a minute gives 429, whichever accounts they aim at."""
    ctx = await factory.tenant(login=False)
    await redis.delete(global_key("loginfail", "addr", "127.0.0.1"))
    for index in range(30):
        response = await _login(client, ctx.slug, f"someone{index}@x.test", "Wrong-Password-123456")
        assert response.status_code == 401
    blocked = await _login(client, ctx.slug, ctx.owner_email)
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) <= 60
    await redis.delete(global_key("loginfail", "addr", "127.0.0.1"))


def _forge(token: str, **changes) -> str:
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    encoded = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    return f"{header}.{encoded}.{signature}"


async def test_bad_tokens_are_refused(client, factory):
    """V9.1.1/V9.1.2: forged, alg:none, expired and wrong-audience tokens are refused with 401."""
    ctx = await factory.tenant()
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').decode().rstrip("=")
    payload = ctx.token.split(".")[1]
    candidates = {
        "forged": _forge(ctx.token, perms=["users:read", "owners:manage"]),
        "alg none": f"{none_header}.{payload}.",
        "expired": _forge(ctx.token, exp=int(time.time()) - 10),
        "garbage": "not-a-token",
    }
    for label, token in candidates.items():
        response = await client.get("/api/v1/users", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, label
    provider = await factory.provider_token()
    assert (await client.get("/api/v1/users", headers={"Authorization": f"Bearer {provider}"})).status_code == 401
    assert (await client.get("/api/v1/ops/tenants", headers=ctx.headers)).status_code == 401


async def test_access_token_lifetime(client, factory):
    """V7.3.x: access tokens live at most 15 minutes."""
    ctx = await factory.tenant(login=False)
    body = (await _login(client, ctx.slug, ctx.owner_email)).json()
    assert body["expires_in"] <= 900


async def test_refresh_rotates_and_reuse_ends_the_session(client, factory, sessionmaker):
    """V7.2.4 / V9.x: a refresh token works once; presenting it again revokes its whole family at once."""
    ctx = await factory.tenant()
    first = (await client.post("/api/v1/auth/refresh", json={"refresh_token": ctx.refresh_token})).json()
    assert first["refresh_token"] != ctx.refresh_token
    new_headers = {"Authorization": f"Bearer {first['access_token']}"}
    assert (await client.get("/api/v1/auth/me", headers=new_headers)).status_code == 200
    replay = await client.post("/api/v1/auth/refresh", json={"refresh_token": ctx.refresh_token})
    assert replay.status_code == 401
    # The whole family is gone: the newer refresh token and the live access token too.
    assert (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": first["refresh_token"]})
    ).status_code == 401
    assert (await client.get("/api/v1/auth/me", headers=new_headers)).status_code == 401
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        hashes = (
            await session.scalars(text("SELECT token_hash FROM refresh_tokens WHERE user_id = :u"), {"u": ctx.owner_id})
        ).all()
    secret = ctx.refresh_token.split(".", 1)[1]
    assert hashes
    assert all(secret not in h for h in hashes)
    audit = (
        await client.get("/api/v1/audit", params={"action": "auth.refresh_reuse"}, headers=(await _fresh(factory, ctx)))
    ).json()
    assert audit["items"]


async def _fresh(factory, ctx):
    token, _ = await factory.login(ctx.slug, ctx.owner_email)
    return {"Authorization": f"Bearer {token}"}


async def test_idle_and_absolute_session_limits(client, factory, sessionmaker):
    """V7.3.1/V7.3.2: a refresh token unused past the idle timeout, or a session past its absolute limit, ends."""
    ctx = await factory.tenant()
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await session.execute(update(RefreshToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": ctx.refresh_token})).status_code == 401
    other = await factory.tenant()
    async with tenant_transaction(sessionmaker, other.tenant_id) as session:
        await session.execute(update(RefreshToken).values(session_started_at=utcnow() - timedelta(days=2)))
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": other.refresh_token})).status_code == 401


async def test_logout_ends_the_session_now(client, factory):
    """V7.4.1: after logout neither the access token nor the refresh token works."""
    ctx = await factory.tenant()
    assert (await client.post("/api/v1/auth/logout", headers=ctx.headers)).status_code == 204
    assert (await client.get("/api/v1/auth/me", headers=ctx.headers)).status_code == 401
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": ctx.refresh_token})).status_code == 401


async def test_totp_enrolment_login_and_replay(client, factory):
    """V6.5.x: TOTP enrolment, a code required at sign-in, and no code accepted twice."""
    ctx = await factory.tenant()
    secret = (await client.post("/api/v1/auth/totp", headers=ctx.headers)).json()["secret"]
    totp = pyotp.TOTP(secret)
    assert (
        await client.post(
            "/api/v1/auth/totp/confirm",
            json={"code": "000000" if totp.now() != "000000" else "111111"},
            headers=ctx.headers,
        )
    ).status_code == 422
    confirmed = await client.post("/api/v1/auth/totp/confirm", json={"code": totp.now()}, headers=ctx.headers)
    assert confirmed.status_code == 200, confirmed.text
    missing = await _login(client, ctx.slug, ctx.owner_email)
    assert missing.status_code == 401
    assert missing.json()["type"].endswith("/totp-required")
    next_code = totp.at(int(time.time()) + totp.interval)
    assert (await _login(client, ctx.slug, ctx.owner_email, totp_code=next_code)).status_code == 200
    replay = await _login(client, ctx.slug, ctx.owner_email, totp_code=next_code)
    assert replay.status_code == 401


async def test_mandatory_mfa_restricts_until_enrolled(client, factory):
    """V6.5.x / V8.x: on a tenant requiring TOTP, an unenrolled user can only enrol."""
    ctx = await factory.tenant()
    assert (await client.patch("/api/v1/tenant", json={"require_mfa": True}, headers=ctx.headers)).status_code == 200
    agent = await factory.user(ctx, role="admin")
    body = (await _login(client, ctx.slug, agent["email"])).json()
    assert body["mfa_enrolment_required"] is True
    headers = {"Authorization": f"Bearer {body['access_token']}"}
    denied = await client.get("/api/v1/users", headers=headers)
    assert denied.status_code == 403
    assert denied.json()["type"].endswith("/mfa-enrolment-required")
    secret = (await client.post("/api/v1/auth/totp", headers=headers)).json()["secret"]
    full = (
        await client.post("/api/v1/auth/totp/confirm", json={"code": pyotp.TOTP(secret).now()}, headers=headers)
    ).json()
    assert (
        await client.get("/api/v1/users", headers={"Authorization": f"Bearer {full['access_token']}"})
    ).status_code == 200


async def test_password_reset_flow(client, factory, sessionmaker):
    """V6.4.x: same answer for unknown accounts, single-use mailed token, old password and sessions die."""
    ctx = await factory.tenant()
    key = await factory.api_key(ctx)
    unknown = await client.post("/api/v1/auth/password-reset", json={"workspace": ctx.slug, "email": "nobody@x.test"})
    known = await client.post("/api/v1/auth/password-reset", json={"workspace": ctx.slug, "email": ctx.owner_email})
    assert unknown.status_code == known.status_code == 202
    assert unknown.json() == known.json()
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        body = await session.scalar(
            text("SELECT body FROM mail_outbox WHERE kind = 'password_reset' ORDER BY created_at DESC LIMIT 1")
        )
    token = body.split("token=")[1].strip()
    weak = await client.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": "password123"})
    assert weak.status_code == 422
    assert weak.json()["errors"][0]["field"] == "password"
    new_password = "Another-Long-Passphrase-93"
    assert (
        await client.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": new_password})
    ).status_code == 204
    assert (
        await client.post("/api/v1/auth/password-reset/confirm", json={"token": token, "password": new_password})
    ).status_code == 422
    assert (await _login(client, ctx.slug, ctx.owner_email)).status_code == 401
    assert (await _login(client, ctx.slug, ctx.owner_email, new_password)).status_code == 200
    assert (await client.get("/api/v1/auth/me", headers=ctx.headers)).status_code == 401
    assert (await client.get("/api/v1/users", headers={"X-API-Key": key["key"]})).status_code == 401


async def test_common_password_refused_at_signup(client):
    """V6.2.4/V6.2.12: breached or common passwords are refused, offline, from the shipped list."""
    slug = unique("s")
    response = await client.post(
        "/api/v1/signup",
        json={
            "company_name": "X",
            "slug": slug,
            "admin_email": f"a@{slug}.test",
            "admin_name": "A",
            "password": "iloveyou1234",
            "time_zone": "UTC",
        },
    )
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "password"


async def test_api_keys(client, factory, sessionmaker):
    """V8.x / V9.x: shown once, hashed, scoped, capped by the creator's rights, revocable at once, last use recorded."""
    ctx = await factory.tenant()
    created = await factory.api_key(ctx, scopes=["users:read"])
    key, prefix = created["key"], created["api_key"]["prefix"]
    listing = (await client.get("/api/v1/api-keys", headers=ctx.headers)).text
    assert prefix in listing
    assert key.split("_", 2)[2] not in listing
    assert (await client.get("/api/v1/users", headers={"Authorization": f"Bearer {key}"})).status_code == 200
    assert (await client.get("/api/v1/users", headers={"X-API-Key": key})).status_code == 200
    assert (await client.post("/api/v1/teams", json={"name": "x"}, headers={"X-API-Key": key})).status_code == 403
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        row = (
            await session.execute(
                text("SELECT secret_hash, last_used_at FROM api_keys WHERE prefix = :p"), {"p": prefix}
            )
        ).one()
    assert key.split("_", 2)[2] not in row.secret_hash
    assert row.last_used_at is not None
    agent = await factory.user(ctx, login=True)
    beyond = await client.post(
        "/api/v1/api-keys", json={"name": "k", "scopes": ["users:write"]}, headers=agent["headers"]
    )
    assert beyond.status_code == 403
    assert (await client.delete(f"/api/v1/api-keys/{created['api_key']['id']}", headers=ctx.headers)).status_code == 204
    assert (await client.get("/api/v1/users", headers={"X-API-Key": key})).status_code == 401


async def test_deactivation_revokes_everything_and_closes_websockets(client, factory, app):
    """V7.4.2 / V8.x: disabling a user kills their tokens, refresh tokens, keys and open WebSockets at once."""
    ctx = await factory.tenant()
    admin = await factory.user(ctx, role="admin", login=True)
    key = (
        await client.post("/api/v1/api-keys", json={"name": "k", "scopes": ["users:read"]}, headers=admin["headers"])
    ).json()["key"]
    ticket = (await client.post("/api/v1/auth/ws-ticket", headers=admin["headers"])).json()["ticket"]
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        await socket.receive_json()
        started = time.monotonic()
        response = await client.post(f"/api/v1/users/{admin['id']}/deactivate", headers=ctx.headers)
        assert response.status_code == 200, response.text
        assert (await socket.receive_json()) == {"type": "revoked"}
        closing = await socket.receive_message()
        assert closing["type"] == "websocket.close"
        assert closing["code"] == 4401
        assert time.monotonic() - started < 5
    assert (await client.get("/api/v1/auth/me", headers=admin["headers"])).status_code == 401
    assert (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": admin["refresh_token"]})
    ).status_code == 401
    assert (await client.get("/api/v1/users", headers={"X-API-Key": key})).status_code == 401
    assert (await _login(client, ctx.slug, admin["email"])).status_code == 401
    # A WebSocket ticket is single use.
    async with websocket_connect(app, "/api/v1/agent/ws", query=f"ticket={ticket}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.close"


async def test_role_change_revokes_tokens(client, factory):
    """V8.x: a new role takes effect at once: tokens carrying the old rights are refused."""
    ctx = await factory.tenant()
    admin = await factory.user(ctx, role="admin", login=True)
    roles = (await client.get("/api/v1/roles", headers=ctx.headers)).json()
    agent_role = next(r["id"] for r in roles if r["name"] == "agent")
    assert (
        await client.patch(f"/api/v1/users/{admin['id']}", json={"role_id": agent_role}, headers=ctx.headers)
    ).status_code == 200
    assert (await client.get("/api/v1/auth/me", headers=admin["headers"])).status_code == 401
    token, _ = await factory.login(ctx.slug, admin["email"])
    again = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/api/v1/audit", headers=again)).status_code == 403


async def test_missed_revocation_message_still_closes_the_socket(factory, app, sessionmaker):
    """V7.4.2: without the pub/sub message, the periodic re-check closes a revoked user's socket."""
    from dataclasses import replace

    from backend.routing.hub import AgentHub

    ctx = await factory.tenant()
    admin = await factory.user(ctx, role="admin", login=True)
    authenticator = app.state.authenticator
    quick = AgentHub(authenticator, app.state.redis, recheck_seconds=1)  # no listener started: messages are missed
    principal = await authenticator.tenant_bearer(admin["token"])
    sent: list[dict] = []
    closed = asyncio.Event()

    class FakeSocket:
        async def send_json(self, data):
            sent.append(data)

        async def receive_json(self):
            await asyncio.sleep(3600)

        async def close(self, code=1000, reason=""):
            sent.append({"closed": code})
            closed.set()

    serving = asyncio.create_task(quick.serve(FakeSocket(), replace(principal)))
    await asyncio.sleep(0.1)
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        await session.execute(
            text("UPDATE users SET status = 'disabled', tokens_revoked_at = now() WHERE id = :u"), {"u": admin["id"]}
        )
    await app.state.redis.delete(f"cc:{{t:{ctx.tenant_id}}}:auth:user:{admin['id']}")
    await asyncio.wait_for(closed.wait(), 5)
    await serving
    assert {"closed": 4401} in sent


async def test_suspended_tenant_reads_only_its_status(client, factory):
    """V8.x: a suspended tenant's users and keys get 403 on everything but their tenant's status; audited both sides."""
    ctx = await factory.tenant()
    key = await factory.api_key(ctx)
    ops = {"Authorization": f"Bearer {await factory.provider_token()}"}
    assert (
        await client.post(f"/api/v1/ops/tenants/{ctx.tenant_id}/suspend", json={"reason": "unpaid"}, headers=ops)
    ).status_code == 200
    denied = await client.get("/api/v1/users", headers=ctx.headers)
    assert denied.status_code == 403
    assert denied.json()["type"].endswith("/tenant-suspended")
    assert (await client.get("/api/v1/users", headers={"X-API-Key": key["key"]})).status_code == 403
    status = await client.get("/api/v1/tenant", headers=ctx.headers)
    assert status.status_code == 200
    assert status.json()["status"] == "suspended"
    assert (
        await client.post(f"/api/v1/ops/tenants/{ctx.tenant_id}/reactivate", json={"reason": "paid"}, headers=ops)
    ).status_code == 200
    assert (await client.get("/api/v1/users", headers=ctx.headers)).status_code == 200
    ops_audit = (await client.get("/api/v1/ops/audit", headers=ops)).json()["items"]
    assert {e["action"] for e in ops_audit if e["target_tenant_id"] == str(ctx.tenant_id)} >= {
        "tenant.suspend",
        "tenant.reactivate",
    }
    own = (await client.get("/api/v1/audit", params={"action": "tenant."}, headers=ctx.headers)).json()["items"]
    assert {e["action"] for e in own} >= {"tenant.suspend", "tenant.reactivate"}


async def test_login_is_audited(client, factory):
    """V16.x: sign-ins and failed sign-ins land in the audit log."""
    ctx = await factory.tenant()
    await _login(client, ctx.slug, ctx.owner_email, "Wrong-Password-123456")
    entries = (await client.get("/api/v1/audit", params={"action": "auth.login"}, headers=ctx.headers)).json()["items"]
    assert {"auth.login", "auth.login_failed"} <= {e["action"] for e in entries}
