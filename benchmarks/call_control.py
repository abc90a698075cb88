"""Call-control benchmark: inbound calls through IVR, queue and an agent, at a steady rate, end to end.

Run through benchmarks/run_call_control.sh, which provides PostgreSQL (55562) and Redis (56509). Prints its
figures.

Everything is the production code path over real sockets on 127.0.0.1, each part a process of its own:

* the API (`contactcenter serve`): xml_curl dialplan and directory, prompts over http_cache, mod_json_cdr posts;
* a worker (`contactcenter worker`): holds every node's inbound event socket under its Redis lease
  (registrations, CDRs from CHANNEL_HANGUP_COMPLETE, heartbeats) and runs routing's timers;
* N call-control processes (`contactcenter call-control`) listening on one address with SO_REUSEPORT;
* M simulated FreeSWITCH nodes (`contactcenter switch-sim`, real time: a 1 s ring lasts a second).

The world: `--tenants` tenants (plan `business`), each with `--agents` agents whose seats' phones register
through the simulator (digest checked over xml_curl, then `sofia::register` to the worker) and who are
available; a queue (wrap-up 0 s, so an agent is free again when the call ends) and a published IVR flow on
the tenant's number: a `play` node (TTS, about 3 s), a `menu` ("press 2", about 1 s) and the queue. Tenant k's
agents register on node k mod M and its calls arrive there (a SIP balancer keeps a tenant's calls on the
node its phones use; the simulator does not bridge between simulated nodes).

The caller side: callers dial the tenants' numbers in turn, open loop at `--rate` calls/s for `--seconds`,
through each node's control API (`POST /calls`); when the caller's channel starts the menu's
`play_and_get_digits` (seen as CHANNEL_EXECUTE on an event socket of the node, as a test harness watches a
real FreeSWITCH) the caller presses 2 (`POST /calls/<uuid>/dtmf`). Agents' phones answer after
`--ring` seconds and hang up after `--talk` seconds. Measured, from the node's events:

* calls/s placed and calls/s connected to an agent (CHANNEL_BRIDGE), concurrency (callers' channels up:
  in the IVR, waiting or talking) at its peak;
* setup latency: the moment the call was due to arrive to the agent connected (p50/p99), and the key press to
  the agent connected (queueing, matching, ringing: the ring time `--ring` is part of it);
* calls lost: refused by the node, ended before an agent answered, or still up long after they should be;
* CDRs: every leg the node hung up (CHANNEL_HANGUP_COMPLETE) against the rows in `voice_cdrs` once the run
  has drained; interactions by state and outcome (every call's must be ended as handled).

Modes: `steady` (one rate per call-control count in `--controls`) and `ramp` (rates in `--ramp`, each for
`--ramp-seconds`, per call-control count) to find where it saturates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

# This checkout's code, not whichever one the virtualenv's editable install points at.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import PASSWORD, free_port, start_server, stop_server

SECRET = "bench-switch-secret-0123456789"
KEY = os.environ.setdefault("CC_SECRET_KEY", "call-bench-application-key-0123456789abcdef")
"""One application key for every process (nodes' ESL passwords are sealed with it)."""
os.environ.setdefault("CC_SWITCH_SECRET", SECRET)
PROVIDER_EMAIL = "ops@callbench.test"
MENU_KEY = "2"
SETUP_WINDOW_SECONDS = 5.0
"""Arrivals are grouped by this many seconds to show whether setup grows through a run (saturation)."""
WELCOME = "Welcome to the benchmark company. Your call matters to us."
"""The play node's text: the simulator speaks 0.06 s a character (3.5 s)."""
MENU = "Press 2 for support."
HERE = Path(__file__).resolve().parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


# --- the world ---------------------------------------------------------------------------------------


@dataclass
class Tenant:
    tenant_id: str
    slug: str
    number: str
    node: int
    phones: list[tuple[str, str]]
    """(sip user, domain) of each agent's seat."""
    agents: list[str]


@dataclass
class World:
    nodes: list[dict[str, Any]]
    tenants: list[Tenant]


async def prepare(base: str, node_ports: list[int], tenants: int, agents: int) -> World:
    """Nodes, tenants, agents with seats, queues, published flows and numbers."""
    from sqlalchemy import select

    from backend.auth.crypto import SecretBox
    from backend.auth.principal import Principal
    from backend.channels.voice import nodes as node_service
    from backend.channels.voice import numbers
    from backend.channels.voice.schemas import NumberCreate, SwitchNodeCreate
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker, tenant_transaction
    from backend.demo import ensure_provider_user
    from backend.tenants import service
    from backend.tenants.models import ProviderUser
    from backend.tenants.permissions import PERMISSIONS
    from backend.tenants.schemas import SignupRequest

    settings = get_settings()
    await ensure_provider_user(PROVIDER_EMAIL, "Bench Operations", PASSWORD)
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    made_nodes: list[dict[str, Any]] = []
    world: list[Tenant] = []
    run = uuid.uuid4().hex[:6]
    try:
        async with sessionmaker() as session, session.begin():
            operator = await session.scalar(select(ProviderUser.id).where(ProviderUser.email == PROVIDER_EMAIL))
            ops = Principal(kind="provider", tenant_id=None, user_id=operator)
            for index, port in enumerate(node_ports):
                name = f"fs-bench-{run}-{index}"
                node = await node_service.register_node(
                    session,
                    ops,
                    SwitchNodeCreate(
                        name=name,
                        esl_host="127.0.0.1",
                        esl_port=port,
                        esl_password="ClueCon",
                        xml_curl_sources=["127.0.0.1/32"],
                        sip_address="127.0.0.1:5060",
                    ),
                    SecretBox(settings.secret_key),
                )
                made_nodes.append({"name": name, "id": str(node.id), "esl_port": port})
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            for t in range(tenants):
                slug = f"cb{run}{t}"
                async with sessionmaker() as session, session.begin():
                    signed = await service.signup(
                        session,
                        SignupRequest(
                            company_name=f"Call bench {t}",
                            slug=slug,
                            admin_email=f"owner@{slug}.example.com",
                            admin_name="Call Bench",
                            password=PASSWORD,
                            time_zone="UTC",
                            plan="business",
                        ),
                        settings,
                    )
                tenant_id, owner_id = signed.tenant.id, signed.owner_id
                phones: list[tuple[str, str]] = []
                agent_ids: list[str] = []
                async with tenant_transaction(sessionmaker, tenant_id) as session:
                    system = Principal(
                        kind="user", tenant_id=tenant_id, user_id=owner_id, permissions=frozenset(PERMISSIONS)
                    )
                    for index in range(agents):
                        agent = await service.create_user(
                            session,
                            tenant_id=tenant_id,
                            email=f"agent{index}@{slug}.example.com",
                            name=f"Agent {index}",
                            role_name="agent",
                            password=None,
                            verified=True,
                        )
                        credentials = await service.assign_seat(session, system, agent.id)
                        user, _, domain = credentials.sip_uri.removeprefix("sip:").partition("@")
                        phones.append((user, domain))
                        agent_ids.append(str(agent.id))
                login = await http.post(
                    "/api/v1/auth/login",
                    json={"workspace": slug, "email": f"owner@{slug}.example.com", "password": PASSWORD},
                )
                login.raise_for_status()
                headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
                queue = await http.post(
                    "/api/v1/routing/queues",
                    json={
                        "name": "Support",
                        "wrap_up_seconds": 0,
                        "offer_timeout_seconds": 20,
                        "announcements": {"position": False, "estimated_wait": False, "interval_seconds": 3600},
                    },
                    headers=headers,
                )
                queue.raise_for_status()
                queue_id = queue.json()["id"]
                graph = {
                    "start": "welcome",
                    "nodes": {
                        "welcome": {"type": "play", "prompt": {"kind": "tts", "text": WELCOME}, "next": "menu"},
                        "menu": {
                            "type": "menu",
                            "prompt": {"kind": "tts", "text": MENU},
                            "options": {MENU_KEY: "support"},
                            "invalid_prompt": {"kind": "tts", "text": "Sorry."},
                            "retry_prompt": {"kind": "tts", "text": "Please choose."},
                            "timeout_seconds": 5,
                            "max_retries": 2,
                            "on_failure": "bye",
                        },
                        "support": {"type": "queue", "queue_id": queue_id},
                        "bye": {"type": "hangup", "prompt": {"kind": "tts", "text": "Goodbye."}},
                    },
                }
                flow = await http.post(
                    "/api/v1/routing/ivr-flows", json={"name": "Main", "graph": graph}, headers=headers
                )
                flow.raise_for_status()
                flow_id = flow.json()["id"]
                (await http.post(f"/api/v1/routing/ivr-flows/{flow_id}/publish", headers=headers)).raise_for_status()
                e164 = f"+3319{int(run, 16) % 1000:03d}{t:04d}"
                async with sessionmaker() as session, session.begin():
                    operator = await session.scalar(select(ProviderUser.id).where(ProviderUser.email == PROVIDER_EMAIL))
                    ops = Principal(kind="provider", tenant_id=None, user_id=operator)
                    number_id = (await numbers.add_number(session, ops, NumberCreate(number=e164, label="bench"))).id
                    await numbers.assign_number(session, ops, number_id, tenant_id)
                routed = await http.patch(
                    f"/api/v1/voice/numbers/{number_id}", json={"ivr_flow_id": flow_id}, headers=headers
                )
                routed.raise_for_status()
                world.append(Tenant(str(tenant_id), slug, e164, t % len(node_ports), phones, agent_ids))
    finally:
        await engine.dispose()
    return World(made_nodes, world)


async def register_phones(world: World, controls: list[str], ring: float, talk: float) -> None:
    """Every agent's phone REGISTERs through its tenant's node (the node checks the digest over xml_curl)."""
    async with httpx.AsyncClient(timeout=60) as http:
        # A few at a time: the worker that holds the node applies each registration in PostgreSQL; a burst it
        # cannot keep up with delays the node's heartbeats too, and a node that looks silent is failed over.
        gate = asyncio.Semaphore(4)

        async def one(control: str, user: str, domain: str) -> None:
            async with gate:
                body = {"user": user, "domain": domain, "answer_delay": ring, "hangup_after": talk}
                answer = await http.post(f"{control}/registrations", json=body)
                answer.raise_for_status()
                if not answer.json().get("registered"):
                    raise RuntimeError(f"{user}@{domain} was refused")

        await asyncio.gather(*(one(controls[t.node], user, domain) for t in world.tenants for user, domain in t.phones))


async def set_talk(world: World, controls: list[str], ring: float, talk: float) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        gate = asyncio.Semaphore(16)

        async def one(control: str, user: str) -> None:
            async with gate:
                body = {"answer_delay": ring, "hangup_after": talk}
                (await http.patch(f"{control}/endpoints/{user}", json=body)).raise_for_status()

        await asyncio.gather(*(one(controls[t.node], user) for t in world.tenants for user, _ in t.phones))


async def agents_ready(world: World, wait_seconds: float = 300.0) -> int:
    """Wait until every agent's phone is known registered, then make them available; returns how many."""
    from backend.auth.principal import Principal
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker, tenant_transaction
    from backend.lib.redis_client import make_redis
    from backend.routing import service as routing_service
    from backend.routing.schemas import AgentStateChange
    from backend.tenants.permissions import PERMISSIONS
    from backend.worker import build_routing

    settings = get_settings()
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    redis = make_redis(settings.redis_url)
    routing = build_routing(settings, sessionmaker, redis)
    ready = 0
    try:
        deadline = time.monotonic() + wait_seconds
        for tenant in world.tenants:
            tenant_id = uuid.UUID(tenant.tenant_id)
            while True:
                async with tenant_transaction(sessionmaker, tenant_id) as session:
                    states = [
                        await routing_service.get_agent_state(session, tenant_id, uuid.UUID(a)) for a in tenant.agents
                    ]
                if all(s.voice_registered for s in states) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1)
            for agent in tenant.agents:
                principal = Principal(
                    kind="user", tenant_id=tenant_id, user_id=uuid.UUID(agent), permissions=frozenset(PERMISSIONS)
                )
                async with tenant_transaction(sessionmaker, tenant_id) as session:
                    state = await routing_service.set_own_state(session, principal, AgentStateChange(state="available"))
                await routing.sync_agent(tenant_id, uuid.UUID(agent))
                ready += int(bool(state.voice_ready))
    finally:
        await redis.aclose()
        await engine.dispose()
    return ready


