"""The call-control rig: the backend over HTTP, a simulated node held by the links, a call-control server.

Everything runs the production code path over real sockets on 127.0.0.1: the
simulator fetches the dialplan and the directory from our xml_curl routes,
prompts from our switch media route (http_cache) and uploads recordings to it
(http_put, with the switch secret as its profile's header); its inbound event
socket is held by `SwitchLinks` (registrations, CDRs); the dialplan hands each
call to a `CallControlServer` on a free port. Routing's timers run as in a
worker. Only intervals are shortened, through settings and the simulator's
time scale.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from backend.channels.voice.call_control import CallControlServer, CallServices, CallStore
from backend.channels.voice.esl_config import client_config
from backend.channels.voice.media import PromptPlayer
from backend.channels.voice.models import CallLeg
from backend.channels.voice.recordings import CustomerStoreTickets, VoicemailDesk
from backend.channels.voice.simulator import Endpoint, SimulatorConfig, SwitchSimulator
from backend.config import Settings
from backend.db.engine import tenant_transaction
from tests.channels.voice.rig import BackendServer, eventually
from tests.channels.voice.test_links import holding
from tests.factories import Factory, TenantCtx, unique

SHORT_CALL_CONTROL: dict[str, Any] = {
    "call_control_lease_seconds": 1.5,
    "call_control_renew_seconds": 0.3,
    "call_control_sweep_seconds": 0.3,
    "call_control_offer_poll_seconds": 0.3,
    "call_control_request_timeout_seconds": 5.0,
    "call_control_adopted_poll_seconds": 0.2,
    "call_control_announcement_scale": 0.05,
    "call_control_transfer_ring_seconds": 20,
    "call_control_upload_wait_seconds": 0.5,
    "call_control_upload_attempts": 2,
}
TIME_SCALE = 0.02
"""The simulator's clock: a 2 s prompt lasts 40 ms, a 20 s ring 0.4 s."""


def call_control_settings(settings: Settings, backend: BackendServer, **overrides: Any) -> Settings:
    """The application's settings with short call-control intervals and the switch media at the test server."""
    return replace(settings, **{**SHORT_CALL_CONTROL, "switch_media_base_url": backend.url, **overrides})


def services_for(app: Any, settings: Settings, store: CallStore | None = None) -> CallServices:
    """Call control's services on the application's own clients (as the process builds them)."""
    state = app.state
    return CallServices(
        settings=settings,
        sessionmaker=state.sessionmaker,
        routing=state.routing,
        voice=state.voice,
        player=PromptPlayer(settings),
        voicemail=VoicemailDesk(
            state.sessionmaker, state.storage, settings, state.routing, CustomerStoreTickets(state.sessionmaker)
        ),
        outbound=state.outbound,
        store=store or CallStore(state.redis, settings),
    )


@dataclass
class Agent:
    """A signed-in agent with a seat whose phone is registered on the simulated node."""

    user_id: uuid.UUID
    headers: dict[str, str]
    username: str
    domain: str


