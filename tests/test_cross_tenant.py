"""The cross-tenant test: walks the application's own route table, HTTP and WebSocket.

Every route must be classified (`access` = public, tenant, provider or switch).
Each tenant-scoped route is called with tenant B's credentials on tenant A's
real objects and must answer 403 or 404 without any of A's data; then with
A's own credentials on the same objects, where it must succeed. Objects come
from a factory registered per path-parameter name and request bodies from a
factory registered per body type: a route with a parameter or body type that
has no factory fails this test, so routes added later are covered without
editing the walk itself, only the registries.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pyotp
import pytest
from litestar import Litestar
from litestar.handlers import HTTPRouteHandler, WebsocketRouteHandler
from litestar.routes import HTTPRoute, WebSocketRoute

from backend.auth import schemas as auth_schemas
from backend.auth.middleware import ACCESS_KINDS, SWITCH_SECRET_HEADER
from backend.channels.voice import schemas as voice_schemas
from backend.channels.voice.call_control import outbound_calls as outbound_call_schemas
from backend.channels.voice.call_control import schemas as call_schemas
from backend.customers import schemas as customer_schemas
from backend.db.engine import tenant_transaction
from backend.routing import schemas as routing_schemas
from backend.tenants import schemas as tenant_schemas
from tests.factories import PASSWORD, Factory, MediaFactory, TenantCtx, unique, wav_bytes
from tests.support.asgi_websocket import websocket_connect

pytestmark = pytest.mark.integration


@dataclass
class Owned:
    """Objects made for tenant A for one call, and every string that would betray them."""

    ctx: TenantCtx
    route_path: str = ""
    params: dict[str, str] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)
    headers: dict[str, str] = field(default_factory=dict)
    """Extra request headers the objects need (If-Match with the ETag of the record a route changes)."""
    content: bytes | None = None
    query: dict[str, str] = field(default_factory=dict)
    """Query parameters a route needs to do anything (the address a screen pop looks up)."""
    """A raw request body (an uploaded file) instead of a JSON one."""

    def keep(self, value: Any) -> str:
        text = str(value)
        self.secrets.add(text)
        return text


ParamFactory = Callable[[Factory, Owned], Awaitable[str]]
BodyFactory = Callable[[Factory, Owned], Awaitable[dict[str, Any]]]


async def _user(f: Factory, owned: Owned) -> str:
    user = await f.user(owned.ctx)
    owned.keep(user["email"])
    return owned.keep(user["id"])


async def _team(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.team(owned.ctx))


async def _role(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.role(owned.ctx))


async def _seat(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.seat(owned.ctx))


async def _api_key(f: Factory, owned: Owned) -> str:
    created = await f.api_key(owned.ctx)
    owned.keep(created["api_key"]["prefix"])
    return owned.keep(created["api_key"]["id"])


async def _skill(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.skill(owned.ctx))


async def _hours(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.business_hours(owned.ctx))


async def _queue(f: Factory, owned: Owned) -> str:
    return owned.keep(await f.queue(owned.ctx))


async def _code(f: Factory, owned: Owned) -> str:
    catalogue = "pause-reasons" if "/pause-reasons/" in owned.route_path else "wrap-up-codes"
    return owned.keep(await f.code(owned.ctx, catalogue))


_RESPONDERS: dict[str, asyncio.Task[None]] = {}


async def _answer_every_request(store: Any) -> None:
    """Stands in for the call-control process that owns the calls `_live_call` makes: says yes to everything."""
    from backend.channels.voice.call_control.records import CallReply

    while True:
        request = await store.next_request(1.0)
        if request is not None:
            await store.answer(request, CallReply(True))


async def _live_call(f: Factory, owned: Owned) -> str:
    """A call under control: its interaction (opened by the voice channel) and the record call control keeps."""
    from backend.channels.voice.call_control import CallRecord, CallStore

    opened = await f.app.state.routing.open(owned.ctx.tenant_id, channel="voice", customer_ref="+33612345678")
    store = CallStore(f.app.state.redis, f.settings, owner="cross-tenant-call-control")
    await store.save(
        CallRecord(
            tenant_id=owned.ctx.tenant_id,
            call_uuid=uuid.uuid4(),
            node_id=uuid.uuid4(),
            interaction_id=opened.id,
            phase="bridged",
            agent_id=owned.ctx.owner_id,
            agent_leg=uuid.uuid4(),
        )
    )
    if "calls" not in _RESPONDERS:
        _RESPONDERS["calls"] = asyncio.create_task(_answer_every_request(store))
    return owned.keep(opened.id)


async def _answer_every_switch_command(redis: Any, node_id: uuid.UUID) -> None:
    """Stands in for the process holding a node's event socket: every command succeeds (`+OK`)."""
    from backend.channels.voice.commands import CommandReply, decode_request, encode_reply, reply_key, requests_key

    while True:
        found = await redis.blpop([requests_key(node_id)], timeout=1)
        if found is None:
            continue
        request = decode_request(found[1])
        replies = [CommandReply("accepted", ok=True)] if request.kind == "bgapi" else []
        replies.append(CommandReply("done", ok=True, body="+OK\n"))
        for reply in replies:
            await redis.rpush(reply_key(node_id, request.id), encode_reply(reply))