# --- processes ---------------------------------------------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "CC_LOG_LEVEL": os.environ.get("CC_LOG_LEVEL", "WARNING"), **extra}


def start_process(
    name: str, args: list[str], env: dict[str, str], logs: Path, ready: str | None
) -> subprocess.Popen[bytes]:
    """A `contactcenter` process; waits for its JSON `ready` line when it prints one."""
    # Appended: the next run's process of the same name must not wipe what this one logged (the folder is
    # emptied once, when the benchmark starts).
    log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the process's life
    process = subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *args],
        env=env,
        stdout=subprocess.PIPE if ready else log,
        stderr=log,
    )
    if ready and process.stdout is not None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited before it was ready (see {logs / name}.log)")
            if ready.encode() in line:
                break
        # Keep reading what it prints (a full pipe would stop it), into its log.
        threading.Thread(target=_drain, args=(process.stdout, log), daemon=True).start()
    return process


def _drain(stream: Any, log: Any) -> None:
    for line in stream:
        log.write(line)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Rig:
    api_port: int
    cc_port: int
    logs: Path
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    sims: list[subprocess.Popen[bytes]] = field(default_factory=list)
    controls: list[str] = field(default_factory=list)
    call_control: list[subprocess.Popen[bytes]] = field(default_factory=list)
    control_cpu: float = 0.0
    """With --control-cpu: the cores each call-control process may use (a CPU quota of its own)."""
    cgroups: list[Path] = field(default_factory=list)

    def common_env(self) -> dict[str, str]:
        return _env(
            {
                "CC_ENV": "production",
                "CC_SECRET_KEY": KEY,
                "CC_SWITCH_SECRET": SECRET,
                "CC_CALL_CONTROL_ADDRESS": f"127.0.0.1:{self.cc_port}",
                "CC_SWITCH_MEDIA_BASE_URL": f"http://127.0.0.1:{self.api_port}",
                "CC_PUBLIC_BASE_URL": f"http://127.0.0.1:{self.api_port}",
                "CC_MEDIA_LOCAL_ROOT": str(self.logs / "media"),
            }
        )

    def start_sim(self, node: dict[str, Any], time_scale: float) -> str:
        api = f"http://127.0.0.1:{self.api_port}"
        control_port = free_port()
        name = node["name"]
        env = _env(
            {
                "CC_SIM_HOSTNAME": name,
                "CC_SIM_ESL_PORT": str(node["esl_port"]),
                "CC_SIM_CONTROL_PORT": str(control_port),
                "CC_SIM_XML_CURL_DIRECTORY_URL": f"{api}/api/v1/switch/directory",
                "CC_SIM_XML_CURL_DIALPLAN_URL": f"{api}/api/v1/switch/dialplan",
                "CC_SIM_XML_CURL_CREDENTIALS": f"{name}:{SECRET}",
                "CC_SIM_CDR_URL": f"{api}/api/v1/switch/cdr",
                "CC_SIM_CDR_CREDENTIALS": f"{name}:{SECRET}",
                "CC_SIM_HEARTBEAT": "2",
                "CC_SIM_TIME_SCALE": str(time_scale),
                "CC_SIM_RECORDINGS": str(self.logs / "recordings"),
                "CC_SIM_CDR_ERR_LOG_DIR": str(self.logs / f"json_cdr_err-{name}"),
                "CC_SIM_HTTP_CACHE_HEADERS": f"x-switch-secret: {SECRET}",
                "CC_SIM_MAX_SESSIONS": "4000",
            }
        )
        self.sims.append(start_process(name, ["switch-sim"], env, self.logs, '"ready"'))
        control = f"http://127.0.0.1:{control_port}"
        self.controls.append(control)
        return control

    def start_call_control(self, count: int) -> None:
        env = self.common_env()
        env["CC_LOG_LEVEL"] = os.environ.get("CC_BENCH_CONTROL_LOG_LEVEL", env["CC_LOG_LEVEL"])
        for index in range(len(self.call_control), count):
            process = start_process(f"call-control-{index}", ["call-control"], env, self.logs, '"ready"')
            self.call_control.append(process)
            if self.control_cpu > 0:
                self.cgroups.append(limit_cpu(process.pid, self.control_cpu, f"call-control-{index}"))

    def stop_call_control(self) -> None:
        for process in self.call_control:
            process.send_signal(signal.SIGTERM)
        for process in self.call_control:
            stop_process(process)
        self.call_control = []
        for group in self.cgroups:
            with contextlib.suppress(OSError):
                group.rmdir()
        self.cgroups = []

    def stop(self) -> None:
        self.stop_call_control()
        for process in [*self.sims, self.worker]:
            if process is not None:
                stop_process(process)
        if self.api is not None:
            stop_server(self.api)


