"""The cluster: nodes registered by provider operations, health from heartbeats, registrations, live legs, failover.

Deadlines are tested with shortened settings (a heartbeat timeout of a few
tenths of a second) and measured, never waited out at their defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from backend.auth.crypto import SecretBox
from backend.channels.voice.models import CallLeg, SwitchNode
from backend.channels.voice.service import SUBSCRIBED_EVENTS, VoiceSwitchboard
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.tenants.models import ProviderAuditEntry
from tests.factories import Factory, TenantCtx
from tests.support.freeswitch_captures import A_LEG, B_LEG, a08_events, rewrite_form, xml_curl_body

pytestmark = pytest.mark.integration

TIMEOUT = 0.5
INTERVAL = 0.05


@pytest.fixture
def short(app, sessionmaker, redis) -> VoiceSwitchboard:
    """A switchboard whose heartbeat timeout and watchdog interval are tenths of a second."""
    settings = replace(
        app.state.settings, switch_heartbeat_timeout_seconds=TIMEOUT, switch_watchdog_interval_seconds=INTERVAL
    )
    return VoiceSwitchboard(sessionmaker, app.state.redis, settings, app.state.routing)


@contextlib.asynccontextmanager
async def others_alive(board: VoiceSwitchboard, sessionmaker, mine: set[uuid.UUID]) -> AsyncIterator[None]:
    """Keep every node other tests left up heartbeating (one statement), so that only ours can fall silent."""
    keep_fresh = update(SwitchNode).where(SwitchNode.id.not_in(list(mine)), SwitchNode.health == "up")

    async def beat() -> None:
        async with sessionmaker() as session, session.begin():
            await session.execute(keep_fresh.values(last_heartbeat_at=utcnow()))

    async def keep_beating() -> None:
        while True:
            await beat()
            await asyncio.sleep(TIMEOUT / 4)

    await beat()
    task = asyncio.create_task(keep_beating())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _swap(value: Any, swaps: dict[str, str]) -> Any:
    if isinstance(value, str):
        for old, new in swaps.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, list):
        return [_swap(v, swaps) for v in value]
    return value


DOMAIN_HEADERS = {
    "realm",
    "from-host",
    "to-host",
    "domain_name",
    "presence-hosts",
    "variable_domain_name",
    "variable_dialed_domain",
    "variable_sip_auth_realm",
    "variable_requested_domain_name",
}


def scenario(domain: str, legs: dict[str, str], **variables: str) -> list[dict[str, Any]]:
    """a08's events (a registration of 1001, the call 1000 -> 7400 -> 1001, the unregistration) for our tenant."""
    events = []
    for event in a08_events():
        changed = {k: _swap(v, legs) for k, v in event.items()}
        for key in DOMAIN_HEADERS & changed.keys():
            changed[key] = changed[key].replace("127.0.0.1", domain)
        if changed.get("Unique-ID") == legs.get(A_LEG) and changed["Event-Name"].startswith("CHANNEL_"):
            changed.update({f"variable_{k}": v for k, v in variables.items()})
        events.append(changed)
    return events


# --- provider operations ------------------------------------------------------------------------


