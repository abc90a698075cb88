"""Factories: real tenants, users and credentials made through the services and the API."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
from litestar import Litestar

from backend.auth.principal import Principal
from backend.db.engine import tenant_transaction
from backend.tenants import service
from backend.tenants.permissions import PERMISSIONS
from backend.tenants.schemas import SignupRequest

PASSWORD = "Correct-Horse-Battery-Staple-42"
_counter = itertools.count(1)
_numbers = itertools.count(int(uuid.uuid4().int % 50_000_000) + 10_000_000)


def unique(prefix: str) -> str:
    """A name no other test uses in this run."""
    return f"{prefix}{next(_counter)}x{uuid.uuid4().hex[:6]}"


@dataclass
class TenantCtx:
    """A tenant made for a test, its owner, and an owner access token."""

    tenant_id: uuid.UUID
    slug: str
    owner_id: uuid.UUID
    owner_email: str
    token: str = ""
    refresh_token: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """Authorization headers of the owner."""
        return {"Authorization": f"Bearer {self.token}"}

    def system(self) -> Principal:
        """An all-permissions principal of this tenant, for calling services directly."""
        return Principal(
            kind="user", tenant_id=self.tenant_id, user_id=self.owner_id, permissions=frozenset(PERMISSIONS)
        )


class Factory:
    """Creates test objects; each one through the same code path the product uses."""

    def __init__(self, app: Litestar, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.sessionmaker = app.state.sessionmaker
        self.settings = app.state.settings

    async def tenant(self, *, plan: str = "team", login: bool = True, time_zone: str = "Europe/Paris") -> TenantCtx:
        """A new tenant via signup, with its owner signed in."""
        slug = unique("t")
        email = f"owner@{slug}.test"
        async with self.sessionmaker() as session, session.begin():
            result = await service.signup(
                session,
                SignupRequest(
                    company_name=f"Company {slug}",
                    slug=slug,
                    admin_email=email,
                    admin_name="Owner Person",
                    password=PASSWORD,
                    time_zone=time_zone,
                    plan=plan,
                ),
                self.settings,
            )
        ctx = TenantCtx(result.tenant.id, slug, result.owner_id, email)
        if login:
            ctx.token, ctx.refresh_token = await self.login(slug, email)
        return ctx

    async def login(self, slug: str, email: str, password: str = PASSWORD, **extra: Any) -> tuple[str, str]:
        """Sign in through the API; returns (access token, refresh token)."""
        response = await self.client.post(
            "/api/v1/auth/login", json={"workspace": slug, "email": email, "password": password, **extra}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return body["access_token"], body["refresh_token"]

    async def user(self, ctx: TenantCtx, *, role: str = "agent", login: bool = False) -> dict[str, Any]:
        """An active user of the tenant with a password; optionally signed in (`token`)."""
        email = f"{unique('u')}@{ctx.slug}.test"
        async with tenant_transaction(self.sessionmaker, ctx.tenant_id) as session:
            user = await service.create_user(
                session,
                tenant_id=ctx.tenant_id,
                email=email,
                name="Some User",
                role_name=role,
                password=PASSWORD,
                verified=True,
            )
        out: dict[str, Any] = {"id": user.id, "email": email}
        if login:
            out["token"], out["refresh_token"] = await self.login(ctx.slug, email)
            out["headers"] = {"Authorization": f"Bearer {out['token']}"}
        return out

    async def team(self, ctx: TenantCtx) -> uuid.UUID:
        """A team of the tenant."""
        response = await self.client.post("/api/v1/teams", json={"name": unique("team")}, headers=ctx.headers)
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def role(self, ctx: TenantCtx, permissions: list[str] | None = None) -> uuid.UUID:
        """A custom role of the tenant."""
        response = await self.client.post(
            "/api/v1/roles",
            json={"name": unique("role"), "permissions": permissions or ["users:read"]},
            headers=ctx.headers,
        )
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def seat(self, ctx: TenantCtx) -> uuid.UUID:
        """A seat bound to a new agent."""
        agent = await self.user(ctx)
        response = await self.client.post("/api/v1/seats", json={"user_id": str(agent["id"])}, headers=ctx.headers)
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["seat"]["id"])

    async def api_key(self, ctx: TenantCtx, scopes: list[str] | None = None) -> dict[str, Any]:
        """An API key of the tenant's owner."""
        response = await self.client.post(
            "/api/v1/api-keys", json={"name": unique("key"), "scopes": scopes or ["users:read"]}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def provider_token(self) -> str:
        """A provider operator's access token."""
        from backend.demo import ensure_provider_user

        email = f"{unique('ops')}@provider.test"
        await ensure_provider_user(email, "Ops", PASSWORD)
        response = await self.client.post("/api/v1/ops/auth/login", json={"email": email, "password": PASSWORD})
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    async def skill(self, ctx: TenantCtx) -> uuid.UUID:
        """A routing skill of the tenant."""
        response = await self.client.post("/api/v1/routing/skills", json={"name": unique("skill")}, headers=ctx.headers)
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def business_hours(self, ctx: TenantCtx) -> uuid.UUID:
        """Weekday 09:00-18:00 business hours in the tenant's time zone."""
        weekly = [{"day": day, "start": "09:00", "end": "18:00"} for day in range(5)]
        response = await self.client.post(
            "/api/v1/routing/business-hours", json={"name": unique("hours"), "weekly": weekly}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def agent_skills(self, ctx: TenantCtx, user_id: uuid.UUID, levels: dict[uuid.UUID, int]) -> None:
        """Set an agent's skills (skill id -> level 1 to 10) through the routing API."""
        response = await self.client.put(
            f"/api/v1/routing/agents/{user_id}",
            json={"skills": [{"skill_id": str(skill), "level": level} for skill, level in levels.items()]},
            headers=ctx.headers,
        )
        assert response.status_code == 200, response.text

    async def queue(self, ctx: TenantCtx, **settings: Any) -> uuid.UUID:
        """A queue of the tenant."""
        response = await self.client.post(
            "/api/v1/routing/queues", json={"name": unique("queue"), **settings}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def code(self, ctx: TenantCtx, catalogue: str) -> uuid.UUID:
        """A wrap-up code (`wrap-up-codes`) or pause reason (`pause-reasons`)."""
        response = await self.client.post(
            f"/api/v1/routing/{catalogue}", json={"code": unique("c"), "label": "Some label"}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def seated_agent(self, ctx: TenantCtx) -> dict[str, Any]:
        """A signed-in agent holding a seat, ready to go available."""
        agent = await self.user(ctx, login=True)
        response = await self.client.post("/api/v1/seats", json={"user_id": str(agent["id"])}, headers=ctx.headers)
        assert response.status_code == 201, response.text
        return agent

    async def offered_interaction(self, ctx: TenantCtx, channel: str = "webchat") -> uuid.UUID:
        """An interaction offered to the tenant's owner (seated and available)."""
        if not ctx.extra.get("owner_available"):
            seat = await self.client.post("/api/v1/seats", json={"user_id": str(ctx.owner_id)}, headers=ctx.headers)
            assert seat.status_code in (201, 409), seat.text
            state = await self.client.put("/api/v1/routing/me/state", json={"state": "available"}, headers=ctx.headers)
            assert state.status_code == 200, state.text
            ctx.extra["owner_available"] = True
        queue = await self.queue(ctx)
        response = await self.client.post(
            "/api/v1/interactions", json={"channel": channel, "queue_id": str(queue)}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["state"] == "offered", body
        return uuid.UUID(body["id"])

    async def waiting_interaction(self, ctx: TenantCtx, channel: str = "voice") -> uuid.UUID:
        """An interaction waiting in a queue that needs a skill nobody has."""
        skill = await self.skill(ctx)
        queue = await self.queue(
            ctx, skills=[{"skill_id": str(skill), "steps": [{"after_seconds": 0, "min_level": 10}]}]
        )
        response = await self.client.post(
            "/api/v1/interactions", json={"channel": channel, "queue_id": str(queue)}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        assert response.json()["state"] == "queued", response.text
        return uuid.UUID(response.json()["id"])

    async def provider_headers(self) -> dict[str, str]:
        """A provider operator's authorization headers (one operator per run)."""
        token = self.__dict__.get("_provider_token")
        if token is None:
            token = await self.provider_token()
            self.__dict__["_provider_token"] = token
        return {"Authorization": f"Bearer {token}"}

    async def number(self, ctx: TenantCtx, *, queue_id: uuid.UUID | None = None) -> dict[str, Any]:
        """A number of the provider's pool assigned to the tenant, optionally pointed at a queue."""
        ops = await self.provider_headers()
        e164 = f"+331{next(_numbers):08d}"
        response = await self.client.post("/api/v1/ops/numbers", json={"number": e164}, headers=ops)
        assert response.status_code == 201, response.text
        number_id = response.json()["id"]
        response = await self.client.post(
            f"/api/v1/ops/numbers/{number_id}/assign", json={"tenant_id": str(ctx.tenant_id)}, headers=ops
        )
        assert response.status_code == 200, response.text
        if queue_id is not None:
            response = await self.client.patch(
                f"/api/v1/voice/numbers/{number_id}", json={"queue_id": str(queue_id)}, headers=ctx.headers
            )
            assert response.status_code == 200, response.text
        return {"id": uuid.UUID(number_id), "number": e164}

    async def switch_node(
        self,
        *,
        name: str | None = None,
        sources: list[str] | None = None,
        esl_port: int = 8021,
        esl_password: str = "ClueCon",
    ) -> dict[str, Any]:
        """A registered switch node (by default reachable from the test client's address, 127.0.0.1)."""
        ops = await self.provider_headers()
        body = {
            "name": name or unique("fs-node-"),
            "esl_host": "127.0.0.1",
            "esl_port": esl_port,
            "esl_password": esl_password,
            "xml_curl_sources": sources or ["127.0.0.1"],
        }
        response = await self.client.post("/api/v1/ops/switch-nodes", json=body, headers=ops)
        assert response.status_code == 201, response.text
        node: dict[str, Any] = response.json()
        node["id"] = uuid.UUID(node["id"])
        return node

    async def sip_seat(self, ctx: TenantCtx) -> dict[str, Any]:
        """An agent with a seat and its SIP credentials (shown once, at assignment)."""
        agent = await self.user(ctx)
        response = await self.client.post("/api/v1/seats", json={"user_id": str(agent["id"])}, headers=ctx.headers)
        assert response.status_code == 201, response.text
        body = response.json()
        return {
            "user_id": agent["id"],
            "seat_id": uuid.UUID(body["seat"]["id"]),
            "username": body["seat"]["sip_username"],
            "domain": body["seat"]["sip_domain"],
            "password": body["sip_password"],
        }

    # --- customer store ---------------------------------------------------------------------------

    async def customer(self, ctx: TenantCtx, headers: dict[str, str] | None = None, **fields: Any) -> dict[str, Any]:
        """A customer record made through the API; the body plus its `etag`."""
        body = {"name": f"Customer {unique('c')}", "phones": [f"+86138{next(_counter) % 100_000_000:08d}"], **fields}
        response = await self.client.post("/api/v1/customers", json=body, headers=headers or ctx.headers)
        assert response.status_code == 201, response.text
        out: dict[str, Any] = response.json()
        out["etag"] = response.headers["etag"]
        return out

    async def customer_field(self, ctx: TenantCtx, **fields: Any) -> dict[str, Any]:
        """A custom field of the tenant's customer records."""
        body = {"key": unique("f").lower(), "label": "Some field", "type": "text", **fields}
        response = await self.client.post("/api/v1/customer-store/fields", json=body, headers=ctx.headers)
        assert response.status_code == 201, response.text
        out: dict[str, Any] = response.json()
        return out

    async def ticket(self, ctx: TenantCtx, **fields: Any) -> dict[str, Any]:
        """A ticket of the tenant; the body plus its `etag`."""
        response = await self.client.post(
            "/api/v1/tickets", json={"subject": "Printer on fire", **fields}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        out: dict[str, Any] = response.json()
        out["etag"] = response.headers["etag"]
        return out

    async def customer_import(self, ctx: TenantCtx, **options: Any) -> uuid.UUID:
        """An import waiting for its file."""
        response = await self.client.post("/api/v1/customer-imports", json=options, headers=ctx.headers)
        assert response.status_code == 201, response.text
        return uuid.UUID(response.json()["id"])

    async def member(self, ctx: TenantCtx, team_id: uuid.UUID, *, role: str = "agent") -> dict[str, Any]:
        """A signed-in user of `role` who belongs to `team_id`."""
        user = await self.user(ctx, role=role, login=True)
        response = await self.client.put(f"/api/v1/teams/{team_id}/members/{user['id']}", headers=ctx.headers)
        assert response.status_code in (200, 201, 204), response.text
        # Team membership is read at request time, the token need not change.
        return user


def wav_bytes(seconds: float = 0.25, rate: int = 8000, channels: int = 1, tone: int = 440) -> bytes:
    """A real WAV file (16-bit PCM sine), as FreeSWITCH's record_session writes them."""
    import io
    import math
    import struct
    import wave

    frames = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * tone * i / rate))) * channels for i in range(frames)
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples)
    return buffer.getvalue()


def mp3_bytes(frames: int = 40) -> bytes:
    """MPEG-1 layer III frames (128 kbit/s, 44.1 kHz, silent), behind an ID3v2 tag."""
    header = bytes([0xFF, 0xFB, 0x90, 0x64])
    frame = header + bytes(417 - 4)  # 144 * 128000 / 44100 = 417 bytes, no padding
    tag = b"ID3\x04\x00\x00" + bytes([0, 0, 0, 10]) + bytes(10)
    return tag + frame * frames


TONE_FLOW: dict[str, Any] = {
    "start": "hello",
    "nodes": {
        "hello": {"type": "play", "prompt": {"kind": "tts", "text": "Hello"}, "next": "bye"},
        "bye": {"type": "hangup"},
    },
}


class MediaFactory:
    """Prompts, flows, recordings and voicemail made through the product's routes and services."""

    def __init__(self, factory: Factory) -> None:
        self.f = factory

    async def switch_headers(self) -> dict[str, str]:
        """The switch secret, with a node registered for the test client's address (127.0.0.1)."""
        if not self.f.__dict__.get("_media_node"):
            await self.f.switch_node(sources=["127.0.0.1/32"])
            self.f.__dict__["_media_node"] = True
        return {"x-switch-secret": self.f.settings.switch_shared_secret}

    async def prompt(self, ctx: TenantCtx, *, kind: str = "prompt", content: bytes | None = None) -> dict[str, Any]:
        """An uploaded prompt of the tenant."""
        response = await self.f.client.post(
            "/api/v1/voice/prompts",
            params={"name": unique("prompt"), "kind": kind},
            content=content or wav_bytes(),
            headers={**ctx.headers, "content-type": "audio/wav"},
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def flow(self, ctx: TenantCtx, graph: dict[str, Any] | None = None, *, publish: bool = True) -> uuid.UUID:
        """An IVR flow of the tenant, published unless told otherwise."""
        response = await self.f.client.post(
            "/api/v1/routing/ivr-flows", json={"name": unique("flow"), "graph": graph or TONE_FLOW}, headers=ctx.headers
        )
        assert response.status_code == 201, response.text
        flow_id = uuid.UUID(response.json()["id"])
        if publish:
            published = await self.f.client.post(f"/api/v1/routing/ivr-flows/{flow_id}/publish", headers=ctx.headers)
            assert published.status_code == 201, published.text
        return flow_id

    async def recording(self, ctx: TenantCtx, content: bytes | None = None) -> uuid.UUID:
        """A stored recording of a call in a queue that always records."""
        from backend.channels.voice import recordings

        queue = await self.f.queue(ctx)
        response = await self.f.client.put(
            f"/api/v1/voice/queues/{queue}/settings", json={"recording_policy": "always"}, headers=ctx.headers
        )
        assert response.status_code == 200, response.text
        async with tenant_transaction(self.f.sessionmaker, ctx.tenant_id) as session:
            target = await recordings.begin_recording(
                session, self.f.settings, ctx.tenant_id, queue_id=queue, call_uuid=uuid.uuid4()
            )
        path = target.upload_url.split("://", 1)[1].split("/", 1)[1]
        response = await self.f.client.put(
            "/" + path, content=content or wav_bytes(), headers=await self.switch_headers()
        )
        assert response.status_code == 200, response.text
        return target.id

    async def voicemail(self, ctx: TenantCtx, *, agent_id: uuid.UUID | None = None) -> uuid.UUID:
        """A stored voicemail in a queue's box (or an agent's)."""
        desk = self.f.app.state.voicemail
        queue = None if agent_id else await self.f.queue(ctx)
        target = await desk.begin(ctx.tenant_id, queue_id=queue, agent_id=agent_id, caller_number="+33612345678")
        path = target.upload_url.split("://", 1)[1].split("/", 1)[1]
        response = await self.f.client.put("/" + path, content=wav_bytes(), headers=await self.switch_headers())
        assert response.status_code == 200, response.text
        return target.id

    async def outbound_route(self, prefix: str = "+33") -> str:
        """A carrier gateway carrying a prefix (one per prefix per run)."""
        key = f"_route{prefix}"
        if key not in self.f.__dict__:
            ops = await self.f.provider_headers()
            name = unique("carrier-")
            gateway = await self.f.client.post("/api/v1/ops/carrier-gateways", json={"name": name}, headers=ops)
            assert gateway.status_code == 201, gateway.text
            route = await self.f.client.post(
                "/api/v1/ops/outbound-routes", json={"prefix": prefix, "gateway_id": gateway.json()["id"]}, headers=ops
            )
            assert route.status_code == 201, route.text
            self.f.__dict__[key] = name
        name_: str = self.f.__dict__[key]
        return name_