def limit_cpu(pid: int, cores: float, name: str) -> Path:
    """Give a process a CPU quota of its own (`cores` of a core), as if each call-control process had a
    machine of that size: with everything on two shared cores, this is how a second process's added capacity
    can be seen at all. cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`); needs root."""
    period = 100_000
    quota = max(1_000, int(cores * period))
    unified = Path("/sys/fs/cgroup")
    if (unified / "cgroup.controllers").exists():
        group = unified / f"cc-bench-{name}-{pid}"
        group.mkdir()
        (group / "cpu.max").write_text(f"{quota} {period}")
    else:
        group = unified / "cpu" / f"cc-bench-{name}-{pid}"
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(period))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    (group / "cgroup.procs").write_text(str(pid))
    return group


NOTABLE_EVENTS = (
    "call_adopted",
    "call_control_failed",
    "call_control_left_live_call",
    "call_message_failed",
    "switch_node_down",
    "switch_events_dropped",
    "Future exception was never retrieved",
)
"""Log lines counted per run: any of them in a healthy run is worth a look."""


def listen_overflows() -> int:
    """The kernel's count of connections refused because a listening socket's queue was full (any process)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        lines = [
            line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")
        ]
        return int(dict(zip(lines[0], lines[1], strict=False)).get("ListenOverflows", "0"))
    return 0


def notable_events(logs: Path) -> dict[str, int]:
    """How many of each notable line the call-control processes and the worker have logged so far."""
    counts = dict.fromkeys(NOTABLE_EVENTS, 0)
    for path in [*logs.glob("call-control-*.log"), logs / "worker.log"]:
        with contextlib.suppress(OSError), path.open("rb") as handle:
            for line in handle:
                for name in NOTABLE_EVENTS:
                    if name.encode() in line:
                        counts[name] += 1
    return counts


# --- the callers -------------------------------------------------------------------------------------


async def control_request(control: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One POST to a node's control API over a fresh connection (it answers one request per connection):
    cheaper than an HTTP client's pool for hundreds of requests a second."""
    host, _, port = control.removeprefix("http://").partition(":")
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), host.encode(), len(data), data)
        )
        answer = await reader.read()
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(payload) if payload else None


