"""Per-tenant OpenID Connect single sign-on, end to end against a local provider (OWASP ASVS 5.0 V10)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.support.oidc_provider import OidcProvider, RunningProvider

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idp() -> Iterator[OidcProvider]:
    with RunningProvider() as provider:
        yield provider


async def _configure(client, ctx, idp, **extra):
    body = {"issuer": idp.url, "client_id": idp.client_id, "client_secret": idp.client_secret, **extra}
    response = await client.put("/api/v1/sso", json=body, headers=ctx.headers)
    assert response.status_code == 200, response.text
    return response.json()


async def _round_trip(client, slug):
    """Play the browser: our login route, the IdP's authorize endpoint, our callback."""
    start = await client.get(f"/api/v1/auth/sso/{slug}/login")
    assert start.status_code == 302, start.text
    location = start.headers["location"]
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"]
    assert query["nonce"] and query["state"]
    async with httpx.AsyncClient() as browser:
        at_idp = await browser.get(location)
    assert at_idp.status_code == 302, at_idp.text
    back = urlsplit(at_idp.headers["location"])
    return await client.get(f"{back.path}?{back.query}"), query["state"][0], back


async def test_sign_in_through_the_tenants_idp(client, factory, idp):
    """V10.1.x / V10.4.x: code flow with PKCE, state and nonce; our own tokens come back; audited."""
    ctx = await factory.tenant()
    status = await _configure(client, ctx, idp)
    assert status["configured"] is True
    assert "client_secret" not in str(status)
    assert idp.client_secret not in str(status)
    idp.user = {"sub": "abc", "email": ctx.owner_email, "email_verified": True}
    response, _, _ = await _round_trip(client, ctx.slug)
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["email"] == ctx.owner_email
    audit = (await client.get("/api/v1/audit", params={"action": "auth.login"}, headers=ctx.headers)).json()["items"]
    assert any(e["after"] == {"method": "sso"} for e in audit)
    configured = (await client.get("/api/v1/audit", params={"action": "sso."}, headers=ctx.headers)).json()["items"]
    assert configured
    assert idp.client_secret not in str(configured)


async def test_state_is_single_use(client, factory, idp):
    """V10.2.x: replaying the callback (same state) is refused."""
    ctx = await factory.tenant()
    await _configure(client, ctx, idp)
    idp.user = {"sub": "abc", "email": ctx.owner_email, "email_verified": True}
    first, _, back = await _round_trip(client, ctx.slug)
    assert first.status_code == 200
    replay = await client.get(f"{back.path}?{back.query}")
    assert replay.status_code == 422
    assert replay.json()["errors"][0]["field"] == "state"


@pytest.mark.parametrize(
    ("tamper", "label"),
    [
        ({"nonce": "someone-elses-nonce"}, "nonce"),
        ({"aud": "another-client"}, "aud"),
        ({"iss": "https://evil.test"}, "iss"),
    ],
)
async def test_tampered_id_tokens_are_refused(client, factory, idp, tamper, label):
    """V10.5.x: the ID token's nonce, audience and issuer must be ours."""
    ctx = await factory.tenant()
    await _configure(client, ctx, idp)
    idp.user = {"sub": "abc", "email": ctx.owner_email, "email_verified": True}
    idp.tamper = dict(tamper)
    response, _, _ = await _round_trip(client, ctx.slug)
    assert response.status_code == 401, (label, response.text)


async def test_unknown_users_are_refused_or_provisioned(client, factory, idp):
    """V10.x / V8.x: an IdP user unknown to the workspace gets in only where auto-provisioning is on, as an agent."""
    ctx = await factory.tenant()
    await _configure(client, ctx, idp)
    idp.user = {"sub": "new", "email": f"newcomer@{ctx.slug}.test", "email_verified": True, "name": "New Comer"}
    refused, _, _ = await _round_trip(client, ctx.slug)
    assert refused.status_code == 403
    await _configure(client, ctx, idp, auto_provision=True)
    allowed, _, _ = await _round_trip(client, ctx.slug)
    assert allowed.status_code == 200, allowed.text
    me = (
        await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {allowed.json()['access_token']}"})
    ).json()
    assert me["role"] == "agent"
    assert me["email"] == f"newcomer@{ctx.slug}.test"


async def test_unverified_email_and_disabled_users_are_refused(client, factory, idp):
    ctx = await factory.tenant()
    await _configure(client, ctx, idp)
    user = await factory.user(ctx)
    idp.user = {"sub": "x", "email": user["email"], "email_verified": False}
    assert (await _round_trip(client, ctx.slug))[0].status_code == 403
    await client.post(f"/api/v1/users/{user['id']}/deactivate", headers=ctx.headers)
    idp.user = {"sub": "x", "email": user["email"], "email_verified": True}
    assert (await _round_trip(client, ctx.slug))[0].status_code == 403


async def test_idp_failure_is_a_clear_502(client, factory, idp):
    ctx = await factory.tenant()
    await _configure(client, ctx, idp)
    idp.user = {"sub": "x", "email": ctx.owner_email, "email_verified": True}
    idp.fail_token_endpoint = True
    try:
        response, _, _ = await _round_trip(client, ctx.slug)
    finally:
        idp.fail_token_endpoint = False
    assert response.status_code == 502
    assert response.json()["type"].endswith("/idp-error")


async def test_configuration_is_per_tenant_and_validated(client, factory, idp):
    a = await factory.tenant()
    b = await factory.tenant()
    await _configure(client, a, idp)
    other = (await client.get("/api/v1/sso", headers=b.headers)).json()
    assert other == {"configured": False, "config": None}
    assert (await client.get(f"/api/v1/auth/sso/{b.slug}/login")).status_code == 404
    bad = await client.put(
        "/api/v1/sso", json={"issuer": "ftp://idp.test", "client_id": "x", "client_secret": "y"}, headers=a.headers
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "issuer"
    agent = await factory.user(a, login=True)
    assert (await client.get("/api/v1/sso", headers=agent["headers"])).status_code == 403
    assert (await client.delete("/api/v1/sso", headers=a.headers)).status_code == 204
    assert (await client.get(f"/api/v1/auth/sso/{a.slug}/login")).status_code == 404