async def test_operators_register_change_and_drain_nodes(factory: Factory, client, sessionmaker, settings_obj):
    ops = await factory.provider_headers()
    name = f"fs-ops-{uuid.uuid4().hex[:6]}"
    body = {
        "name": name,
        "esl_host": "10.0.0.21",
        "esl_port": 8021,
        "esl_password": "S3cret-ESL",
        "xml_curl_sources": ["10.0.0.21", "fd00::21/128"],
        "sip_address": "10.0.0.21:5060",
    }
    created = await client.post("/api/v1/ops/switch-nodes", json=body, headers=ops)
    assert created.status_code == 201, created.text
    node = created.json()
    assert "S3cret-ESL" not in created.text
    assert (node["status"], node["health"], node["xml_curl_sources"]) == (
        "unknown",
        "unknown",
        ["10.0.0.21/32", "fd00::21/128"],
    )
    async with sessionmaker() as session:
        row = await session.scalar(select(SwitchNode).where(SwitchNode.name == name))
    assert row is not None and "S3cret" not in row.esl_password_sealed
    assert SecretBox(settings_obj.secret_key).open(row.esl_password_sealed) == "S3cret-ESL"

    assert (await client.post("/api/v1/ops/switch-nodes", json=body, headers=ops)).status_code == 409
    for sources in (["10.0.0.0/8"], ["not-an-address"]):
        refused = await client.post(
            "/api/v1/ops/switch-nodes", json={**body, "name": name + "x", "xml_curl_sources": sources}, headers=ops
        )
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "xml_curl_sources[0]"

    patched = await client.patch(
        f"/api/v1/ops/switch-nodes/{node['id']}", json={"esl_password": "N3w", "esl_port": 8022}, headers=ops
    )
    assert patched.status_code == 200 and patched.json()["esl_port"] == 8022 and "N3w" not in patched.text
    drained = await client.post(f"/api/v1/ops/switch-nodes/{node['id']}/drain", headers=ops)
    assert drained.json()["draining"] is True
    listed = await client.get("/api/v1/ops/switch-nodes", params={"limit": 200}, headers=ops)
    assert name in [n["name"] for n in listed.json()["items"]]
    assert "S3cret" not in listed.text and "N3w" not in listed.text
    async with sessionmaker() as session:
        actions = (
            await session.scalars(
                select(ProviderAuditEntry.action)
                .where(ProviderAuditEntry.detail["node"].astext == name)
                .order_by(ProviderAuditEntry.created_at)
            )
        ).all()
    assert actions == ["switch_node.register", "switch_node.update", "switch_node.drain"]


# --- health -------------------------------------------------------------------------------------


async def test_heartbeats_bring_a_node_up_with_its_figures(factory: Factory, client, app):
    node = await factory.switch_node()
    heartbeat = next(e for e in a08_events() if e["Event-Name"] == "HEARTBEAT")
    await app.state.voice.handle_event(node["id"], heartbeat)
    ops = await factory.provider_headers()
    seen = (await client.get(f"/api/v1/ops/switch-nodes/{node['id']}", headers=ops)).json()
    assert seen["status"] == "up" and seen["last_heartbeat_at"] is not None
    assert seen["stats"]["version"].startswith("1.10.12-release")
    assert seen["stats"]["sessions"] == "0"


async def test_a_silent_node_goes_down_and_originations_avoid_it(
    factory: Factory, short: VoiceSwitchboard, sessionmaker
):
    quiet, busy, idle, drained = [await factory.switch_node() for _ in range(4)]
    mine = {n["id"] for n in (quiet, busy, idle, drained)}
    async with sessionmaker() as session:
        others = [n for n in (await session.scalars(select(SwitchNode.id))).all() if n not in mine]
    for node, sessions in ((quiet, "0"), (busy, "40"), (idle, "3"), (drained, "0")):
        await short.heartbeat(node["id"], {"Event-Name": "HEARTBEAT", "Session-Count": sessions})
    ops = await factory.provider_headers()
    await factory.client.post(f"/api/v1/ops/switch-nodes/{drained['id']}/drain", headers=ops)
    choice = await short.pick_node(exclude=others)
    assert choice is not None and choice.id == quiet["id"]  # fewest sessions, not draining

    async with others_alive(short, sessionmaker, mine):
        deadline = time.monotonic() + TIMEOUT + 0.2
        while time.monotonic() < deadline:
            for node, sessions in ((busy, "40"), (idle, "1"), (drained, "0")):
                await short.heartbeat(node["id"], {"Event-Name": "HEARTBEAT", "Session-Count": sessions})
            await asyncio.sleep(INTERVAL)
        report = await short.watchdog_once()
    assert [n.id for n in report.down] == [quiet["id"]]
    assert [f.node.id for f in report.failovers] == [quiet["id"]]
    choice = await short.pick_node(exclude=others)
    assert choice is not None and choice.id == idle["id"]
    assert (await short.watchdog_once()).down == []  # marked once, failed over once

    await short.heartbeat(quiet["id"])  # it came back
    assert (await short.pick_node(exclude=[*others, idle["id"], busy["id"]])).id == quiet["id"]  # type: ignore[union-attr]