async def _supervised_call(f: Factory, owned: Owned) -> str:
    """A live call another agent answered, the owner's softphone registered on the call's node, and a stand-in
    holder of that node that carries out every command: what a supervisor needs to listen in."""
    from datetime import timedelta

    from backend.channels.voice.call_control import CallRecord, CallStore
    from backend.channels.voice.commands import lease_key
    from backend.channels.voice.models import Registration
    from backend.db.base import utcnow
    from backend.db.engine import tenant_transaction
    from backend.routing import service as routing_service

    ctx = owned.ctx
    agent = await f.seated_agent(ctx)
    async with tenant_transaction(f.app.state.sessionmaker, ctx.tenant_id) as session:
        await routing_service.set_voice_registration(session, ctx.tenant_id, agent["id"], True)
    await f.app.state.routing.sync_agent(ctx.tenant_id, agent["id"])
    ready = await f.client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=agent["headers"])
    assert ready.status_code == 200, ready.text
    queue = await f.queue(ctx)
    created = await f.client.post(
        "/api/v1/interactions", json={"channel": "voice", "queue_id": str(queue)}, headers=ctx.headers
    )
    assert created.status_code == 201 and created.json()["state"] == "offered", created.text
    interaction_id = created.json()["id"]
    accepted = await f.client.post(f"/api/v1/interactions/{interaction_id}/accept", headers=agent["headers"])
    assert accepted.status_code == 200, accepted.text
    node = await f.switch_node()
    await f.app.state.voice.heartbeat(node["id"])
    seat = await f.client.post("/api/v1/seats", json={"user_id": str(ctx.owner_id)}, headers=ctx.headers)
    assert seat.status_code == 201, seat.text
    async with tenant_transaction(f.app.state.sessionmaker, ctx.tenant_id) as session:
        session.add(
            Registration(
                tenant_id=ctx.tenant_id,
                user_id=ctx.owner_id,
                node_id=node["id"],
                sip_username=seat.json()["seat"]["sip_username"],
                contact="sip:owner@127.0.0.1:5062",
                registered_at=utcnow(),
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
    store = CallStore(f.app.state.redis, f.settings, owner="cross-tenant-call-control")
    await store.save(
        CallRecord(
            tenant_id=ctx.tenant_id,
            call_uuid=uuid.uuid4(),
            node_id=node["id"],
            interaction_id=uuid.UUID(interaction_id),
            phase="bridged",
            agent_id=agent["id"],
            agent_leg=uuid.uuid4(),
        )
    )
    await f.app.state.redis.set(lease_key(node["id"]), "cross-tenant-holder")
    _RESPONDERS[str(node["id"])] = asyncio.create_task(_answer_every_switch_command(f.app.state.redis, node["id"]))
    owned.params["interaction_id"] = interaction_id
    return owned.keep(interaction_id)


async def _supervision_session(f: Factory, owned: Owned) -> str:
    """The owner listening to the supervised call (started through the API, on the stand-in node holder)."""
    interaction_id = owned.params["interaction_id"]
    started = await f.client.post(
        f"/api/v1/voice/calls/{interaction_id}/supervision", json={"mode": "listen"}, headers=owned.ctx.headers
    )
    assert started.status_code == 201, started.text
    return owned.keep(started.json()["id"])


async def _interaction(f: Factory, owned: Owned) -> str:
    if owned.route_path.startswith("/api/v1/voice/calls/") and "/supervision" in owned.route_path:
        return await _supervised_call(f, owned)
    if owned.route_path.startswith("/api/v1/voice/calls/"):
        return await _live_call(f, owned)
    if owned.route_path.endswith("/callback"):
        return owned.keep(await f.waiting_interaction(owned.ctx))
    return owned.keep(await f.offered_interaction(owned.ctx))


async def _number(f: Factory, owned: Owned) -> str:
    number = await f.number(owned.ctx, queue_id=await f.queue(owned.ctx))
    owned.keep(number["number"])
    return owned.keep(number["id"])


async def _flow(f: Factory, owned: Owned) -> str:
    return owned.keep(await MediaFactory(f).flow(owned.ctx))


async def _version(f: Factory, owned: Owned) -> str:
    return "1"  # the flow (from its own factory) is published once: version 1


async def _prompt(f: Factory, owned: Owned) -> str:
    prompt = await MediaFactory(f).prompt(owned.ctx)
    owned.keep(prompt["name"])
    owned.keep(prompt["sha256"])
    return owned.keep(prompt["id"])


async def _recording(f: Factory, owned: Owned) -> str:
    return owned.keep(await MediaFactory(f).recording(owned.ctx))


async def _voicemail(f: Factory, owned: Owned) -> str:
    return owned.keep(await MediaFactory(f).voicemail(owned.ctx))


async def _customer(f: Factory, owned: Owned) -> str:
    created = await f.customer(owned.ctx, emails=[f"{unique('e')}@example.com"], wechat_openids=[unique("oA")])
    owned.headers["If-Match"] = created["etag"]
    for secret in (created["name"], created["phones"][0]["number"], created["emails"][0], created["wechat_openids"][0]):
        owned.keep(secret)
    return owned.keep(created["id"])


async def _field(f: Factory, owned: Owned) -> str:
    created = await f.customer_field(owned.ctx)
    owned.keep(created["key"])
    return owned.keep(created["id"])


async def _import(f: Factory, owned: Owned) -> str:
    phone = f"+86139{int(time.time() * 1000) % 100_000_000:08d}"
    owned.content = f"name,phone\nImported Person,{phone}\n".encode()
    return owned.keep(await f.customer_import(owned.ctx))


async def _ticket(f: Factory, owned: Owned) -> str:
    created = await f.ticket(owned.ctx, subject=unique("subject"))
    owned.headers["If-Match"] = created["etag"]
    owned.keep(created["subject"])
    return owned.keep(created["id"])


PATH_PARAMETER_FACTORIES: dict[str, ParamFactory] = {
    "user_id": _user,
    "team_id": _team,
    "role_id": _role,
    "seat_id": _seat,
    "api_key_id": _api_key,
    "skill_id": _skill,
    "business_hours_id": _hours,
    "queue_id": _queue,
    "code_id": _code,
    "interaction_id": _interaction,
    "number_id": _number,
    "flow_id": _flow,
    "version": _version,
    "prompt_id": _prompt,
    "recording_id": _recording,
    "voicemail_id": _voicemail,
    "customer_id": _customer,
    "field_id": _field,
    "import_id": _import,
    "ticket_id": _ticket,
    "session_id": _supervision_session,
}


async def _screen_pop_query(f: Factory, owned: Owned) -> dict[str, str]:
    """A's customer's number: B's screen pop must find nobody."""
    await _customer(f, owned)
    phone = next(s for s in owned.secrets if s.startswith("+86"))
    return {"phone": phone}


QUERY_FACTORIES: dict[str, Callable[[Factory, Owned], Awaitable[dict[str, str]]]] = {
    "/api/v1/customers/screen-pop": _screen_pop_query,
}
"""Routes that need query parameters to do anything, by path."""


async def _agent_role_id(f: Factory, owned: Owned) -> str:
    response = await f.client.get("/api/v1/roles", headers=owned.ctx.headers)
    return owned.keep(next(r["id"] for r in response.json() if r["name"] == "agent"))


async def _invite(f: Factory, owned: Owned) -> dict[str, Any]:
    return {
        "email": f"{unique('inv')}@{owned.ctx.slug}.test",
        "name": "Invited",
        "role_id": await _agent_role_id(f, owned),
        "team_ids": [await _team(f, owned)],
    }


async def _seat_body(f: Factory, owned: Owned) -> dict[str, Any]:
    return {"user_id": await _user(f, owned)}


async def _totp_confirm(f: Factory, owned: Owned) -> dict[str, Any]:
    response = await f.client.post("/api/v1/auth/totp", headers=owned.ctx.headers)
    assert response.status_code == 200, response.text
    owned.params["totp_secret"] = response.json()["secret"]
    return {"code": pyotp.TOTP(response.json()["secret"]).now()}


async def _totp_disable(f: Factory, owned: Owned) -> dict[str, Any]:
    body = await _totp_confirm(f, owned)
    response = await f.client.post("/api/v1/auth/totp/confirm", json=body, headers=owned.ctx.headers)
    assert response.status_code == 200, response.text
    totp = pyotp.TOTP(owned.params["totp_secret"])
    # The current step's code is spent; the next step's is inside the accepted window.
    return {"password": PASSWORD, "code": totp.at(int(time.time()) + totp.interval)}


async def _constant(body: dict[str, Any]) -> dict[str, Any]:
    return body


async def _queue_body(f: Factory, owned: Owned) -> dict[str, Any]:
    """A queue that points at A's skill, hours and another queue of A's: B must not be able to use them."""
    return {
        "name": unique("queue"),
        "strategy": "best_skill",
        "business_hours_id": await _hours(f, owned),
        "overflow_action": {"type": "queue", "queue_id": await _queue(f, owned)},
        "skills": [{"skill_id": await _skill(f, owned), "steps": [{"after_seconds": 0, "min_level": 5}]}],
    }


async def _queue_ref(f: Factory, owned: Owned) -> dict[str, Any]:
    return {"channel": "webchat", "queue_id": await _queue(f, owned)}


async def _agent_profile_body(f: Factory, owned: Owned) -> dict[str, Any]:
    return {"capacity": {"voice": 1, "webchat": 2}, "skills": [{"skill_id": await _skill(f, owned), "level": 7}]}


async def _hours_body(f: Factory, owned: Owned) -> dict[str, Any]:
    return {
        "name": unique("hours"),
        "weekly": [{"day": 0, "start": "08:00", "end": "12:00"}, {"day": 0, "start": "13:00", "end": "17:00"}],
        "holidays": [{"date": "2026-12-25", "name": "Christmas"}],
        "exceptions": [{"date": "2026-12-24", "ranges": [{"start": "08:00", "end": "12:00"}]}],
    }


async def _number_routing(f: Factory, owned: Owned) -> dict[str, Any]:
    """Point the number at another of A's queues: B must not be able to name it."""
    return {"queue_id": await _queue(f, owned), "label": "Main line"}


async def _flow_body(f: Factory, owned: Owned) -> dict[str, Any]:
    """A flow naming A's queue, hours and prompt: B must not be able to save it."""
    prompt = await _prompt(f, owned)
    return {
        "name": unique("flow"),
        "graph": {
            "start": "hours",
            "nodes": {
                "hours": {"type": "hours", "business_hours_id": await _hours(f, owned), "open": "hi", "closed": "q"},
                "hi": {"type": "play", "prompt": {"kind": "file", "prompt_id": prompt}, "next": "q"},
                "q": {"type": "queue", "queue_id": await _queue(f, owned)},
            },
        },
    }


async def _queue_voice_body(f: Factory, owned: Owned) -> dict[str, Any]:
    """Voice settings naming A's music: B must not be able to use it."""
    music = await MediaFactory(f).prompt(owned.ctx, kind="music")
    owned.keep(music["name"])
    return {"music_on_hold_id": owned.keep(music["id"]), "recording_policy": "on_demand"}


async def _outbound_check(f: Factory, owned: Owned) -> dict[str, Any]:
    """A French destination, with A's own number as caller id (B owns no number)."""
    await MediaFactory(f).outbound_route("+33")
    number = await f.number(owned.ctx)
    return {"destination": "+33142685300", "caller_id": owned.keep(number["number"])}


async def _outbound_call(f: Factory, owned: Owned) -> dict[str, Any]:
    """Click-to-call by A's owner (phone registered on a live node) naming A's number, customer and queue."""
    from datetime import timedelta

    from backend.channels.voice.models import Registration
    from backend.db.base import utcnow

    await MediaFactory(f).outbound_route("+33")
    number = await f.number(owned.ctx)
    node = await f.switch_node()
    await f.app.state.voice.heartbeat(node["id"])
    async with tenant_transaction(f.app.state.sessionmaker, owned.ctx.tenant_id) as session:
        session.add(
            Registration(
                tenant_id=owned.ctx.tenant_id,
                user_id=owned.ctx.owner_id,
                node_id=node["id"],
                sip_username=unique("seat"),
                contact="sip:seat@127.0.0.1:5090",
                registered_at=utcnow(),
                expires_at=utcnow() + timedelta(hours=1),
            )
        )
    customer = await f.customer(owned.ctx)
    owned.keep(customer["name"])
    return {
        "destination": "+33142685300",
        "caller_id": owned.keep(number["number"]),
        "customer_id": owned.keep(customer["id"]),
        "queue_id": await _queue(f, owned),
    }


async def _call_transfer(f: Factory, owned: Owned) -> dict[str, Any]:
    """A transfer to A's queue: B must not be able to send a call there."""
    return {"target": "queue", "queue_id": await _queue(f, owned)}


async def _customer_body(f: Factory, owned: Owned) -> dict[str, Any]:
    """A customer in A's business unit: B must not be able to use A's team."""
    return {"name": "New Customer", "phones": ["+8613900001111"], "team_id": await _team(f, owned)}


async def _merge_body(f: Factory, owned: Owned) -> dict[str, Any]:
    source = await f.customer(owned.ctx)
    owned.keep(source["name"])
    return {"source_id": owned.keep(source["id"]), "source_version": source["version"]}


async def _ticket_body(f: Factory, owned: Owned) -> dict[str, Any]:
    customer = await f.customer(owned.ctx)
    owned.keep(customer["name"])
    return {
        "subject": "Refund",
        "priority": "high",
        "customer_id": owned.keep(customer["id"]),
        "assignee_team_id": await _team(f, owned),
    }


BODY_FACTORIES: dict[type, BodyFactory] = {
    tenant_schemas.TenantUpdate: lambda f, o: _constant({"name": "Renamed Company"}),
    tenant_schemas.InviteRequest: _invite,
    tenant_schemas.UserUpdate: lambda f, o: _constant({"name": "Renamed Person"}),
    tenant_schemas.RoleCreate: lambda f, o: _constant({"name": unique("role"), "permissions": ["users:read"]}),
    tenant_schemas.RoleUpdate: lambda f, o: _constant({"description": "changed"}),
    tenant_schemas.TeamCreate: lambda f, o: _constant({"name": unique("team")}),
    tenant_schemas.TeamUpdate: lambda f, o: _constant({"description": "changed"}),
    tenant_schemas.SeatCreate: _seat_body,
    auth_schemas.ApiKeyCreate: lambda f, o: _constant({"name": unique("key"), "scopes": ["users:read"]}),
    auth_schemas.PasswordChange: lambda f, o: _constant(
        {"current_password": PASSWORD, "new_password": "A-Brand-New-Passphrase-77"}
    ),
    auth_schemas.TotpConfirm: _totp_confirm,
    auth_schemas.TotpDisable: _totp_disable,
    routing_schemas.SkillIn: lambda f, o: _constant({"name": unique("skill")}),
    routing_schemas.SkillPatch: lambda f, o: _constant({"description": "changed"}),
    routing_schemas.BusinessHoursIn: _hours_body,
    routing_schemas.QueueIn: _queue_body,
    routing_schemas.AgentProfileIn: _agent_profile_body,
    routing_schemas.CodeIn: lambda f, o: _constant({"code": unique("c"), "label": "Label"}),
    routing_schemas.CodePatch: lambda f, o: _constant({"label": "Changed", "active": False}),
    routing_schemas.AgentStateChange: lambda f, o: _constant({"state": "offline"}),
    routing_schemas.InteractionCreate: _queue_ref,
    routing_schemas.InteractionEnd: lambda f, o: _constant({"outcome": "handled"}),
    routing_schemas.CallbackRequest: lambda f, o: _constant({"number": "+33142685300"}),
    voice_schemas.NumberRouting: _number_routing,
    routing_schemas.IvrFlowIn: _flow_body,
    voice_schemas.PromptPatch: lambda f, o: _constant({"name": unique("renamed")}),
    voice_schemas.QueueVoiceSettingsIn: _queue_voice_body,
    voice_schemas.OutboundCheckIn: _outbound_check,
    call_schemas.CallTransfer: _call_transfer,
    outbound_call_schemas.OutboundCallIn: _outbound_call,
    call_schemas.RecordingControl: lambda f, o: _constant({"action": "pause"}),
    call_schemas.SupervisionMode: lambda f, o: _constant({"mode": "whisper"}),
    customer_schemas.CustomerCreate: _customer_body,
    customer_schemas.CustomerUpdate: lambda f, o: _constant({"name": "Renamed Customer", "tags": ["vip"]}),
    customer_schemas.MergeRequest: _merge_body,
    customer_schemas.NoteCreate: lambda f, o: _constant({"body": "Called about the invoice"}),
    customer_schemas.CustomerSettingsUpdate: lambda f, o: _constant({"default_region": "CN"}),
    customer_schemas.FieldCreate: lambda f, o: _constant({"key": unique("k").lower(), "label": "L", "type": "number"}),
    customer_schemas.FieldUpdate: lambda f, o: _constant({"label": "Changed"}),
    customer_schemas.ImportCreate: lambda f, o: _constant({"mode": "skip", "match_on": ["phone"]}),
    customer_schemas.TicketCreate: _ticket_body,
    customer_schemas.TicketUpdate: lambda f, o: _constant({"status": "open", "priority": "urgent"}),
    customer_schemas.CommentCreate: lambda f, o: _constant({"body": "Looking into it"}),
    customer_schemas.SlaUpdate: lambda f, o: _constant({"urgent": 60}),
    auth_schemas.SsoConfigIn: lambda f, o: _constant(
        {"issuer": "https://idp.example.test", "client_id": "cc", "client_secret": "s3cret"}
    ),
}


RawBodyFactory = Callable[[Factory, Owned], Awaitable[tuple[bytes, dict[str, str]]]]


async def _audio_upload(f: Factory, owned: Owned) -> tuple[bytes, dict[str, str]]:
    return wav_bytes(), {"name": unique("prompt")}


RAW_BODY_FACTORIES: dict[str, RawBodyFactory] = {
    # Routes that stream a raw body (`opt={"raw_body": kind}`): the content and the query parameters.
    "audio": _audio_upload,
}


def _routes(app: Litestar) -> list[tuple[str, str, Any, Any]]:
    """(path, method, route, handler) for every route; framework-made OPTIONS handlers carry no data."""
    found = []
    for route in app.routes:
        if isinstance(route, HTTPRoute):
            for handler in route.route_handlers:
                methods = set(handler.http_methods)
                if methods == {"OPTIONS"}:
                    continue
                for method in sorted(methods):
                    found.append((route.path, method, route, handler))
        elif isinstance(route, WebSocketRoute):
            found.append((route.path, "WEBSOCKET", route, route.route_handler))
    return found


def _route_id(item: tuple[str, str, Any, Any]) -> str:
    return f"{item[1]} {item[0]}"


def _app_routes() -> list[tuple[str, str, Any, Any]]:
    from backend.app import create_app

    return _routes(create_app())


ROUTES = _app_routes()


def test_every_route_is_classified():
    """A route that does not say who may call it fails here; tenant routes must name a permission."""
    unclassified = [_route_id(r) for r in ROUTES if r[3].opt.get("access") not in ACCESS_KINDS]
    assert not unclassified, f"routes without a valid `access`: {unclassified}"
    no_permission = [
        _route_id(r) for r in ROUTES if r[3].opt.get("access") == "tenant" and not r[3].opt.get("permission")
    ]
    assert not no_permission, f"tenant routes without a `permission`: {no_permission}"


def test_every_parameter_and_body_has_a_factory():
    """New path parameters and body types need a registered factory before they can ship."""
    missing = []
    for path, method, route, handler in ROUTES:
        if handler.opt.get("access") != "tenant":
            continue
        for name in route.path_parameters:
            if name not in PATH_PARAMETER_FACTORIES:
                missing.append(f"{method} {path}: path parameter {name}")
        data = handler.parsed_fn_signature.parameters.get("data")
        if data is not None and data.annotation not in BODY_FACTORIES:
            missing.append(f"{method} {path}: body {data.annotation}")
        raw = handler.opt.get("raw_body")
        if raw is not None and raw not in RAW_BODY_FACTORIES:
            missing.append(f"{method} {path}: raw body {raw}")
    assert not missing, "\n".join(missing)


async def _prepare(
    factory: Factory, owner: TenantCtx, route: Any, handler: Any
) -> tuple[str, dict[str, Any] | None, Owned]:
    owned = Owned(owner, route_path=route.path)
    owned.keep(owner.tenant_id)
    owned.keep(owner.slug)
    owned.keep(owner.owner_email)
    owned.keep(owner.owner_id)
    path = route.path
    for name in route.path_parameters:
        value = await PATH_PARAMETER_FACTORIES[name](factory, owned)
        path = re.sub(r"\{" + name + r"(:[^}]*)?\}", value, path)
    if route.path in QUERY_FACTORIES:
        owned.query = await QUERY_FACTORIES[route.path](factory, owned)
    body = None
    data = handler.parsed_fn_signature.parameters.get("data")
    if data is not None:
        body = await BODY_FACTORIES[data.annotation](factory, owned)
    if handler.opt.get("raw_body"):
        owned.content, query = await RAW_BODY_FACTORIES[handler.opt["raw_body"]](factory, owned)
        owned.query.update(query)
    return path, body, owned


def _assert_no_leak(text: str, owned: Owned, label: str) -> None:
    leaked = sorted(s for s in owned.secrets if s and s in text)
    assert not leaked, f"{label} leaked tenant A's data {leaked}: {text[:500]}"


TENANT_HTTP = [r for r in ROUTES if r[3].opt.get("access") == "tenant" and r[1] != "WEBSOCKET"]


@pytest.mark.parametrize("item", TENANT_HTTP, ids=[_route_id(r) for r in TENANT_HTTP])
async def test_tenant_route_refuses_another_tenant(item, factory: Factory):
    """ASVS V8.2.2/V8.3.1: tenant B gets 403/404 on tenant A's objects and never sees A's data; A succeeds."""
    path_template, method, route, handler = item
    a = await factory.tenant()
    b = await factory.tenant()
    path, body, owned = await _prepare(factory, a, route, handler)

    payload: dict[str, Any] = {"content": owned.content} if owned.content is not None else {"json": body}
    payload["params"] = owned.query
    as_b = await factory.client.request(method, path, headers={**owned.headers, **b.headers}, **payload)
    # The problem's `instance` repeats the path B asked for, a screen pop the address B looked up:
    # that is B's own input, not A's data.
    echoed = as_b.text.replace(path, "")
    for value in owned.query.values():
        echoed = echoed.replace(value, "")
    _assert_no_leak(echoed, owned, f"{method} {path_template} as tenant B")
    if route.path_parameters:
        assert as_b.status_code in (403, 404), f"{method} {path_template} as B: {as_b.status_code} {as_b.text}"
    else:
        assert as_b.status_code < 500, as_b.text

    if handler.opt.get("raw_body") == "audio":
        payload["params"] = {**owned.query, "name": unique("prompt")}  # B's upload may have taken the name
    as_a = await factory.client.request(method, path, headers={**owned.headers, **a.headers}, **payload)
    assert 200 <= as_a.status_code < 300, f"{method} {path_template} as A: {as_a.status_code} {as_a.text}"


async def test_tenant_routes_require_credentials(factory: Factory):
    """Every tenant route answers 401 to a caller with no credentials, before touching any object."""
    for path_template, method, route, handler in TENANT_HTTP:
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path_template)
        response = await factory.client.request(method, path)
        assert response.status_code == 401, f"{method} {path_template}: {response.status_code}"
        assert response.headers["content-type"].startswith("application/problem+json")


PROVIDER_ROUTES = [r for r in ROUTES if r[3].opt.get("access") == "provider"]


@pytest.mark.parametrize("item", PROVIDER_ROUTES, ids=[_route_id(r) for r in PROVIDER_ROUTES])
async def test_provider_route_refuses_tenant_credentials(item, factory: Factory):
    """Provider operations are out of reach of every tenant credential."""
    path_template, method, route, handler = item
    a = await factory.tenant()
    path = re.sub(r"\{[^}]+\}", str(a.tenant_id), path_template)
    response = await factory.client.request(method, path, json={"reason": "x"}, headers=a.headers)
    assert response.status_code in (401, 403), f"{method} {path_template}: {response.status_code}"
    key = await factory.api_key(a)
    response = await factory.client.request(method, path, json={"reason": "x"}, headers={"X-API-Key": key["key"]})
    assert response.status_code in (401, 403), f"{method} {path_template}: {response.status_code}"


SWITCH_ROUTES = [r for r in ROUTES if r[3].opt.get("access") == "switch"]


async def test_switch_routes_refuse_a_wrong_secret(factory: Factory):
    """Only switch nodes presenting the shared secret reach the FreeSWITCH-facing routes."""
    assert SWITCH_ROUTES, "the FreeSWITCH-facing routes are gone"
    for path_template, method, _, _ in SWITCH_ROUTES:
        path = re.sub(r"\{[^}]+\}", "x", path_template)
        for headers in ({SWITCH_SECRET_HEADER: "wrong"}, {}, {"Authorization": "Basic Zm9vOmJhcg=="}):
            response = await factory.client.request(method, path, headers=headers)
            assert response.status_code in (401, 403), f"{method} {path_template}: {response.status_code}"


async def test_switch_routes_refuse_unregistered_addresses(factory: Factory, app: Litestar):
    """The right secret is not enough: the request must come from an address registered for a switch node."""
    import httpx

    secret = {SWITCH_SECRET_HEADER: app.state.settings.switch_shared_secret}
    transport = httpx.ASGITransport(app=app, client=("198.51.100.66", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as outsider:
        for path_template, method, _, _ in SWITCH_ROUTES:
            path = re.sub(r"\{[^}]+\}", "x", path_template)
            response = await outsider.request(method, path, headers=secret, content=b"section=directory")
            assert response.status_code == 403, f"{method} {path_template}: {response.status_code}"


async def test_switch_routes_answer_for_the_domain_asked_only(factory: Factory, app: Litestar):
    """A directory request for tenant A's domain naming a SIP user only tenant B has finds nothing;
    A's own seat is found, with A's tenant id and nothing of B's."""
    from tests.support.freeswitch_captures import rewrite_form, xml_curl_body

    node = await factory.switch_node(name=unique("fs-walk-"), sources=["127.0.0.1"])
    a = await factory.tenant()
    b = await factory.tenant()
    seat_a = await factory.sip_seat(a)
    await factory.sip_seat(b)
    seat_b = await factory.sip_seat(b)
    secret = {SWITCH_SECRET_HEADER: app.state.settings.switch_shared_secret}
    for seat, tenant, found in ((seat_b, b, False), (seat_a, a, True)):
        body = rewrite_form(
            xml_curl_body("c05_directory_sip_auth_register_1001.request.txt"),
            {
                "hostname": node["name"],
                "key_value": seat_a["domain"],
                "domain": seat_a["domain"],
                "user": seat["username"],
                "sip_auth_username": seat["username"],
                "sip_auth_realm": seat_a["domain"],
            },
        )
        response = await factory.client.post("/api/v1/switch/directory", content=body, headers=secret)
        assert response.status_code == 200
        assert (b"a1-hash" in response.content) is found
        assert str(b.tenant_id).encode() not in response.content
        if found:
            assert str(a.tenant_id).encode() in response.content


TENANT_WS = [r for r in ROUTES if r[3].opt.get("access") == "tenant" and r[1] == "WEBSOCKET"]


@pytest.mark.parametrize("item", TENANT_WS, ids=[_route_id(r) for r in TENANT_WS])
async def test_tenant_websocket_is_scoped(item, factory: Factory, app: Litestar):
    """A WebSocket opens only with credentials, and only ever speaks for the caller's own tenant and user."""
    path_template, _, route, handler = item
    a = await factory.tenant()
    b = await factory.tenant()
    path, _, owned = await _prepare(factory, a, route, handler)

    async with websocket_connect(app, path) as socket:
        first = await socket.receive_message()
        assert first["type"] == "websocket.close", first

    ticket_b = (await factory.client.post("/api/v1/auth/ws-ticket", headers=b.headers)).json()["ticket"]
    async with websocket_connect(app, path, query=f"ticket={ticket_b}") as socket:
        first = await socket.receive_message()
        if route.path_parameters:
            assert first["type"] == "websocket.close", first
        else:
            assert first["type"] == "websocket.accept", first
            hello = await socket.receive_json()
            _assert_no_leak(str(hello), owned, f"WS {path_template} as B")
            assert hello["user_id"] == str(b.owner_id)

    ticket_a = (await factory.client.post("/api/v1/auth/ws-ticket", headers=a.headers)).json()["ticket"]
    async with websocket_connect(app, path, query=f"ticket={ticket_a}") as socket:
        assert (await socket.receive_message())["type"] == "websocket.accept"
        assert (await socket.receive_json())["user_id"] == str(a.owner_id)
        await socket.send_json({"type": "ping"})
        assert (await socket.receive_json()) == {"type": "pong"}


def test_handlers_are_known_kinds():
    """The walk understands every kind of handler the app has."""
    for _, _, _, handler in ROUTES:
        assert isinstance(handler, HTTPRouteHandler | WebsocketRouteHandler)
