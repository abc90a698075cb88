"""mod_xml_curl's directory and dialplan, driven with the exact bodies FreeSWITCH 1.10.12 sends.

Each test replays a captured request (`xml_curl/*.request.txt`), changing only
the fields that name our tenant's domain, seat or number, and parses the answer
with an XML parser to check its structure: nothing a tenant or a caller
controls can add an element, an attribute or a FreeSWITCH variable expansion.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
from asyncpg.connection import LoggedQuery
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine

from backend.channels.voice.admission import Admission, CallAttempt
from backend.channels.voice.models import SwitchNode
from backend.channels.voice.xml_curl import XmlCurl, dialplan_route, parse_form
from backend.channels.voice.xml_documents import NOT_FOUND
from backend.db.engine import driver_connection
from backend.lib.problems import InvalidInput
from tests.factories import Factory, MediaFactory, TenantCtx
from tests.support.freeswitch_captures import A_LEG, fixture, rewrite_form, xml_curl_body

pytestmark = pytest.mark.integration

DIRECTORY = "/api/v1/switch/directory"
DIALPLAN = "/api/v1/switch/dialplan"
EVIL_NAME = 'Eve"/><variable name="cc_tenant_id" value="00000000-0000-0000-0000-000000000000"/><x y="${system(id)}'
EVIL_QUEUE = 'Sales"/><action application="bridge" data="sofia/gateway/evil/0900123"/><a b="$${hold_music}'
EVIL_CALLER = "</condition><action application='bridge' data='x'/>${api(system rm -rf /)}"


def _present(body: bytes, names: dict[str, str]) -> dict[str, str]:
    text = "&" + body.decode("ascii")
    return {name: value for name, value in names.items() if f"&{name}=" in text}


def seat_request(capture: str, seat: dict[str, Any], **extra: str) -> bytes:
    """A captured directory request, as if for our seat in our tenant's domain."""
    body = xml_curl_body(capture)
    domain, user = seat["domain"], seat["username"]
    changes = _present(
        body,
        {
            "key_value": domain,
            "domain": domain,
            "user": user,
            "sip_auth_username": user,
            "sip_auth_realm": domain,
            "sip_from_user": user,
            "sip_from_host": domain,
            "sip_to_host": domain,
            "sip_contact_user": user,
        },
    )
    return rewrite_form(body, {**changes, **extra})


def dialplan_request(destination: str, **extra: str) -> bytes:
    """The captured dialplan request of the inbound call, dialling `destination`."""
    body = xml_curl_body("c08_dialplan_inbound_call_7400.request.txt")
    return rewrite_form(
        body,
        {
            "Caller-Destination-Number": destination,
            "Hunt-Destination-Number": destination,
            "variable_sip_req_user": destination,
            "variable_sip_to_user": destination,
            **extra,
        },
    )


