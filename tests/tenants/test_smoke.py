"""A first pass over the main flows."""

import pytest

pytestmark = pytest.mark.integration


async def test_signup_login_and_me(client, factory):
    ctx = await factory.tenant()
    response = await client.get("/api/v1/auth/me", headers=ctx.headers)
    assert response.status_code == 200, response.text
    assert response.json()["email"] == ctx.owner_email
    response = await client.get("/api/v1/users", headers=ctx.headers)
    assert response.status_code == 200, response.text
    assert [u["email"] for u in response.json()["items"]] == [ctx.owner_email]