@dataclass
class Call:
    tenant: int
    due: float
    uuid: str | None = None
    pressed: float | None = None
    bridged: float | None = None
    ended: float | None = None
    cause: str | None = None
    failed: str | None = None


@dataclass
class Observed:
    calls: dict[str, Call] = field(default_factory=dict)
    legs_hung_up: set[str] = field(default_factory=set)
    up: int = 0
    peak: int = 0
    events: int = 0
    presses_failed: int = 0


async def watch_node(index: int, esl_port: int, control: str, seen: Observed) -> None:
    """An event socket on the node: presses the menu key, notes bridges and hang-ups."""
    from backend.channels.voice.esl import InboundClient

    client = InboundClient(
        "127.0.0.1",
        esl_port,
        "ClueCon",
        events=["CHANNEL_EXECUTE", "CHANNEL_BRIDGE", "CHANNEL_HANGUP_COMPLETE"],
        name=f"bench-{index}",
    )
    await client.start()
    await client.wait_connected(30)
    # Only what the watcher reads (a measuring device, not part of the system): the menu's start, bridges and
    # hang-ups, not every application every call runs. Filters pass an event matching any of them.
    await client.add_filter("Application", "play_and_get_digits")
    await client.add_filter("Event-Name", "CHANNEL_BRIDGE")
    await client.add_filter("Event-Name", "CHANNEL_HANGUP_COMPLETE")
    presses: set[asyncio.Task[None]] = set()

    async def press(call: Call, leg: str) -> None:
        try:
            status, _ = await control_request(control, f"/calls/{leg}/dtmf", {"digits": MENU_KEY})
            if status != 200:
                seen.presses_failed += 1
        except (OSError, ValueError, IndexError):
            seen.presses_failed += 1

    try:
        async for event in client.events():
            seen.events += 1
            name = event.name
            leg = event.unique_id or ""
            if name == "CHANNEL_EXECUTE":
                call = seen.calls.get(leg)
                if call is not None and call.pressed is None and event.get("Application") == "play_and_get_digits":
                    call.pressed = time.time()
                    task = asyncio.create_task(press(call, leg))
                    presses.add(task)
                    task.add_done_callback(presses.discard)
            elif name == "CHANNEL_BRIDGE":
                call = seen.calls.get(leg) or seen.calls.get(event.get("Other-Leg-Unique-ID") or "")
                if call is not None and call.bridged is None:
                    call.bridged = int(event.get("Event-Date-Timestamp") or 0) / 1e6 or time.time()
            elif name == "CHANNEL_HANGUP_COMPLETE":
                seen.legs_hung_up.add(leg)
                call = seen.calls.get(leg)
                if call is not None and call.ended is None:
                    call.ended = time.time()
                    call.cause = event.get("Hangup-Cause")
                    seen.up -= 1
    finally:
        await client.close()