# --- registrations ------------------------------------------------------------------------------


def _registration(subclass: str, seat: dict[str, Any], *, contact: str | None = None, **headers: str) -> dict[str, Any]:
    base = next(e for e in a08_events() if e.get("Event-Subclass") == subclass)
    event = dict(base)
    for key in (
        "username",
        "from-user",
        "to-user",
        "user_name",
        "sip_auth_username",
        "number_alias",
        "sip_number_alias",
    ):
        if key in event:
            event[key] = seat["username"]
    for key in DOMAIN_HEADERS & event.keys():
        event[key] = event[key].replace("127.0.0.1", seat["domain"])
    if contact is not None:
        event["contact"] = contact
    event.update(headers)
    return event


async def _agent_state(client, ctx: TenantCtx, user_id: uuid.UUID) -> dict[str, Any]:
    response = await client.get(f"/api/v1/routing/agents/{user_id}/state", headers=ctx.headers)
    assert response.status_code == 200, response.text
    return response.json()


async def test_routing_follows_where_agents_are_registered(factory: Factory, client, app):
    voice = app.state.voice
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    first, second = await factory.switch_node(), await factory.switch_node()
    for node in (first, second):
        await voice.heartbeat(node["id"])
    assert (await _agent_state(client, ctx, seat["user_id"]))["voice_registered"] is False

    await voice.handle_event(first["id"], _registration("sofia::register", seat))
    where = await voice.where_registered(ctx.tenant_id, seat["user_id"])
    assert where is not None
    assert (where.node_id, where.contact, where.transport) == (first["id"], "sip:1001@127.0.0.1:5090", "udp")
    assert (await _agent_state(client, ctx, seat["user_id"]))["voice_registered"] is True

    browser = '"" <sip:k3j9x2@198.51.100.7:53211;transport=ws;fs_nat=yes>'
    await voice.registration_event(
        second["id"],
        _registration("sofia::register", seat, contact=browser, status="Registered(WSS-NAT)", **{"call-id": "ws-1"}),
    )
    where = await voice.where_registered(ctx.tenant_id, seat["user_id"])
    assert where is not None and (where.node_id, where.transport) == (second["id"], "ws")
    assert where.contact == "sip:k3j9x2@198.51.100.7:53211;transport=ws;fs_nat=yes"

    # a08's unregistration: a new call-id, the same contact.
    result = await voice.registration_event(first["id"], _registration("sofia::unregister", seat))
    assert result is not None and result.registered is True  # still on the second node
    # sofia::expire as sofia_reg.c fires it (its own header set).
    expire = {
        "Event-Name": "CUSTOM",
        "Event-Subclass": "sofia::expire",
        "profile-name": "internal",
        "call-id": "ws-1",
        "user": seat["username"],
        "username": seat["username"],
        "host": seat["domain"],
        "contact": browser,
        "expires": "1795417502",
        "user-agent": "JsSIP 3.10.1",
        "realm": seat["domain"],
        "network-ip": "198.51.100.7",
        "network-port": "53211",
    }
    result = await voice.registration_event(second["id"], expire)
    assert result is not None and result.registered is False
    assert await voice.where_registered(ctx.tenant_id, seat["user_id"]) is None
    state = await _agent_state(client, ctx, seat["user_id"])
    assert state["voice_registered"] is False and state["voice_ready"] is False


async def test_where_an_agent_is_registered_is_read_for_their_tenant_only_and_leaves_no_tenant_set(
    factory: Factory, app, engine
):
    """`registered_contact` (one statement outside a transaction): another tenant asking about the seat's user
    learns nothing, a node that is down hides its registrations, and the pooled connection keeps no tenant."""
    from backend.db.engine import driver_connection

    voice = app.state.voice
    ctx = await factory.tenant()
    other = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    node = await factory.switch_node()
    await voice.heartbeat(node["id"])
    await voice.handle_event(node["id"], _registration("sofia::register", seat))
    where = await voice.where_registered(ctx.tenant_id, seat["user_id"])
    assert where is not None and (where.node_id, where.sip_username) == (node["id"], seat["username"])
    assert await voice.where_registered(other.tenant_id, seat["user_id"]) is None
    async with driver_connection(engine) as connection:
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
        await connection.execute("UPDATE switch_nodes SET health = 'down' WHERE id = $1", node["id"])
    assert await voice.where_registered(ctx.tenant_id, seat["user_id"]) is None