@dataclass
class CallRig:
    """One simulated node, its links, a call-control server; tests make tenants, agents and calls on it."""

    app: Any
    client: Any
    factory: Factory
    backend: BackendServer
    simulator: SwitchSimulator
    node: dict[str, Any]
    settings: Settings
    control: CallControlServer
    recordings_dir: Path
    timers: asyncio.Task[None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def switch(self) -> Any:
        return self.simulator.switch

    async def agent(
        self, ctx: TenantCtx, *, behaviour: str = "answer", answer_delay: float = 0.0, available: bool = True
    ) -> Agent:
        """An agent of the tenant, seated, signed in, phone registered (voice-ready), available if asked."""
        user = await self.factory.user(ctx, login=True)
        seat = await self.client.post("/api/v1/seats", json={"user_id": str(user["id"])}, headers=ctx.headers)
        assert seat.status_code == 201, seat.text
        body = seat.json()
        agent = Agent(user["id"], user["headers"], body["seat"]["sip_username"], body["seat"]["sip_domain"])
        phone = Endpoint(agent.username, agent.domain, behaviour=behaviour, answer_delay=answer_delay)
        assert await self.switch.register(phone)
        await eventually(lambda: self._registered(agent))
        if available:
            await self.set_state(agent, "available")
        return agent

    async def _registered(self, agent: Agent) -> bool:
        state = await self.client.get("/api/v1/routing/me/state", headers=agent.headers)
        return bool(state.json().get("voice_registered"))

    async def set_state(self, agent: Agent, state: str, reason: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"state": state}
        if reason:
            body["reason"] = reason
        response = await self.client.put("/api/v1/routing/me/state", json=body, headers=agent.headers)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def agent_state(self, agent: Agent) -> str:
        return str((await self.client.get("/api/v1/routing/me/state", headers=agent.headers)).json()["state"])

    async def number(
        self, ctx: TenantCtx, *, queue_id: uuid.UUID | None = None, flow_id: uuid.UUID | None = None
    ) -> str:
        """A DID of the tenant pointed at a queue or an IVR flow."""
        number = await self.factory.number(ctx, queue_id=queue_id)
        if flow_id is not None:
            response = await self.client.patch(
                f"/api/v1/voice/numbers/{number['id']}", json={"ivr_flow_id": str(flow_id)}, headers=ctx.headers
            )
            assert response.status_code == 200, response.text
        return str(number["number"])

    async def call(self, did: str, *, caller_number: str = "+33612345678", caller_name: str = "Alice") -> str:
        """A caller dials the DID; returns the caller's leg UUID."""
        return await self.switch.place_call(did, caller_number=caller_number, caller_name=caller_name)

    async def interaction_of(self, ctx: TenantCtx, leg: str) -> dict[str, Any]:
        """The interaction call control opened for the call (found by its call UUID attribute)."""

        async def find() -> dict[str, Any] | None:
            listed = await self.client.get("/api/v1/interactions", params={"limit": 50}, headers=ctx.headers)
            for item in listed.json()["items"]:
                if item["attributes"].get("call_uuid") == leg:
                    found: dict[str, Any] = item
                    return found
            return None

        found: dict[str, Any] = await eventually(find)
        return found

    async def interaction(self, ctx: TenantCtx, interaction_id: str | uuid.UUID) -> dict[str, Any]:
        response = await self.client.get(f"/api/v1/interactions/{interaction_id}", headers=ctx.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def events(self, ctx: TenantCtx, interaction_id: str | uuid.UUID) -> list[str]:
        return [e["name"] for e in (await self.interaction(ctx, interaction_id))["timeline"]]

    async def state_is(self, ctx: TenantCtx, interaction_id: str | uuid.UUID, state: str) -> dict[str, Any] | None:
        body = await self.interaction(ctx, interaction_id)
        return body if body["state"] == state else None

    async def legs(self, ctx: TenantCtx, **where: Any) -> list[CallLeg]:
        async with tenant_transaction(self.app.state.sessionmaker, ctx.tenant_id) as session:
            statement = select(CallLeg)
            for name, value in where.items():
                statement = statement.where(getattr(CallLeg, name) == value)
            return list((await session.scalars(statement)).all())

    def gone(self, leg: str) -> bool:
        return self.switch.find(leg) is None

    def app_log(self, leg: str) -> list[tuple[str, str]]:
        """The applications a channel ran, in order (the simulator's record, kept after the channel is gone)."""
        return [
            (str(r["app"]), str(r["data"])) for r in self.switch.requests if r["kind"] == "app" and r["uuid"] == leg
        ]

    def api_commands(self, name: str) -> list[str]:
        return [str(r["argument"]) for r in self.switch.requests if r["kind"] == "api" and r["command"] == name]


@contextlib.asynccontextmanager
async def call_rig(app: Any, client: Any, factory: Factory, tmp: Path, **overrides: Any) -> AsyncIterator[CallRig]:
    """Start the backend over HTTP, a simulated node, its links, routing timers and a call-control server."""
    backend = BackendServer(app)
    await backend.start()
    settings = call_control_settings(app.state.settings, backend, **overrides)
    name = unique("fs-cc-")
    recordings = tmp / "recordings"
    config = SimulatorConfig(
        hostname=name,
        esl_port=0,
        control_port=0,
        xml_curl_directory_url=f"{backend.url}/api/v1/switch/directory",
        xml_curl_dialplan_url=f"{backend.url}/api/v1/switch/dialplan",
        xml_curl_credentials=f"{name}:{settings.switch_shared_secret}",
        cdr_url=f"{backend.url}/api/v1/switch/cdr",
        cdr_credentials=f"{name}:{settings.switch_shared_secret}",
        cdr_delay=0.1,
        cdr_err_log_dir=str(tmp / "json_cdr_err"),
        heartbeat_interval=0.5,
        time_scale=TIME_SCALE,
        answer_delay=0.0,
        recordings_dir=str(recordings),
        default_playback_seconds=10.0,
        http_cache_headers=(("x-switch-secret", settings.switch_shared_secret),),
    )
    stop = asyncio.Event()
    xml_curl = app.state.xml_curl
    before = xml_curl.call_control
    async with SwitchSimulator(config) as simulator:
        node = await factory.switch_node(name=name, esl_port=simulator.esl_port, sources=["127.0.0.1/32"])
        async with holding(app, name) as links:
            await eventually(lambda: _held(links, node["id"]))
            services = services_for(app, settings)
            control = CallControlServer(services, "127.0.0.1", 0, config=client_config(settings))
            await control.start()
            xml_curl.call_control = f"127.0.0.1:{control.port}"
            timers = asyncio.create_task(app.state.routing.run_timers(stop, 0.05))
            rig = CallRig(app, client, factory, backend, simulator, node, settings, control, recordings, timers)
            try:
                yield rig
            finally:
                xml_curl.call_control = before
                stop.set()
                await timers
                await control.close()
    await backend.stop()


async def _held(links: Any, node_id: uuid.UUID) -> bool:
    link = links.links.get(node_id)
    return link is not None and link.valid() and link.client.connected and link.stats.resyncs > 0