async def place_calls(world: World, controls: list[str], rate: float, seconds: float, seen: Observed) -> float:
    """Open loop: call i is due at start + i/rate whatever happened to the previous ones. Returns the start."""
    total = int(rate * seconds)
    start = time.time() + 0.2
    tasks: list[asyncio.Task[None]] = []
    pending: list[Call] = []

    async def dial(call: Call) -> None:
        tenant = world.tenants[call.tenant]
        try:
            status, answer = await control_request(
                controls[tenant.node],
                "/calls",
                {"destination": tenant.number, "caller_number": f"+3361{len(pending):07d}", "caller_name": "Bench"},
            )
            if status != 201:
                raise ValueError(status)
            leg = answer["uuid"]
        except (OSError, ValueError, IndexError, KeyError, TypeError) as error:
            call.failed = f"not placed: {type(error).__name__}"
            return
        call.uuid = leg
        seen.calls[leg] = call
        # Events for this leg that arrived before the answer are few (the node answers once the channel runs).
        seen.up += 1
        seen.peak = max(seen.peak, seen.up)

    for index in range(total):
        due = start + index / rate
        delay = due - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        call = Call(tenant=index % len(world.tenants), due=due)
        pending.append(call)
        tasks.append(asyncio.create_task(dial(call)))
    await asyncio.gather(*tasks)
    seen.__dict__["placed"] = pending
    return start


async def count_rows(tenant_ids: list[str], legs: set[str], since: float) -> tuple[int, dict[str, int]]:
    """The legs' rows in voice_cdrs and the run's interactions by state/outcome, read as the superuser."""
    import asyncpg

    connection = await asyncpg.connect(os.environ["CC_BENCH_SUPERUSER_DSN"])
    try:
        ids = [uuid.UUID(t) for t in tenant_ids]
        cdrs = await connection.fetchval(
            "SELECT count(DISTINCT leg_uuid) FROM voice_cdrs WHERE tenant_id = ANY($1) AND leg_uuid = ANY($2)",
            ids,
            [uuid.UUID(leg) for leg in legs],
        )
        rows = await connection.fetch(
            "SELECT state, coalesce(outcome, '-') AS outcome, count(*) FROM interactions "
            "WHERE tenant_id = ANY($1) AND created_at >= to_timestamp($2) GROUP BY 1, 2",
            ids,
            since,
        )
        return int(cdrs), {f"{r['state']}/{r['outcome']}": int(r["count"]) for r in rows}
    finally:
        await connection.close()