async def test_registrations_that_are_not_ours_change_nothing(factory: Factory, app, client):
    voice = app.state.voice
    a = await factory.tenant()
    b = await factory.tenant()
    seat = await factory.sip_seat(a)
    node = await factory.switch_node()
    unknown_domain = _registration("sofia::register", dict(seat, domain="nobody.example"))
    assert await voice.registration_event(node["id"], unknown_domain) is None
    unknown_user = _registration("sofia::register", dict(seat, username="4242"))
    assert await voice.registration_event(node["id"], unknown_user) is None
    forged = _registration("sofia::register", seat, cc_tenant_id=str(b.tenant_id))
    assert await voice.registration_event(node["id"], forged) is None
    assert (await _agent_state(client, a, seat["user_id"]))["voice_registered"] is False


async def test_registrations_that_expire_silently_are_swept(factory: Factory, app, client):
    voice = app.state.voice
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    node = await factory.switch_node()
    await voice.heartbeat(node["id"])
    await voice.registration_event(node["id"], _registration("sofia::register", seat, expires="60"))
    assert (await _agent_state(client, ctx, seat["user_id"]))["voice_registered"] is True
    assert await voice.registrations.sweep_expired(30, utcnow()) == []
    swept = await voice.registrations.sweep_expired(30, utcnow() + timedelta(seconds=91))
    assert [(c.user_id, c.registered) for c in swept if c.tenant_id == ctx.tenant_id] == [(seat["user_id"], False)]
    assert (await _agent_state(client, ctx, seat["user_id"]))["voice_registered"] is False


# --- the whole event stream, and a node lost in the middle of a call ----------------------------


async def test_a08s_event_stream_leaves_two_cdrs_and_no_live_leg(factory: Factory, app, client, sessionmaker):
    """Every event of the captured session through `handle_event`: heartbeats, a registration, the call, the
    unregistration. The legs' CDRs are stored, the agent's registration came and went, nothing stays live."""
    voice = app.state.voice
    ctx = await factory.tenant()
    caller = await factory.sip_seat(ctx)  # 1000
    agent = await factory.sip_seat(ctx)  # 1001
    assert (caller["username"], agent["username"]) == ("1000", "1001")
    node = await factory.switch_node()
    legs = {A_LEG: str(uuid.uuid4()), B_LEG: str(uuid.uuid4())}
    registered_during_call = None
    for event in scenario(caller["domain"], legs):
        await voice.handle_event(node["id"], event)
        if event["Event-Name"] == "CHANNEL_BRIDGE":
            registered_during_call = (await _agent_state(client, ctx, agent["user_id"]))["voice_registered"]
            assert await voice.live.count(node["id"]) == 2
    assert registered_during_call is True
    assert (await _agent_state(client, ctx, agent["user_id"]))["voice_registered"] is False
    assert await voice.live.count(node["id"]) == 0
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        cdrs = {str(r.leg_uuid): r for r in (await session.scalars(select(CallLeg))).all()}
    assert set(cdrs) == set(legs.values())
    a, b = cdrs[legs[A_LEG]], cdrs[legs[B_LEG]]
    assert (a.call_uuid, b.call_uuid) == (uuid.UUID(legs[A_LEG]), uuid.UUID(legs[A_LEG]))
    assert (a.disposition, b.disposition, a.sources, b.sources) == ("answered", "answered", ["event"], ["event"])
    assert "CHANNEL_HANGUP_COMPLETE" in SUBSCRIBED_EVENTS and "sofia::register" in SUBSCRIBED_EVENTS