def _user(response: httpx.Response) -> tuple[ET.Element, dict[str, str], dict[str, str], dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/xml")
    document = ET.fromstring(response.content)
    assert document.tag == "document" and document.get("type") == "freeswitch/xml"
    sections = document.findall("section")
    assert [s.get("name") for s in sections] == ["directory"]
    domains = sections[0].findall("domain")
    assert len(domains) == 1
    users = domains[0].findall("groups/group/users/user")
    assert len(users) == 1
    user = users[0]
    domain_params = {p.get("name"): p.get("value") for p in domains[0].findall("params/param")}
    params = {p.get("name"): p.get("value") for p in user.findall("params/param")}
    variables = [(v.get("name"), v.get("value")) for v in user.findall("variables/variable")]
    assert len(variables) == len(dict(variables)), "a variable appears twice"
    return user, domain_params, params, dict(variables)  # type: ignore[arg-type,return-value]


def _actions(response: httpx.Response, context: str = "default") -> list[tuple[str, str]]:
    assert response.status_code == 200, response.text
    document = ET.fromstring(response.content)
    sections = document.findall("section")
    assert [s.get("name") for s in sections] == ["dialplan"]
    contexts = sections[0].findall("context")
    assert [c.get("name") for c in contexts] == [context]
    extensions = contexts[0].findall("extension")
    assert len(extensions) == 1
    conditions = extensions[0].findall("condition")
    assert len(conditions) == 1 and conditions[0].get("field") is None  # FreeSWITCH's "absolute condition"
    assert len(list(conditions[0])) == len(conditions[0].findall("action"))
    return [(a.get("application"), a.get("data", "")) for a in conditions[0].findall("action")]  # type: ignore[misc]


async def _post(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await client.post(
        path, content=body, headers={**headers, "content-type": "application/x-www-form-urlencoded"}
    )


# --- directory ------------------------------------------------------------------------------------


async def test_register_gets_the_seats_a1_hash_and_variables(factory: Factory, client, node_up, switch_headers):
    """c05: the digest-authenticated REGISTER; FreeSWITCH checks the response against the served a1-hash."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    response = await _post(
        client, DIRECTORY, seat_request("c05_directory_sip_auth_register_1001.request.txt", seat), switch_headers
    )
    user, domain_params, params, variables = _user(response)
    assert user.get("id") == seat["username"]
    expected_a1 = hashlib.md5(f"{seat['username']}:{seat['domain']}:{seat['password']}".encode()).hexdigest()
    assert params == {"a1-hash": expected_a1}
    assert "sofia_contact" in domain_params["dial-string"]
    assert variables["cc_tenant_id"] == str(ctx.tenant_id)
    assert variables["cc_user_id"] == str(seat["user_id"])
    assert variables["cc_seat_id"] == str(seat["seat_id"])
    assert variables["user_context"] == "seats"
    assert variables["effective_caller_id_number"] == seat["username"]
    assert variables["effective_caller_id_name"] == "Some User"


async def test_webrtc_and_invite_authentication_get_the_same_credentials(
    factory: Factory, client, node_up, switch_headers
):
    """c07 (the INVITE's proxy authentication), also as a browser softphone over WSS would send it."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    number = await factory.number(ctx)
    answers = []
    for extra in ({}, {"sip_via_protocol": "wss", "sip_user_agent": "JsSIP 3.10.1"}):
        body = seat_request("c07_directory_sip_auth_invite_1000_a1hash.request.txt", seat, **extra)
        answers.append(_user(await _post(client, DIRECTORY, body, switch_headers)))
    assert answers[0][2] == answers[1][2] and "a1-hash" in answers[0][2]
    assert answers[0][3] == answers[1][3]
    assert answers[0][3]["outbound_caller_id_number"] == number["number"]


@pytest.mark.parametrize(
    "capture",
    [
        "c09_directory_user_call_1001_bridge.request.txt",
        "c06_directory_message_count_1001.request.txt",
        "c11_directory_user_data_api_1001.request.txt",
    ],
)
async def test_lookups_that_are_not_authentication_get_no_secret(
    capture, factory: Factory, client, node_up, switch_headers
):
    """`bridge user/...`, voicemail's message count and `user_data` find the seat but never its a1-hash."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    user, domain_params, params, variables = _user(
        await _post(client, DIRECTORY, seat_request(capture, seat), switch_headers)
    )
    assert params == {}
    assert "dial-string" in domain_params
    assert variables["cc_user_id"] == str(seat["user_id"])


async def test_what_we_do_not_know_is_freeswitchs_not_found(factory: Factory, client, node_up, switch_headers, app):
    """Unknown users and domains, other tenants' seats, suspended tenants, gateways: FreeSWITCH's "not found"."""
    a = await factory.tenant()
    b = await factory.tenant()
    seat_a = await factory.sip_seat(a)
    await factory.sip_seat(b)
    seat_b = await factory.sip_seat(b)  # 1001: tenant A has no such seat
    assert seat_b["username"] != seat_a["username"]
    unknown = dict(seat_a, username="9876")
    b_in_a = dict(seat_b, domain=seat_a["domain"])
    bodies = [
        xml_curl_body("c05_directory_sip_auth_register_1001.request.txt"),  # the capture's domain is nobody's
        xml_curl_body("c03_directory_purpose_gateways.request.txt"),
        xml_curl_body("c04_directory_purpose_network_list.request.txt"),
        seat_request("c10_directory_user_call_nonexistent_9876.request.txt", unknown),
        seat_request("c05_directory_sip_auth_register_1001.request.txt", b_in_a),
        seat_request("c05_directory_sip_auth_register_1001.request.txt", dict(seat_a, username="10'00")),
        seat_request("c05_directory_sip_auth_register_1001.request.txt", dict(seat_a, domain="X" + seat_a["domain"])),
    ]
    served = fixture("xml_curl", "served_not_found.xml").read_bytes()
    assert served == NOT_FOUND
    for body in bodies:
        response = await _post(client, DIRECTORY, body, switch_headers)
        assert response.status_code == 200
        assert response.content == served, body[:200]

    ops = await factory.provider_headers()
    suspended = await client.post(f"/api/v1/ops/tenants/{a.tenant_id}/suspend", json={"reason": "unpaid"}, headers=ops)
    assert suspended.status_code == 200, suspended.text
    response = await _post(
        client, DIRECTORY, seat_request("c05_directory_sip_auth_register_1001.request.txt", seat_a), switch_headers
    )
    assert response.content == served


async def test_a_malicious_user_name_cannot_inject_xml_or_variables(factory: Factory, client, node_up, switch_headers):
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    renamed = await client.patch(f"/api/v1/users/{seat['user_id']}", json={"name": EVIL_NAME}, headers=ctx.headers)
    assert renamed.status_code == 200, renamed.text
    _, _, params, variables = _user(
        await _post(
            client, DIRECTORY, seat_request("c05_directory_sip_auth_register_1001.request.txt", seat), switch_headers
        )
    )
    assert set(variables) == {
        "user_context",
        "cc_tenant_id",
        "cc_user_id",
        "cc_seat_id",
        "effective_caller_id_name",
        "effective_caller_id_number",
    }
    assert variables["cc_tenant_id"] == str(ctx.tenant_id)
    shown = variables["effective_caller_id_name"]
    assert not set(shown) & set('${}<>"\\')
    assert shown.startswith("Eve/variable name=cc_tenant_id")
    assert set(params) == {"a1-hash"}


# --- who may ask ---------------------------------------------------------------------------------


async def test_freeswitch_basic_auth_credentials_are_accepted(factory: Factory, client, node_up, settings_obj):
    """mod_xml_curl can only send `gateway-credentials` (HTTP basic); the secret is its password."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    body = seat_request("c05_directory_sip_auth_register_1001.request.txt", seat)
    token = base64.b64encode(f"fs-node-1:{settings_obj.switch_shared_secret}".encode()).decode()
    response = await _post(client, DIRECTORY, body, {"Authorization": f"Basic {token}"})
    assert "a1-hash" in _user(response)[2]
    wrong = base64.b64encode(b"fs-node-1:guess").decode()
    for headers in ({"Authorization": f"Basic {wrong}"}, {"Authorization": "Basic !!!"}, {}, {"x-switch-secret": "x"}):
        refused = await _post(client, DIRECTORY, body, headers)
        assert refused.status_code == 401, headers
        assert refused.headers["content-type"].startswith("application/problem+json")


async def test_only_registered_source_addresses_reach_the_switch_routes(app, node_up, switch_headers):
    """The right secret from an address no node is registered at: 403, before anything is read."""
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as outsider:
        for path in (DIRECTORY, DIALPLAN, "/api/v1/switch/cdr"):
            response = await _post(outsider, path, b"section=directory", switch_headers)
            assert response.status_code == 403, path
            assert response.headers["content-type"].startswith("application/problem+json")


async def test_a_node_is_known_by_its_name_and_address(factory: Factory, client, node_up, switch_headers):
    """From a registered address but naming another switch: not answered as that switch."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    body = seat_request("c05_directory_sip_auth_register_1001.request.txt", seat, hostname="fs-impostor")
    assert (await _post(client, DIRECTORY, body, switch_headers)).content == NOT_FOUND
    number = await factory.number(ctx, queue_id=await factory.queue(ctx))
    body = dialplan_request(number["number"], hostname="fs-impostor")
    assert _actions(await _post(client, DIALPLAN, body, switch_headers)) == [
        ("set", "cc_refusal=unknown_node"),
        ("hangup", "NORMAL_TEMPORARY_FAILURE"),
    ]


@pytest.mark.parametrize("body", [b"\xff\xfe\x00garbage", b"hostname=fs-node-1&tag_name=", b""])
async def test_garbage_is_a_problem_not_a_crash(body, client, node_up, switch_headers):
    for path in (DIRECTORY, DIALPLAN):
        response = await _post(client, path, body, switch_headers)
        assert response.status_code == 422, response.text
        problem = response.json()
        assert problem["errors"], problem


@pytest.mark.parametrize(
    "capture", sorted(p.name for p in fixture("xml_curl").glob("*.request.txt")), ids=lambda name: name[:3]
)
def test_fields_read_as_parse_qsl_reads_them(capture: str):
    """Values are decoded when read, not when parsed; what a handler reads is what `parse_qsl` gives."""
    edges = "&&a%3Db=1&a%3Db=2&plus=a+b%2Bc&bad=%ZZ%E9%FF&blank=&bare&%73ection=second&x=%C3%A9t%C3%A9"
    for body in (xml_curl_body(capture), xml_curl_body(capture) + edges.encode()):
        expected: dict[str, str] = {}
        for name, value in parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="replace"):
            expected.setdefault(name, value)
        form = parse_form(body)
        assert {name: form.get(name) or "" for name in expected} == expected
        assert form.section == expected["section"] and form.hostname == (expected.get("hostname") or None)
    with pytest.raises(InvalidInput):
        parse_form(b"section=dialplan" + b"&x=" * 2000)


async def test_a_dialplan_request_without_a_leg_is_refused_as_input(client, node_up, switch_headers):
    body = rewrite_form(
        xml_curl_body("c08_dialplan_inbound_call_7400.request.txt"), {"Unique-ID": "x", "Caller-Unique-ID": "y"}
    )
    response = await _post(client, DIALPLAN, body, switch_headers)
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "Unique-ID"


# --- dialplan -------------------------------------------------------------------------------------


async def _queue_named(factory: Factory, ctx: TenantCtx, name: str) -> uuid.UUID:
    response = await factory.client.post("/api/v1/routing/queues", json={"name": name}, headers=ctx.headers)
    assert response.status_code == 201, response.text
    return uuid.UUID(response.json()["id"])


async def test_a_call_to_a_tenants_number_goes_to_call_control(
    factory: Factory, client, node_up, switch_headers, settings_obj
):
    """c08 dialling the tenant's DID (as a carrier sends it, without +) with a malicious queue and caller name."""
    ctx = await factory.tenant()
    queue = await _queue_named(factory, ctx, EVIL_QUEUE)
    number = await factory.number(ctx, queue_id=queue)
    body = dialplan_request(
        number["number"].lstrip("+"), **{"Hunt-Caller-ID-Name": EVIL_CALLER, "Caller-Caller-ID-Name": EVIL_CALLER}
    )
    actions = _actions(await _post(client, DIALPLAN, body, switch_headers))
    shown = dict(a[1].split("=", 1) for a in actions if a[0] == "set")["effective_caller_id_name"]
    assert actions == [
        ("export", f"cc_tenant_id={ctx.tenant_id}"),
        ("export", f"cc_call_id={A_LEG}"),
        ("export", "cc_direction=inbound"),
        ("export", f"cc_did={number['number']}"),
        ("export", f"cc_number_id={number['id']}"),
        ("export", f"cc_queue_id={queue}"),
        ("set", f"cc_node_id={node_up}"),
        ("set", f"effective_caller_id_name={shown}"),
        ("socket", f"{settings_obj.call_control_address} async full"),
        ("socket", f"{settings_obj.call_control_address} async full"),
    ]
    assert not set(shown) & set("${}<>\"'\\")
    assert shown.startswith("Sales/action application=bridge")


async def test_calls_that_may_not_go_on_are_refused_with_a_sip_cause(factory: Factory, client, node_up, switch_headers):
    ctx = await factory.tenant()
    routed = await factory.number(ctx, queue_id=await factory.queue(ctx))
    bare = await factory.number(ctx)
    expectations = [
        # the capture itself: 7400 is nobody's number -> 404
        (xml_curl_body("c08_dialplan_inbound_call_7400.request.txt"), None, "unknown_number", "UNALLOCATED_NUMBER"),
        (dialplan_request("+999123"), None, "unknown_number", "UNALLOCATED_NUMBER"),
        # an assigned number pointed nowhere -> 404
        (dialplan_request(bare["number"]), ctx.tenant_id, "no_target", "NO_ROUTE_DESTINATION"),
    ]
    for body, tenant, reason, cause in expectations:
        expected = ([("set", f"cc_tenant_id={tenant}")] if tenant else []) + [
            ("set", f"cc_refusal={reason}"),
            ("hangup", cause),
        ]
        assert _actions(await _post(client, DIALPLAN, body, switch_headers)) == expected

    ops = await factory.provider_headers()
    await client.post(f"/api/v1/ops/tenants/{ctx.tenant_id}/suspend", json={"reason": "unpaid"}, headers=ops)
    assert _actions(await _post(client, DIALPLAN, dialplan_request(routed["number"]), switch_headers)) == [
        ("set", f"cc_tenant_id={ctx.tenant_id}"),
        ("set", "cc_refusal=tenant_suspended"),
        ("hangup", "INCOMING_CALL_BARRED"),  # mod_sofia answers 403
    ]


async def test_a_released_number_stops_reaching_its_tenant(factory: Factory, client, node_up, switch_headers):
    ctx = await factory.tenant()
    number = await factory.number(ctx, queue_id=await factory.queue(ctx))
    assert (
        _actions(await _post(client, DIALPLAN, dialplan_request(number["number"]), switch_headers))[-1][0] == "socket"
    )
    ops = await factory.provider_headers()
    released = await client.post(f"/api/v1/ops/numbers/{number['id']}/release", headers=ops)
    assert released.status_code == 200, released.text
    assert _actions(await _post(client, DIALPLAN, dialplan_request(number["number"]), switch_headers))[-1] == (
        "hangup",
        "UNALLOCATED_NUMBER",
    )


async def test_a_draining_or_silent_node_gets_no_new_calls(factory: Factory, client, app, switch_headers):
    ctx = await factory.tenant()
    number = await factory.number(ctx, queue_id=await factory.queue(ctx))
    node = await factory.switch_node()
    body = dialplan_request(number["number"], hostname=node["name"])
    refused = [("set", "cc_refusal=node_unavailable"), ("hangup", "NORMAL_TEMPORARY_FAILURE")]
    assert _actions(await _post(client, DIALPLAN, body, switch_headers)) == refused  # never heard from
    await app.state.voice.heartbeat(node["id"])
    assert _actions(await _post(client, DIALPLAN, body, switch_headers))[-1][0] == "socket"
    ops = await factory.provider_headers()
    drained = await client.post(f"/api/v1/ops/switch-nodes/{node['id']}/drain", headers=ops)
    assert drained.json()["status"] == "draining"
    assert _actions(await _post(client, DIALPLAN, body, switch_headers)) == refused
    await client.post(f"/api/v1/ops/switch-nodes/{node['id']}/undrain", headers=ops)
    assert _actions(await _post(client, DIALPLAN, body, switch_headers))[-1][0] == "socket"
    # Marked down (the watchdog's verdict on a silent node): the very next call is refused.
    async with app.state.sessionmaker() as session, session.begin():
        await session.execute(update(SwitchNode).where(SwitchNode.id == node["id"]).values(health="down"))
    assert _actions(await _post(client, DIALPLAN, body, switch_headers)) == refused


async def test_a_new_call_is_routed_in_one_statement_without_a_transaction(
    factory: Factory, client, engine: AsyncEngine, node_up, switch_headers
):
    """The dialplan is asked for every call: one statement (`dialplan_route`), no BEGIN, tenant setting or COMMIT."""
    ctx = await factory.tenant()
    number = await factory.number(ctx, queue_id=await _queue_named(factory, ctx, "Sales"))
    body = dialplan_request(number["number"])
    assert _actions(await _post(client, DIALPLAN, body, switch_headers))[-1][0] == "socket"  # warm: prepared
    seen: list[str] = []
    this_request = asyncio.current_task()  # the ASGI transport runs the app in the test's task; others are not ours

    def log_query(record: LoggedQuery) -> None:
        seen.append(record.query)

    def on_checkout(dbapi_connection: Any, *_: Any) -> None:
        if asyncio.current_task() is this_request:
            dbapi_connection.driver_connection.add_query_logger(log_query)

    def on_checkin(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.driver_connection.remove_query_logger(log_query)

    def on_orm_statement(_connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if asyncio.current_task() is this_request:
            seen.append(statement)

    pool_events = [("checkout", on_checkout), ("checkin", on_checkin), ("before_cursor_execute", on_orm_statement)]
    for name, listener in pool_events:
        event.listen(engine.sync_engine, name, listener)
    try:
        assert _actions(await _post(client, DIALPLAN, body, switch_headers))[-1][0] == "socket"
        await asyncio.sleep(0)  # asyncpg hands the log records over with call_soon
    finally:
        for name, listener in pool_events:
            event.remove(engine.sync_engine, name, listener)
    assert seen == ["SELECT * FROM dialplan_route($1, $2, $3)"]


async def test_the_dialplan_lookup_reads_the_queue_as_its_tenant_and_leaves_no_tenant_behind(
    factory: Factory, engine: AsyncEngine, node_up
):
    ctx = await factory.tenant()
    other = await factory.tenant()
    queue = await _queue_named(factory, ctx, "Sales")
    number = await factory.number(ctx, queue_id=queue)
    route = await dialplan_route(engine, node_up, number["number"], other.tenant_id)
    assert route.node_accepting and route.tenant_id == ctx.tenant_id  # the number's tenant, not the one passed
    assert (route.number_id, route.queue_id, route.queue_name) == (uuid.UUID(str(number["id"])), queue, "Sales")
    seat_call = await dialplan_route(engine, node_up, None, other.tenant_id)
    assert seat_call.tenant_id == other.tenant_id and seat_call.number_id is None and seat_call.queue_name is None
    assert (await dialplan_route(engine, node_up, "+14155550199", None)).tenant_id is None
    assert not (await dialplan_route(engine, uuid.uuid4(), number["number"], None)).node_accepting
    async with driver_connection(engine) as connection:
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(other.tenant_id))
            row = await connection.fetchrow("SELECT * FROM dialplan_route($1, $2, NULL)", node_up, number["number"])
            assert row["queue_name"] == "Sales"
            assert await connection.fetchval("SELECT current_setting('app.tenant_id', true)") == str(other.tenant_id)
        await connection.fetchrow("SELECT * FROM dialplan_route($1, $2, NULL)", node_up, number["number"])
        assert not await connection.fetchval("SELECT current_setting('app.tenant_id', true)")
        assert await connection.fetchval("SELECT count(*) FROM queues") == 0  # row-level security: no tenant


async def test_a_call_to_an_ivr_number_starts_on_the_flow_version_published_when_it_arrived(
    factory: Factory, client, engine: AsyncEngine, node_up, switch_headers
):
    """The dialplan pins the flow's published version (`cc_ivr_flow_version`, migration 0022): call control starts
    the call on it without reading it again; a later publication is for the calls after it."""
    ctx = await factory.tenant()
    media = MediaFactory(factory)
    flow = await media.flow(ctx)
    number = await factory.number(ctx)
    pointed = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"ivr_flow_id": str(flow)}, headers=ctx.headers
    )
    assert pointed.status_code == 200, pointed.text
    body = dialplan_request(number["number"])
    exported = [a[1] for a in _actions(await _post(client, DIALPLAN, body, switch_headers)) if a[0] == "export"]
    assert exported[-2:] == [f"cc_ivr_flow_id={flow}", "cc_ivr_flow_version=1"]
    published = await client.post(f"/api/v1/routing/ivr-flows/{flow}/publish", headers=ctx.headers)
    assert published.status_code == 201, published.text
    assert (await dialplan_route(engine, node_up, number["number"], None)).ivr_flow_version == 2
    draft = await media.flow(ctx, publish=False)
    refused = await client.patch(
        f"/api/v1/voice/numbers/{number['id']}", json={"ivr_flow_id": str(draft)}, headers=ctx.headers
    )
    assert refused.status_code == 422, refused.text  # a number only reaches a published flow


async def test_a_seat_places_a_call_through_call_control(
    factory: Factory, client, node_up, switch_headers, settings_obj
):
    """A call from an authenticated seat carries the variables our directory gave it."""
    ctx = await factory.tenant()
    seat = await factory.sip_seat(ctx)
    seat_vars = {
        "variable_cc_tenant_id": str(ctx.tenant_id),
        "variable_cc_user_id": str(seat["user_id"]),
        "variable_domain_name": seat["domain"],
    }
    body = dialplan_request("+14155550100", **seat_vars, **{"Caller-Context": "seats", "Hunt-Context": "seats"})
    assert _actions(await _post(client, DIALPLAN, body, switch_headers), context="seats") == [
        ("export", f"cc_tenant_id={ctx.tenant_id}"),
        ("export", f"cc_call_id={A_LEG}"),
        ("export", "cc_direction=outbound"),
        ("export", f"cc_agent_id={seat['user_id']}"),
        ("set", f"cc_node_id={node_up}"),
        ("socket", f"{settings_obj.call_control_address} async full"),
    ]
    other = await factory.tenant()
    forged = dialplan_request("+14155550100", **{**seat_vars, "variable_cc_tenant_id": str(other.tenant_id)})
    assert _actions(await _post(client, DIALPLAN, forged, switch_headers))[-1] == ("hangup", "CALL_REJECTED")


class RefuseEverything:
    def __init__(self) -> None:
        self.seen: list[CallAttempt] = []

    async def check(self, attempt: CallAttempt) -> Admission:
        self.seen.append(attempt)
        return Admission(admitted=False, hangup_cause="OUTGOING_CALL_BARRED", reason="no balance")


async def test_the_admission_check_can_refuse_a_call(factory: Factory, app, node_up):
    """Billing plugs in behind one interface; a refusal becomes the hangup cause it names."""
    ctx = await factory.tenant()
    number = await factory.number(ctx, queue_id=await factory.queue(ctx))
    admission = RefuseEverything()
    xml_curl = XmlCurl(app.state.switch_sources, admission, "127.0.0.1:8084", app.state.engine)
    document = await xml_curl.dialplan(parse_form(dialplan_request(number["number"])), "127.0.0.1")
    actions = [(a.get("application"), a.get("data")) for a in ET.fromstring(document).iter("action")]
    assert actions == [
        ("set", f"cc_tenant_id={ctx.tenant_id}"),
        ("set", "cc_refusal=not_admitted"),
        ("hangup", "OUTGOING_CALL_BARRED"),
    ]
    assert admission.seen == [CallAttempt(ctx.tenant_id, "inbound", "1000", number["number"], number["number"])]


def test_the_call_control_address_is_checked():
    with pytest.raises(ValueError, match="host:port"):
        XmlCurl(None, None, "127.0.0.1 async full; bridge", None)  # type: ignore[arg-type]
