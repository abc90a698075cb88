"""API conventions: problem+json for every kind of bad input, limits, health, metrics, request ids, OpenAPI."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def _is_problem(response, status=None):
    assert response.headers["content-type"].startswith(PROBLEM), response.text
    body = response.json()
    assert {"type", "title", "status", "detail"} <= set(body)
    if status is not None:
        assert response.status_code == status, response.text
        assert body["status"] == status
    return body


async def test_malformed_json(client, factory):
    ctx = await factory.tenant()
    response = await client.post(
        "/api/v1/teams", content=b'{"name": "x",', headers={**ctx.headers, "content-type": "application/json"}
    )
    _is_problem(response, 400)


async def test_wrong_types_unknown_fields_empty_and_oversized(client, factory):
    ctx = await factory.tenant()
    ops = {"Authorization": f"Bearer {await factory.provider_token()}"}
    wrong_type = await client.post(
        "/api/v1/ops/plans", json={"code": "x1", "name": "X", "seat_cap": "ten"}, headers=ops
    )
    assert "seat_cap" in str(_is_problem(wrong_type, 400)["errors"])
    unknown = await client.post("/api/v1/teams", json={"name": "x", "is_admin": True}, headers=ctx.headers)
    assert "is_admin" in str(_is_problem(unknown, 400))
    empty = await client.post("/api/v1/teams", json={"name": ""}, headers=ctx.headers)
    assert "name" in str(_is_problem(empty, 400)["errors"])
    oversized = await client.post("/api/v1/teams", json={"name": "x" * 10_000}, headers=ctx.headers)
    assert "name" in str(_is_problem(oversized, 400)["errors"])
    control = await client.post("/api/v1/teams", json={"name": "nul\x00byte"}, headers=ctx.headers)
    assert "name" in str(_is_problem(control, 422)["errors"])
    unicode_name = await client.post("/api/v1/teams", json={"name": "售后服务 🎧"}, headers=ctx.headers)
    assert unicode_name.status_code == 201
    bad_email = await client.post(
        "/api/v1/users/invitations",
        json={"email": "not-an-email@", "name": "X", "role_id": str(ctx.owner_id)},
        headers=ctx.headers,
    )
    assert "email" in str(_is_problem(bad_email, 422)["errors"])


async def test_body_limit(client, factory, settings_obj):
    ctx = await factory.tenant()
    too_big = b'{"name": "' + b"x" * (settings_obj.request_max_body_bytes + 10) + b'"}'
    response = await client.post(
        "/api/v1/teams", content=too_big, headers={**ctx.headers, "content-type": "application/json"}
    )
    _is_problem(response, 413)
    async with client.stream("GET", "/api/v1/teams", headers=ctx.headers) as listing:
        assert listing.status_code == 200  # nothing half-written either


async def test_non_uuid_ids_and_unknown_routes(client, factory):
    ctx = await factory.tenant()
    for path in ("/api/v1/users/not-a-uuid", "/api/v1/nowhere"):
        response = await client.get(path, headers=ctx.headers)
        assert 400 <= response.status_code < 500
        _is_problem(response)
    missing = await client.get("/api/v1/users/00000000-0000-0000-0000-000000000000", headers=ctx.headers)
    _is_problem(missing, 404)


async def test_health_readiness_metrics_and_request_ids(client):
    health = await client.get("/healthz")
    assert health.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "postgresql": "ok", "redis": "ok"}
    assert len(health.headers["x-request-id"]) >= 16
    echoed = await client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    hostile = await client.get("/healthz", headers={"x-request-id": "<script>" * 20})
    assert "<" not in hostile.headers["x-request-id"]
    metrics = await client.get("/metrics")
    assert "cc_http_requests_total" in metrics.text
    assert "cc_http_request_seconds_bucket" in metrics.text


async def test_openapi_lists_every_route_with_its_access_and_errors(client, app):
    from litestar.routes import HTTPRoute

    document = (await client.get("/schema/openapi.json")).json()
    paths = document["paths"]
    for route in app.routes:
        if not isinstance(route, HTTPRoute) or route.path.startswith("/schema"):
            continue
        for handler in route.route_handlers:
            for method in handler.http_methods:
                if method == "OPTIONS":
                    continue
                path = route.path.replace(":uuid", "").replace(":str", "")
                operation = paths[path][method.lower()]
                assert "**Access:**" in operation["description"], (method, path)
                if handler.opt.get("access") == "tenant" and handler.opt.get("permission") != "self":
                    assert handler.opt["permission"] in operation["description"]
                assert "422" in operation["responses"]
                assert PROBLEM in operation["responses"]["422"]["content"]