async def _connected_voice_call(factory: Factory, client, ctx: TenantCtx, voice: VoiceSwitchboard, node_id: uuid.UUID):
    """The owner, registered on the node and available, accepts a voice interaction."""
    seat = await client.post("/api/v1/seats", json={"user_id": str(ctx.owner_id)}, headers=ctx.headers)
    assert seat.status_code == 201, seat.text
    owner_seat = {"username": seat.json()["seat"]["sip_username"], "domain": seat.json()["seat"]["sip_domain"]}
    await voice.registration_event(node_id, _registration("sofia::register", owner_seat))
    state = await client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=ctx.headers)
    assert state.status_code == 200 and state.json()["voice_ready"] is True, state.text
    queue = await factory.queue(ctx, wrap_up_seconds=0)
    created = await client.post(
        "/api/v1/interactions", json={"channel": "voice", "queue_id": str(queue)}, headers=ctx.headers
    )
    assert created.json()["state"] == "offered", created.text
    interaction = created.json()["id"]
    accepted = await client.post(f"/api/v1/interactions/{interaction}/accept", headers=ctx.headers)
    assert accepted.status_code == 200, accepted.text
    assert (await client.get("/api/v1/routing/me/state", headers=ctx.headers)).json()["state"] == "busy"
    return uuid.UUID(interaction), owner_seat


async def test_a_lost_node_closes_its_calls_and_frees_its_agents_in_time(
    factory: Factory, app, client, sessionmaker, short: VoiceSwitchboard, switch_headers
):
    ctx = await factory.tenant()
    node = await factory.switch_node()
    await short.heartbeat(node["id"])
    interaction, owner_seat = await _connected_voice_call(factory, client, ctx, short, node["id"])
    legs = {A_LEG: str(uuid.uuid4()), B_LEG: str(uuid.uuid4())}
    tenant = str(ctx.tenant_id)
    for event in scenario(owner_seat["domain"], legs, cc_tenant_id=tenant, cc_interaction_id=str(interaction)):
        if event["Event-Name"] in {"CHANNEL_CREATE", "CHANNEL_ANSWER", "CHANNEL_BRIDGE"}:
            await short.handle_event(node["id"], event)
    assert await short.live.count(node["id"]) == 2

    stop = asyncio.Event()
    async with others_alive(short, sessionmaker, {node["id"]}):
        watchdog = asyncio.create_task(short.run_watchdog(stop))
        for _ in range(4):  # alive for a while
            await asyncio.sleep(INTERVAL)
            await short.heartbeat(node["id"])
        silent_since = time.monotonic()
        down_after = freed_after = None
        while time.monotonic() - silent_since < 5:
            async with sessionmaker() as session:
                row = await session.scalar(select(SwitchNode).where(SwitchNode.id == node["id"]))
            assert row is not None
            if down_after is None and row.health == "down":
                down_after = time.monotonic() - silent_since
            if row.failover_done_at is not None:
                freed_after = time.monotonic() - silent_since
                break
            await asyncio.sleep(0.02)
        stop.set()
        await watchdog
    # Down within the timeout plus one watchdog pass; calls closed and agents freed in that same pass.
    assert down_after is not None and freed_after is not None
    # (Generous margins: the test machine's two cores are shared.)
    assert TIMEOUT - 0.05 <= down_after <= TIMEOUT + INTERVAL + 1.0, down_after
    assert freed_after - down_after <= 1.5, (down_after, freed_after)

    # No new calls on it: the dialplan refuses, originations go elsewhere.
    body = rewrite_form(xml_curl_body("c08_dialplan_inbound_call_7400.request.txt"), {"hostname": node["name"]})
    refused = await client.post("/api/v1/switch/dialplan", content=body, headers=switch_headers)
    assert b"node_unavailable" in refused.content
    choice = await short.pick_node()
    assert choice is None or choice.id != node["id"]

    # Every live call got a closed CDR; the interaction ended; the agent is free and unregistered.
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        cdrs = list((await session.scalars(select(CallLeg).where(CallLeg.node_id == node["id"]))).all())
    assert sorted(str(c.leg_uuid) for c in cdrs) == sorted(legs.values())
    assert {c.disposition for c in cdrs} == {"node_failure"}
    assert {c.sources[0] for c in cdrs} == {"node_failure"}
    assert all(c.ended_at >= c.started_at for c in cdrs)
    body = (await client.get(f"/api/v1/interactions/{interaction}", headers=ctx.headers)).json()
    assert (body["state"], body["outcome"]) == ("ended", "node_failure")
    state = (await client.get("/api/v1/routing/me/state", headers=ctx.headers)).json()
    assert state["state"] == "available" and state["voice_registered"] is False
    assert not any((await app.state.routing.matcher.load(ctx.tenant_id, ctx.owner_id)).values())
    assert await short.where_registered(ctx.tenant_id, ctx.owner_id) is None
    assert await short.live.count(node["id"]) == 0


