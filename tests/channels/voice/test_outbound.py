"""Outbound safety (caller ids, destination policy, gateways, the concurrent-call cap) and supervision."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from sqlalchemy import select

from backend.channels.voice.outbound import OutboundGuard, OutboundRequest, classify, leases_key
from backend.channels.voice.supervision import SupervisionDesk
from backend.db.engine import tenant_transaction
from backend.lib.problems import Forbidden
from backend.routing.schemas import AgentStateChange
from backend.tenants.models import AuditEntry
from backend.tenants.permissions import BUILTIN_ROLES
from tests.factories import Factory, MediaFactory

pytestmark = pytest.mark.integration

FRENCH_LANDLINE = "+33142685300"
FRENCH_PREMIUM = "+33899123456"
UK_LANDLINE = "+442079460000"


def request(destination: str, caller_id: str | None = None) -> OutboundRequest:
    return OutboundRequest(destination=destination, caller_id=caller_id, purpose="click_to_call", call_id=uuid.uuid4())


@pytest.mark.unit
def test_number_classification():
    assert classify(FRENCH_LANDLINE)[:2] == ("+33142685300", "FR")  # type: ignore[index]
    assert classify("+33 8 99 12 34 56") is not None
    assert classify("0142685300") is None  # national form: refused, it names no country
    assert classify("+999") is None


async def _tenant_with_number(factory: Factory):
    a = await factory.tenant()
    number = await factory.number(a)
    await MediaFactory(factory).outbound_route("+33")
    return a, number["number"]


async def test_allowed_call_gets_gateway_caller_id_and_a_slot(factory: Factory, app):
    a, number = await _tenant_with_number(factory)
    guard: OutboundGuard = app.state.outbound
    decision = await guard.authorize_outbound(a.tenant_id, request("+33 1 42 68 53 00"))
    assert decision.allowed, decision
    assert (decision.destination, decision.caller_id, decision.region) == (FRENCH_LANDLINE, number, "FR")
    assert decision.dial_string().startswith("sofia/gateway/carrier-")
    assert decision.lease is not None
    assert await guard.active_calls(a.tenant_id) == 1
    await guard.release(a.tenant_id, decision.lease)
    assert await guard.active_calls(a.tenant_id) == 0


async def test_refusals_have_reasons_and_are_audited(factory: Factory, app, sessionmaker):
    a, number = await _tenant_with_number(factory)
    b = await factory.tenant()
    other_number = (await factory.number(b))["number"]
    guard: OutboundGuard = app.state.outbound
    cases = {
        "invalid_destination": request("12345"),
        "premium_rate": request(FRENCH_PREMIUM),
        "international": request(UK_LANDLINE),
        "caller_id_not_owned": request(FRENCH_LANDLINE, caller_id=other_number),
    }
    for reason, asked in cases.items():
        decision = await guard.authorize_outbound(a.tenant_id, asked)
        assert (decision.allowed, decision.reason) == (False, reason)
        assert decision.lease is None
    no_number = await factory.tenant()
    assert (await guard.authorize_outbound(no_number.tenant_id, request(FRENCH_LANDLINE))).reason == "international"
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        entries = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "outbound.refused"))).all()
    assert sorted(e.after["reason"] for e in entries) == sorted(cases)  # type: ignore[index]
    assert await guard.active_calls(a.tenant_id) == 0


async def test_provider_policy_enables_international_and_premium(factory: Factory, app):
    a, _ = await _tenant_with_number(factory)
    await MediaFactory(factory).outbound_route("+44")
    ops = await factory.provider_headers()
    guard: OutboundGuard = app.state.outbound
    response = await factory.client.put(
        f"/api/v1/ops/tenants/{a.tenant_id}/outbound-policy",
        json={"allowed_regions": ["GB"], "allow_premium": True, "max_concurrent_calls": 3},
        headers=ops,
    )
    assert response.status_code == 200, response.text
    assert response.json()["home_regions"] == ["FR"]
    assert response.json()["max_concurrent_calls"] == 3
    assert (await guard.authorize_outbound(a.tenant_id, request(UK_LANDLINE))).allowed
    assert (await guard.authorize_outbound(a.tenant_id, request(FRENCH_PREMIUM))).allowed
    assert (await guard.authorize_outbound(a.tenant_id, request("+12025550123"))).reason == "international"
    bad = await factory.client.put(
        f"/api/v1/ops/tenants/{a.tenant_id}/outbound-policy", json={"allowed_regions": ["XX"]}, headers=ops
    )
    assert bad.status_code == 422
    seen = await factory.client.get("/api/v1/voice/outbound/policy", headers=a.headers)
    assert seen.json()["allowed_regions"] == ["GB"]
    # Tenants cannot set their own policy.
    assert (
        await factory.client.put(
            f"/api/v1/ops/tenants/{a.tenant_id}/outbound-policy", json={"allow_premium": True}, headers=a.headers
        )
    ).status_code in (401, 403)


async def test_no_route_when_the_gateway_is_disabled(factory: Factory, app):
    a = await factory.tenant()
    await factory.number(a)
    ops = await factory.provider_headers()
    gateway = await factory.client.post(
        "/api/v1/ops/carrier-gateways", json={"name": f"gw-{uuid.uuid4().hex[:8]}"}, headers=ops
    )
    await factory.client.post(
        "/api/v1/ops/outbound-routes", json={"prefix": "+3314268", "gateway_id": gateway.json()["id"]}, headers=ops
    )
    guard: OutboundGuard = app.state.outbound
    assert (
        await guard.authorize_outbound(a.tenant_id, request(FRENCH_LANDLINE), take_slot=False)
    ).gateway == gateway.json()["name"]
    await factory.client.put(
        f"/api/v1/ops/carrier-gateways/{gateway.json()['id']}",
        json={"name": gateway.json()["name"], "enabled": False},
        headers=ops,
    )
    # The longest prefix is disabled: the shorter +33 route (another gateway, if one exists) or none carries it.
    decision = await guard.authorize_outbound(a.tenant_id, request(FRENCH_LANDLINE), take_slot=False)
    assert decision.gateway != gateway.json()["name"]


async def test_concurrency_cap_is_atomic_and_leases_expire(factory: Factory, app, redis):
    a, _ = await _tenant_with_number(factory)
    ops = await factory.provider_headers()
    await factory.client.put(
        f"/api/v1/ops/tenants/{a.tenant_id}/outbound-policy", json={"max_concurrent_calls": 3}, headers=ops
    )
    guard: OutboundGuard = app.state.outbound
    decisions = await asyncio.gather(
        *(guard.authorize_outbound(a.tenant_id, request(FRENCH_LANDLINE)) for _ in range(12))
    )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 3
    assert {d.reason for d in decisions if not d.allowed} == {"concurrency_limit"}
    assert await guard.active_calls(a.tenant_id) == 3
    # A crashed process never releases: with a short lease the slots come back by themselves.
    short = OutboundGuard(
        app.state.sessionmaker, redis, dataclasses.replace(app.state.settings, outbound_lease_seconds=1)
    )
    for decision in allowed:
        assert decision.lease is not None
        assert await short.renew(a.tenant_id, decision.lease)
    assert await redis.ttl(leases_key(a.tenant_id)) > 0
    await asyncio.sleep(1.2)
    assert await guard.active_calls(a.tenant_id) == 0
    assert not await guard.renew(a.tenant_id, allowed[0].lease)  # type: ignore[arg-type]
    assert (await guard.authorize_outbound(a.tenant_id, request(FRENCH_LANDLINE))).allowed


async def test_agent_check_route_answers_problem_json_with_the_reason(factory: Factory):
    a, number = await _tenant_with_number(factory)
    agent = await factory.user(a, role="agent", login=True)
    ok = await factory.client.post(
        "/api/v1/voice/outbound/check", json={"destination": FRENCH_LANDLINE}, headers=agent["headers"]
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["caller_id"] == number
    refused = await factory.client.post(
        "/api/v1/voice/outbound/check", json={"destination": FRENCH_PREMIUM}, headers=agent["headers"]
    )
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert refused.json()["reason"] == "premium_rate"
    assert "premium" in refused.json()["detail"]


# --- supervision -----------------------------------------------------------------------------


def test_builtin_roles_carry_the_supervision_modes():
    supervisor = BUILTIN_ROLES["supervisor"][1]
    agent = BUILTIN_ROLES["agent"][1]
    assert {"calls:listen", "calls:whisper", "calls:barge"} <= supervisor
    assert not {"calls:listen", "calls:whisper", "calls:barge"} & agent
    assert "calls:outbound" in agent


async def test_supervision_is_checked_per_mode_and_recorded(factory: Factory, app, sessionmaker):
    from backend.routing import service as routing_service

    a = await factory.tenant()
    chat = await factory.offered_interaction(a)  # the owner: seated, available
    await factory.client.post(f"/api/v1/interactions/{chat}/reject", headers=a.headers)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        await routing_service.set_voice_registration(session, a.tenant_id, a.owner_id, True)
        await routing_service.set_own_state(session, a.system(), AgentStateChange(state="available"))
    await app.state.routing.sync_agent(a.tenant_id, a.owner_id)
    interaction_id = await factory.offered_interaction(a, channel="voice")
    accepted = await factory.client.post(f"/api/v1/interactions/{interaction_id}/accept", headers=a.headers)
    assert accepted.status_code == 200, accepted.text
    desk: SupervisionDesk = app.state.supervision
    supervisor = await factory.user(a, role="supervisor", login=False)
    agent = await factory.user(a, role="agent", login=False)
    from backend.auth.principal import Principal
    from backend.tenants.permissions import BUILTIN_ROLES as ROLES

    as_supervisor = Principal("user", a.tenant_id, supervisor["id"], ROLES["supervisor"][1])
    as_agent = Principal("user", a.tenant_id, agent["id"], ROLES["agent"][1])
    listen_only = Principal("user", a.tenant_id, supervisor["id"], frozenset({"calls:listen"}))

    with pytest.raises(Forbidden) as refused:
        await desk.start(as_agent, interaction_id, "listen")
    assert refused.value.extra["permission"] == "calls:listen"
    started = await desk.start(listen_only, interaction_id, "listen")
    with pytest.raises(Forbidden):
        await desk.change_mode(listen_only, started.id, "barge")
    whisper = await desk.change_mode(as_supervisor, started.id, "whisper")
    assert [m["mode"] for m in whisper.modes] == ["listen", "whisper"]
    ended = await desk.end(as_supervisor, started.id)
    assert ended.ended_at is not None
    listed = await factory.client.get("/api/v1/voice/supervision-sessions", headers=a.headers)
    assert [s["id"] for s in listed.json()["items"]] == [str(started.id)]
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        actions = sorted(
            e.action
            for e in (await session.scalars(select(AuditEntry).where(AuditEntry.action.like("supervision.%")))).all()
        )
    assert actions == [
        "supervision.end",
        "supervision.mode",
        "supervision.refused",
        "supervision.refused",
        "supervision.start",
    ]
    b = await factory.tenant()
    stranger = Principal("user", b.tenant_id, b.owner_id, ROLES["supervisor"][1])
    from backend.lib.problems import NotFound

    with pytest.raises(NotFound):
        await desk.start(stranger, interaction_id, "listen")