async def sample_cpu(rig: Rig, stop: asyncio.Event, out: dict[str, float]) -> None:
    """CPU seconds used by each kind of process during the run (from /proc)."""

    def ticks(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total = int(fields[11]) + int(fields[12])
            children = subprocess.run(
                ["pgrep", "-P", str(pid)], check=False, capture_output=True, text=True
            ).stdout.split()
            return total / os.sysconf("SC_CLK_TCK") + sum(ticks(int(c)) for c in children)
        except (OSError, IndexError):
            return 0.0

    def own(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def server_pid(variable: str) -> int | None:
        """PostgreSQL's postmaster (its backends are its children) or Redis, from their pid files."""
        path = os.environ.get(variable)
        try:
            return int(Path(path).read_text().split()[0]) if path else None
        except (OSError, ValueError, IndexError):
            return None

    def snapshot() -> dict[str, float]:
        shot = {"api": ticks(rig.api.pid) if rig.api else 0.0, "worker": ticks(rig.worker.pid) if rig.worker else 0.0}
        shot["call-control"] = sum(ticks(p.pid) for p in rig.call_control)
        shot["simulator"] = sum(ticks(p.pid) for p in rig.sims)
        for name, variable in (("postgres", "CC_BENCH_PG_PIDFILE"), ("redis", "CC_BENCH_REDIS_PIDFILE")):
            pid = server_pid(variable)
            if pid is not None:
                shot[name] = ticks(pid)
        shot["bench"] = own(os.getpid())
        return shot

    before = snapshot()
    await stop.wait()
    after = snapshot()
    for key in after:
        out[key] = after[key] - before[key]


async def describe_channels(controls: list[str], uuids: set[str]) -> dict[str, int]:
    """Where the calls still up are, as the nodes' `show channels` rows say (state and application), counted."""
    if not uuids:
        return {}
    found: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=30) as http:
        for control in controls:
            channels = (await http.get(f"{control}/state")).json()["channels"]
            rows = channels.get("rows", []) if isinstance(channels, dict) else channels
            for row in rows:
                if isinstance(row, dict) and row.get("uuid") in uuids:
                    key = f"{row.get('state')}/{row.get('application')}"
                    found[key] = found.get(key, 0) + 1
    return found


async def nodes_empty(controls: list[str], wait_seconds: float = 300.0) -> int:
    """Wait until no node has a channel up (the previous run's calls all ended); returns the channels left."""
    deadline = time.monotonic() + wait_seconds
    async with httpx.AsyncClient(timeout=30) as http:
        while True:
            left = 0
            for control in controls:
                state = (await http.get(f"{control}/state")).json()
                channels = state["channels"]
                left += int(channels.get("row_count", 0)) if isinstance(channels, dict) else len(channels)
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(2)


async def one_run(
    rig: Rig, world: World, rate: float, seconds: float, talk: float, ring: float, label: str
) -> dict[str, Any]:
    left = await nodes_empty(rig.controls)
    if left:
        print(f"  {left} channels of earlier calls still up: this run shares the machine with them", flush=True)
    seen = Observed()
    since = time.time() - 1
    load_before = load()
    watchers = [
        asyncio.create_task(watch_node(i, node["esl_port"], rig.controls[i], seen))
        for i, node in enumerate(world.nodes)
    ]
    await asyncio.sleep(1.0)
    logged_before = notable_events(rig.logs)
    overflows_before = listen_overflows()
    cpu: dict[str, float] = {}
    stop_cpu = asyncio.Event()
    sampler = asyncio.create_task(sample_cpu(rig, stop_cpu, cpu))
    profilers = profile(rig, label, seconds)
    start = await place_calls(world, rig.controls, rate, seconds, seen)
    placed_done = time.time()
    load_during = load()
    # Drain: every placed call ends (IVR + queue + ring + talk), with a margin.
    deadline = time.time() + talk + ring + 180
    while time.time() < deadline and any(c.uuid and c.ended is None for c in seen.calls.values()):  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    stop_cpu.set()
    await sampler
    for profiler in profilers:
        profiler.wait()
    await asyncio.sleep(3)  # the last hang-up events of agents' legs
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    calls: list[Call] = seen.__dict__["placed"]
    placed = [c for c in calls if c.uuid]
    stuck_channels = await describe_channels(rig.controls, {c.uuid for c in placed if c.ended is None and c.uuid})
    bridged = [c for c in placed if c.bridged]
    not_placed = len(calls) - len(placed)
    lost_before_agent = sum(1 for c in placed if c.ended and not c.bridged)
    stuck = sum(1 for c in placed if c.ended is None)
    setup = [c.bridged - c.due for c in bridged if c.bridged]
    queue_to_agent = [c.bridged - c.pressed for c in bridged if c.bridged and c.pressed]
    last_bridge = max((c.bridged for c in bridged if c.bridged), default=start)
    connected_rate = (
        len(bridged) / max(1e-9, last_bridge - min(c.bridged for c in bridged if c.bridged))
        if len(bridged) > 1
        else 0.0
    )
    # Whether the rate is sustained: a saturated system's setup grows with each window of arrivals; one that keeps
    # up has the same setup in every window, a slow tail only in some.
    windows: dict[int, list[float]] = {}
    for c in bridged:
        if c.bridged:
            windows.setdefault(int((c.due - start) // SETUP_WINDOW_SECONDS), []).append(c.bridged - c.due)
    setup_by_window = [
        f"{index * SETUP_WINDOW_SECONDS:.0f}s:{percentile(values, 0.5):.1f}/{percentile(values, 0.99):.1f}"
        for index, values in sorted(windows.items())
    ]
    causes: dict[str, int] = {}
    for c in placed:
        if not c.bridged:
            key = c.cause or "still up"
            causes[key] = causes.get(key, 0) + 1
    expected = len(seen.legs_hung_up)
    stored, interactions = 0, {}
    wait_until = time.time() + 90
    while time.time() < wait_until:
        stored, interactions = await count_rows([t.tenant_id for t in world.tenants], seen.legs_hung_up, since)
        if stored >= expected:
            break
        await asyncio.sleep(2)
    result = {
        "label": label,
        "rate": rate,
        "seconds": seconds,
        "talk": talk,
        "calls": len(calls),
        "placed_rate": len(placed) / max(1e-9, placed_done - start),
        "connected_rate": connected_rate,
        "peak_concurrent": seen.peak,
        "setup_p50": percentile(setup, 0.5),
        "setup_p99": percentile(setup, 0.99),
        "setup_by_window": setup_by_window,
        "press_to_agent_p50": percentile(queue_to_agent, 0.5),
        "press_to_agent_p99": percentile(queue_to_agent, 0.99),
        "not_placed": not_placed,
        "lost_before_agent": lost_before_agent,
        "stuck": stuck,
        "stuck_examples": [c.uuid for c in placed if c.ended is None][:5],
        "stuck_channels": stuck_channels,
        "presses_failed": seen.presses_failed,
        "lost_causes": causes,
        "cdr_expected": expected,
        "cdr_stored": stored,
        "interactions": interactions,
        "load_before": load_before,
        "load_during": load_during,
        "cpu": {k: round(v, 1) for k, v in cpu.items()},
        "events": seen.events,
        "logged": {k: v - logged_before[k] for k, v in notable_events(rig.logs).items() if v > logged_before[k]},
        "listen_overflows": listen_overflows() - overflows_before,
    }
    return result


def profile(rig: Rig, label: str, seconds: float) -> list[subprocess.Popen[bytes]]:
    """With CC_BENCH_PYSPY (a py-spy binary), record the first call-control process, the first node, the API and
    the worker while calls are placed: collapsed stacks (flamegraph.pl input) in the logs folder."""
    pyspy = os.environ.get("CC_BENCH_PYSPY")
    if not pyspy:
        return []
    slug = label.replace(" ", "-")
    started = []
    for name, process in (
        ("call-control", rig.call_control[0]),
        ("simulator", rig.sims[0]),
        ("api", rig.api),
        ("worker", rig.worker),
    ):
        if process is None:
            continue
        out = rig.logs / f"profile-{slug}-{name}.txt"
        command = [
            pyspy,
            "record",
            "-p",
            str(process.pid),
            "-d",
            str(int(seconds)),
            "-o",
            str(out),
            "-r",
            "50",
            "-f",
            "raw",
        ]
        if name == "api":
            command.append("--subprocesses")
        started.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        print(f"  profiling {name} into {out}", flush=True)
    return started


def show(result: dict[str, Any]) -> None:
    r = result
    print(
        f"{r['label']}: offered {r['rate']:.0f}/s for {r['seconds']:.0f} s (talk {r['talk']:.0f} s): "
        f"placed {r['placed_rate']:.1f}/s, connected {r['connected_rate']:.1f}/s, peak concurrent calls "
        f"{r['peak_concurrent']}; setup (arrival to agent) p50 {r['setup_p50']:.2f} s p99 {r['setup_p99']:.2f} s; "
        f"key to agent p50 {r['press_to_agent_p50']:.2f} s p99 {r['press_to_agent_p99']:.2f} s; "
        f"setup p50/p99 by arrival window {' '.join(r['setup_by_window'])}; "
        f"lost: {r['not_placed']} not placed, {r['lost_before_agent']} ended before an agent, {r['stuck']} stuck, "
        f"{r['presses_failed']} key presses refused {r['lost_causes'] or ''}; CDRs {r['cdr_stored']}/{r['cdr_expected']}; "
        f"interactions {r['interactions']}; {r['events']} events watched; load {r['load_before']} -> {r['load_during']}; CPU s {r['cpu']}; "
        f"logged {r['logged'] or 'nothing notable'}; listen queue overflows {r['listen_overflows']}"
        + (
            f"; stuck calls {r['stuck_channels']}, for example {', '.join(r['stuck_examples'])}"
            if r["stuck_examples"]
            else ""
        ),
        flush=True,
    )


def saturated(result: dict[str, Any]) -> bool:
    lost = result["not_placed"] + result["lost_before_agent"] + result["stuck"]
    return (
        result["connected_rate"] < 0.9 * result["rate"]
        or lost > 0.01 * result["calls"]
        or result["press_to_agent_p99"] > 5.0 + 2 * result.get("ring", 1.0)
    )


async def main_async(args: argparse.Namespace, rig: Rig) -> list[dict[str, Any]]:
    from dataclasses import replace

    from backend.config import get_settings
    from backend.lib.observability import configure_logging

    configure_logging(replace(get_settings(), log_level="WARNING"))
    node_ports = [free_port() for _ in range(args.nodes)]
    print(
        f"setting up: {args.tenants} tenants x {args.agents} agents, {args.nodes} simulated node(s); load {load()}",
        flush=True,
    )
    started = time.monotonic()
    world = await prepare(f"http://127.0.0.1:{rig.api_port}", node_ports, args.tenants, args.agents)
    for node in world.nodes:
        rig.start_sim(node, args.time_scale)
    worker_env = rig.common_env()
    worker_env["CC_LOG_LEVEL"] = os.environ.get("CC_BENCH_WORKER_LOG_LEVEL", worker_env["CC_LOG_LEVEL"])
    rig.worker = start_process("worker", ["worker"], worker_env, rig.logs, None)
    await register_phones(world, rig.controls, args.ring, args.talk)
    ready = await agents_ready(world)
    print(f"  {ready} agents voice-ready in {time.monotonic() - started:.0f} s", flush=True)
    results: list[dict[str, Any]] = []
    agents = args.tenants * args.agents
    for count in args.controls:
        rig.start_call_control(count)
        await asyncio.sleep(1)
        if args.mode in ("steady", "both"):
            await set_talk(world, rig.controls, args.ring, args.talk)
            result = await one_run(rig, world, args.rate, args.seconds, args.talk, args.ring, f"{count} call-control")
            result["ring"] = args.ring
            result["controls"] = count
            show(result)
            results.append(result)
        if args.mode in ("ramp", "both"):
            for rate in args.ramp:
                # Talk time such that the agents can take the rate (each call holds one for ring + talk).
                talk = max(2.0, min(args.talk, 0.8 * agents / rate - args.ring))
                await set_talk(world, rig.controls, args.ring, talk)
                result = await one_run(
                    rig, world, rate, args.ramp_seconds, talk, args.ring, f"ramp {count} call-control"
                )
                result["ring"] = args.ring
                result["controls"] = count
                show(result)
                results.append(result)
                if saturated(result):
                    print(f"  saturated at {rate:.0f}/s offered with {count} call-control process(es)", flush=True)
                    break
        rig.stop_call_control()
        await asyncio.sleep(2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["steady", "ramp", "both"], default="both")
    parser.add_argument("--rate", type=float, default=30.0, help="new calls per second (steady)")
    parser.add_argument("--seconds", type=float, default=90.0, help="how long calls are placed (steady)")
    parser.add_argument("--talk", type=float, default=28.0, help="seconds an agent talks before hanging up")
    parser.add_argument("--ring", type=float, default=1.0, help="seconds an agent's phone rings before answering")
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--agents", type=int, default=250, help="agents per tenant (plan business: 250 at most)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated FreeSWITCH nodes")
    parser.add_argument("--controls", type=int, nargs="+", default=[1, 2], help="call-control process counts")
    parser.add_argument("--ramp", type=float, nargs="+", default=[10, 20, 30, 45, 60, 80, 100])
    parser.add_argument("--ramp-seconds", type=float, default=30.0)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0, help="the simulator's clock (1: real time)")
    parser.add_argument("--json", default="", help="write the results to this file too")
    parser.add_argument(
        "--control-cpu",
        type=float,
        default=0.0,
        help="cores each call-control process may use (a cgroup CPU quota; 0: no limit)",
    )
    args = parser.parse_args()
    logs = Path(os.environ.get("CC_BENCH_LOGS", "/var/tmp/contactcenter/bench-call-control-logs"))
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    api_port = free_port()
    rig = Rig(api_port=api_port, cc_port=free_port(), logs=logs, control_cpu=args.control_cpu)
    print(f"machine: {os.cpu_count()} CPUs, load {load()}; logs in {logs}", flush=True)
    rig.api = start_server(api_port, args.api_workers, rig.common_env())
    try:
        results = uvloop.run(main_async(args, rig))
    finally:
        rig.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