async def test_reconnect_drops_legs_the_node_no_longer_has(factory: Factory, app):
    voice = app.state.voice
    node = await factory.switch_node()
    legs = {A_LEG: str(uuid.uuid4()), B_LEG: str(uuid.uuid4())}
    for event in scenario("nobody.example", legs):
        if event["Event-Name"] == "CHANNEL_CREATE":
            await voice.handle_event(node["id"], event)
    assert await voice.live.count(node["id"]) == 2
    assert await voice.reconcile_channels(node["id"], [legs[A_LEG]]) == [legs[B_LEG]]
    assert await voice.live.count(node["id"]) == 1


async def test_unusable_events_are_logged_not_raised(factory: Factory, app):
    voice = app.state.voice
    node = await factory.switch_node()
    for event in (
        {"Event-Name": "CHANNEL_HANGUP_COMPLETE", "Unique-ID": "garbage"},
        {"Event-Name": "CHANNEL_CREATE"},
        {"Event-Name": "CUSTOM", "Event-Subclass": "sofia::register"},
        {"Event-Name": "SOMETHING_NEW", "x": ["a", "b"]},
        {},
    ):
        await voice.handle_event(node["id"], event)
    await voice.heartbeat(uuid.uuid4())  # not a node: logged


async def test_reconnect_rereads_the_nodes_registrations(factory: Factory, app, client):
    """`show registrations as json` (e01's row, for our seat) re-registers; what the node no longer lists goes."""
    voice = app.state.voice
    ctx = await factory.tenant()
    listed_seat = await factory.sip_seat(ctx)
    await factory.sip_seat(ctx)
    forgotten_seat = await factory.sip_seat(ctx)
    node = await factory.switch_node()
    await voice.heartbeat(node["id"])
    await voice.registration_event(
        node["id"], _registration("sofia::register", forgotten_seat, contact="<sip:x@10.0.0.9:5060>")
    )
    assert (await _agent_state(client, ctx, forgotten_seat["user_id"]))["voice_registered"] is True
    row = {
        "reg_user": listed_seat["username"],
        "realm": listed_seat["domain"],
        "token": "1-19534@127.0.0.1",
        "url": "sofia/internal/sip:1001@127.0.0.1:5090",
        "expires": str(int(utcnow().timestamp()) + 3600),
        "network_ip": "127.0.0.1",
        "network_port": "5070",
        "network_proto": "udp",
        "hostname": "fs-node-1",
        "metadata": "",
    }
    changes = await voice.reconcile_registrations(node["id"], [row])
    assert {(c.user_id, c.registered) for c in changes} == {
        (listed_seat["user_id"], True),
        (forgotten_seat["user_id"], False),
    }
    where = await voice.where_registered(ctx.tenant_id, listed_seat["user_id"])
    assert where is not None and where.contact == "sip:1001@127.0.0.1:5090"
    assert (await _agent_state(client, ctx, forgotten_seat["user_id"]))["voice_registered"] is False


async def test_the_inbound_manager_gets_each_nodes_event_socket(factory: Factory, app):
    node = await factory.switch_node()
    targets = {t.id: t for t in await app.state.voice.esl_targets()}
    target = targets[node["id"]]
    assert (target.name, target.host, target.port, target.password) == (node["name"], "127.0.0.1", 8021, "ClueCon")
