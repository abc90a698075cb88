"""Voice benchmark: ESL parsing, event ingestion from two nodes, xml_curl directory latency, CDR chaos.

Run through benchmarks/run_voice.sh, which provides PostgreSQL (55502) and Redis (56449). Prints its figures.

1. parse: frames and events per second on one core, on the event mix of the `inbound_esl` a08 capture
   (FreeSWITCH 1.10.12's `event json ALL` during one call: 96 events, 4.8 kB on average), fed to the
   sans-IO parser in 64 kB reads as the socket delivers them. Goal: 50,000 events/s.
2. ingest: two simulated nodes (separate processes speaking ESL) send the events our subscription receives
   for a08's call (12 channel events per call, two of them CDRs written to PostgreSQL), a registration
   refresh every tenth call and a HEARTBEAT every 2 s, at a steady rate; `SwitchLinks` holds both nodes
   and applies every event through `VoiceSwitchboard.handle_event`. Events applied per second, events
   dropped, and event-to-state latency (the switch's Event-Date-Timestamp to the state written).
   Goal: 5,000 events/s, none dropped, p99 under 50 ms.
3. directory: mod_xml_curl `directory` requests (sip_auth, as FreeSWITCH sends them) open-loop at
   `--directory-rate` against the API as production runs it (uvicorn, `--workers` processes).
   Goal: p99 under 10 ms at 500 requests/s.
4. chaos: 10,000 CDRs posted as mod_json_cdr does (retries, then its err-log-dir) while the API worker
   is killed with SIGKILL and PostgreSQL is stopped with `-m immediate`, both restarted; the files left
   are imported. Goal: exactly 10,000 CDR rows, none duplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api import PASSWORD, free_port, start_server, stop_server

from backend.channels.voice.esl import CommandParser, FrameParser, decode_frame
from backend.channels.voice.esl._wire import body_frame, reply_frame

FIXTURES = Path(
    os.environ.get("CC_FREESWITCH_FIXTURES", Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "freeswitch")
)
A08 = FIXTURES / "inbound_esl" / "a08_event_json_all_scenario_call.esl"
A09 = FIXTURES / "inbound_esl" / "a09_event_plain_all_scenario_call.esl"
D01 = FIXTURES / "json_cdr" / "d01_cdr_a_leg_scenario_call_7400.request.txt"
A_LEG = "7376847b-6112-4072-9af1-5a29049ccd1f"
B_LEG = "24fc06a7-8d67-4a2f-bb7d-1bebd658e967"
SECRET = "bench-switch-secret-0123456789"
KEY = os.environ.setdefault("CC_SECRET_KEY", "voice-bench-application-key-0123456789abcdef")
"""One application key for this process and the API it starts (nodes' ESL passwords are sealed with it)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# --- 1. parsing --------------------------------------------------------------------------------------


def event_frames(path: Path, content_type: str) -> bytes:
    """The capture's event frames only, re-framed exactly as received."""
    out = b""
    for frame in FrameParser().feed(path.read_bytes()):
        if frame.content_type == content_type:
            out += b"Content-Length: %d\nContent-Type: %s\n\n" % (len(frame.body), content_type.encode()) + frame.body
    return out


def parse_rate(path: Path, content_type: str, repeats: int = 200, chunk: int = 65536) -> tuple[float, int, int]:
    one = event_frames(path, content_type)
    blob = one * repeats

    def run() -> int:
        parser = FrameParser()
        count = 0
        for offset in range(0, len(blob), chunk):
            for frame in parser.feed(blob[offset : offset + chunk]):
                decode_frame(frame)
                count += 1
        return count

    run()
    best = 0.0
    for _ in range(5):
        started = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - started))
    return best, count // repeats, len(one) // max(1, count // repeats)


def bench_parse() -> None:
    rate, per_call, size = parse_rate(A08, "text/event-json")
    print(
        f"parse  a08 event json: {rate:,.0f} events/s on one core ({per_call} events, {size:,} bytes each on average)"
    )
    rate, per_call, size = parse_rate(A09, "text/event-plain")
    print(f"parse  a09 event plain: {rate:,.0f} events/s on one core (for comparison; we subscribe in json)")


# --- 2. ingestion ------------------------------------------------------------------------------------


def call_templates(tenant_id: str, mix: str) -> tuple[list[bytes], list[bytes]]:
    """The a08 events our subscription receives, as JSON bodies: (one call's, the registration pair).

    `full`: the call's 12 events, two of them CHANNEL_HANGUP_COMPLETE (a CDR written to PostgreSQL).
    `redis`: the 10 channel-state events only (state kept in Redis), the issue's "parse, state update in Redis".
    """
    from backend.channels.voice.registrations import REGISTRATION_EVENTS
    from backend.channels.voice.service import SUBSCRIBED_EVENTS

    call: list[bytes] = []
    registration: list[bytes] = []
    for frame in FrameParser().feed(A08.read_bytes()):
        if frame.content_type != "text/event-json":
            continue
        document = json.loads(frame.body)
        name, subclass = document["Event-Name"], document.get("Event-Subclass")
        if name == "CUSTOM" and subclass in REGISTRATION_EVENTS:
            registration.append(frame.body)
        elif name in SUBSCRIBED_EVENTS and name not in {"CUSTOM", "HEARTBEAT"}:
            body = frame.body
            if name == "CHANNEL_HANGUP_COMPLETE":
                if mix == "redis":
                    continue
                # What our dialplan exports on every call: the CDR finds its tenant.
                body = body.replace(
                    b'{"Event-Name":"CHANNEL_HANGUP_COMPLETE",',
                    b'{"Event-Name":"CHANNEL_HANGUP_COMPLETE","variable_cc_tenant_id":"%s",' % tenant_id.encode(),
                    1,
                )
            call.append(body)
    return call, (registration if mix == "full" else [])


def _stamped(body: bytes, now_us: int) -> bytes:
    start = body.index(b'"Event-Date-Timestamp":"') + 24
    end = body.index(b'"', start)
    digits = b"%d" % now_us
    assert len(digits) == end - start
    return body[:start] + digits + body[end:]


def _frame(body: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body


def blaster(
    port_queue: Any, report: Any, go: Any, tenant_id: str, mix: str, rate: float, seconds: float, seed: int
) -> None:
    """One simulated node: an ESL server that, once `go` is set, sends calls' events at `rate` events/s to
    whichever connection subscribed last (its holder)."""
    call, registration = call_templates(tenant_id, mix)
    heartbeat = next(
        f.body
        for f in FrameParser().feed(A08.read_bytes())
        if f.content_type == "text/event-json" and b'"HEARTBEAT"' in f.body[:40]
    )
    rng = random.Random(seed)
    holder: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = CommandParser()
        writer.write(b"Content-Type: auth/request\n\n")
        try:
            while data := await reader.read(65536):
                for command in parser.feed(data):
                    line = command.line
                    if line.startswith("api "):
                        writer.write(body_frame("api/response", '{"row_count":0}'))
                    elif line == "exit":
                        writer.write(reply_frame("+OK bye"))
                        await writer.drain()
                        return
                    else:
                        writer.write(reply_frame("+OK"))
                    if line.startswith("event json"):
                        holder[:] = [writer]
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if holder and holder[0] is writer:
                holder.clear()
            writer.close()

    async def send() -> None:
        while not go.is_set():  # noqa: ASYNC110 - a multiprocessing event, set by another process
            await asyncio.sleep(0.01)
        sent = 0
        calls = 0
        begin = time.monotonic()
        next_heartbeat = begin
        while time.monotonic() - begin < seconds:
            due = int((time.monotonic() - begin) * rate)
            out = bytearray()
            while sent < due:
                a, b = (
                    str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                    str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                )
                now_us = int(time.time() * 1_000_000)
                templates = call + (registration if calls % 10 == 0 else [])
                for template in templates:
                    body = template.replace(A_LEG.encode(), a.encode()).replace(B_LEG.encode(), b.encode())
                    out += _frame(_stamped(body, now_us))
                sent += len(templates)
                calls += 1
            if time.monotonic() >= next_heartbeat:
                out += _frame(_stamped(heartbeat, int(time.time() * 1_000_000)))
                sent += 1
                next_heartbeat += 2.0
            if out and holder:
                holder[0].write(bytes(out))
                await holder[0].drain()
            await asyncio.sleep(0.01)
        report.put({"sent": sent, "calls": calls, "seconds": time.monotonic() - begin})

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port_queue.put(server.sockets[0].getsockname()[1])
        await send()
        await asyncio.sleep(300)

    asyncio.run(main())


async def prepare_ingestion(nodes: int) -> tuple[str, list[tuple[uuid.UUID, str]]]:
    """A tenant for the calls' CDRs and `nodes` registered switch nodes (ports filled in later)."""
    from backend.auth.crypto import SecretBox
    from backend.channels.voice.models import SwitchNode
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker
    from backend.tenants import service
    from backend.tenants.schemas import SignupRequest

    settings = get_settings()
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    slug = f"vb{uuid.uuid4().hex[:8]}"
    async with sessionmaker() as session, session.begin():
        result = await service.signup(
            session,
            SignupRequest(
                company_name="Voice bench",
                slug=slug,
                admin_email=f"owner@{slug}.example.com",
                admin_name="Voice Bench",
                password=PASSWORD,
                time_zone="UTC",
                plan="team",
            ),
            settings,
        )
        tenant_id = str(result.tenant.id)
    created = []
    run = uuid.uuid4().hex[:6]
    async with sessionmaker() as session, session.begin():
        for index in range(nodes):
            node = SwitchNode(
                name=f"fs-ingest-{run}-{index}",
                esl_host="127.0.0.1",
                esl_port=1,
                esl_password_sealed=SecretBox(settings.secret_key).seal("ClueCon"),
                xml_curl_sources=["127.0.0.1/32"],
                health="unknown",
                draining=False,
                stats={},
            )
            session.add(node)
            await session.flush()
            created.append((node.id, node.name))
    await engine.dispose()
    return tenant_id, created


def holder(pattern: str, index: int, applied: Any, dropped: Any, results: Any, stop: Any, profile_path: str) -> None:
    """A worker's `SwitchLinks` (the production path), its switchboard measuring each event's lag."""
    from backend.channels.voice.links import SwitchLinks
    from backend.channels.voice.service import VoiceSwitchboard
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker
    from backend.lib.observability import configure_logging
    from backend.lib.redis_client import make_redis
    from backend.worker import build_routing

    async def main() -> None:
        settings = replace(get_settings(), esl_node_pattern=pattern, log_level="WARNING", esl_rebalance_seconds=0.5)
        configure_logging(settings)  # as the worker does: warnings and errors only
        engine = make_engine(settings)
        sessionmaker = make_sessionmaker(engine)
        redis = make_redis(settings.redis_url)
        lags: list[float] = []

        class Measured(VoiceSwitchboard):
            async def handle_event(self, node_id: uuid.UUID, event: Any, **when: Any) -> None:
                await super().handle_event(node_id, event, **when)
                lags.append(time.time() - int(event.get("Event-Date-Timestamp")) / 1_000_000)
                with applied.get_lock():
                    applied.value += 1

        board = Measured(sessionmaker, redis, settings, build_routing(settings, sessionmaker, redis))
        links = SwitchLinks(board, redis, settings)
        profile = cProfile.Profile() if profile_path else None
        if profile is not None:
            profile.enable()
        await links.start()
        while not stop.is_set():
            await asyncio.sleep(0.05)
            lost = sum(link.client.dropped_events for link in links.links.values())
            dropped[index] = lost
        failed = sum(link.stats.failed for link in links.links.values())
        await links.stop()
        if profile is not None:
            profile.disable()
            profile.dump_stats(f"{profile_path}.{os.getpid()}")
        results.put({"lags": lags, "failed": failed, "dropped": lost})
        await redis.aclose()
        await engine.dispose()

    asyncio.run(main())


async def _holders_settled(redis: Any, nodes: list[tuple[uuid.UUID, str]], processes: int) -> bool:
    from backend.channels.voice.commands import status_key

    holders = set()
    for node_id, _ in nodes:
        status = await redis.hgetall(status_key(node_id))
        if status.get("connected") != "1":
            return False
        holders.add(status.get("holder"))
    return len(holders) == min(processes, len(nodes))


async def ingest(rate: float, seconds: float, mix: str, processes: int) -> dict[str, Any]:
    from sqlalchemy import update

    from backend.channels.voice.models import SwitchNode
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker
    from backend.lib.redis_client import make_redis

    settings = get_settings()
    flush = make_redis(settings.redis_url)
    await flush.flushdb()  # the benchmark's own Redis: every run starts from nothing
    await flush.aclose()
    tenant_id, nodes = await prepare_ingestion(2)
    context = multiprocessing.get_context("spawn")
    ports, report, results = context.Queue(), context.Queue(), context.Queue()
    go, stop = context.Event(), context.Event()
    applied, dropped = context.Value("q", 0), context.Array("q", processes)
    blasters = [
        context.Process(target=blaster, args=(ports, report, go, tenant_id, mix, rate / len(nodes), seconds, index))
        for index in range(len(nodes))
    ]
    for process in blasters:
        process.start()
    engine = make_engine(settings)
    async with make_sessionmaker(engine)() as session, session.begin():
        for node_id, _ in nodes:
            port = await asyncio.to_thread(ports.get, True, 60)
            await session.execute(update(SwitchNode).where(SwitchNode.id == node_id).values(esl_port=port))
    await engine.dispose()
    pattern = nodes[0][1].rsplit("-", 1)[0] + "-*"
    profile_path = os.environ.get("CC_BENCH_PROFILE", "")
    holders = [
        context.Process(target=holder, args=(pattern, index, applied, dropped, results, stop, profile_path))
        for index in range(processes)
    ]
    for process in holders:
        process.start()
    redis = make_redis(settings.redis_url)
    try:
        deadline = time.monotonic() + 60
        while not await _holders_settled(redis, nodes, processes):
            if time.monotonic() > deadline:
                raise RuntimeError("the holders did not take the nodes")
            await asyncio.sleep(0.1)
        go.set()
        reports = [await asyncio.to_thread(report.get, True, seconds + 60) for _ in blasters]
        sent = sum(r["sent"] for r in reports)
        finished = time.monotonic()
        while applied.value + sum(dropped) < sent and time.monotonic() - finished < 60:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        caught_up = time.monotonic() - finished
        stop.set()
        outcomes = [await asyncio.to_thread(results.get, True, 120) for _ in holders]
    finally:
        stop.set()
        await redis.aclose()
        for process in [*blasters, *holders]:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    lags = [lag for outcome in outcomes for lag in outcome["lags"]]
    send_seconds = max(r["seconds"] for r in reports)
    return {
        "sent": sent,
        "applied": applied.value,
        "dropped": sum(outcome["dropped"] for outcome in outcomes),
        "failed": sum(outcome["failed"] for outcome in outcomes),
        "calls": sum(r["calls"] for r in reports),
        "rate": applied.value / (send_seconds + caught_up),
        "offered_rate": sent / send_seconds,
        "caught_up": caught_up,
        "p50_ms": percentile(lags, 0.50) * 1000,
        "p99_ms": percentile(lags, 0.99) * 1000,
        "max_ms": max(lags) * 1000 if lags else float("nan"),
    }


def bench_ingest(rate: float, seconds: float, mix: str, processes: int) -> None:
    print(
        f"ingest: two nodes, {mix} mix, {rate:,.0f} events/s offered for {seconds:.0f} s, {processes} holder "
        f"process(es) (load {load()}) ...",
        flush=True,
    )
    r = asyncio.run(ingest(rate, seconds, mix, processes))
    print(
        f"ingest {mix} x{processes}: {r['applied']:,} of {r['sent']:,} events applied ({r['calls']:,} calls), "
        f"dropped {r['dropped']}, failed {r['failed']}; offered {r['offered_rate']:,.0f}/s, applied "
        f"{r['rate']:,.0f}/s (caught up {r['caught_up']:.2f} s after the last send); event-to-state p50 "
        f"{r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms max {r['max_ms']:.1f} ms (goal 5,000/s, 0 dropped, p99 < 50 ms)",
        flush=True,
    )


# --- 3. xml_curl directory ---------------------------------------------------------------------------


async def prepare_tenant_and_node(node_name: str, seats: int) -> tuple[str, list[tuple[str, str]]]:
    """A node allowed from 127.0.0.1 and a tenant with `seats` seated agents, made through the services."""
    from backend.auth.crypto import SecretBox
    from backend.auth.principal import Principal
    from backend.channels.voice.models import SwitchNode
    from backend.config import get_settings
    from backend.db.engine import make_engine, make_sessionmaker, tenant_transaction
    from backend.tenants import service
    from backend.tenants.permissions import PERMISSIONS
    from backend.tenants.schemas import SignupRequest

    settings = get_settings()
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    slug = f"vb{uuid.uuid4().hex[:8]}"
    try:
        async with sessionmaker() as session, session.begin():
            session.add(
                SwitchNode(
                    name=node_name,
                    esl_host="127.0.0.1",
                    esl_port=8021,
                    esl_password_sealed=SecretBox(settings.secret_key).seal("ClueCon"),
                    xml_curl_sources=["127.0.0.1/32"],
                    health="up",
                    draining=False,
                    stats={},
                )
            )
            result = await service.signup(
                session,
                SignupRequest(
                    company_name="Voice bench",
                    slug=slug,
                    admin_email=f"owner@{slug}.example.com",
                    admin_name="Voice Bench",
                    password=PASSWORD,
                    time_zone="UTC",
                    plan="team",
                ),
                settings,
            )
        tenant_id, owner_id = result.tenant.id, result.owner_id
        found = []
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            system = Principal(kind="user", tenant_id=tenant_id, user_id=owner_id, permissions=frozenset(PERMISSIONS))
            for index in range(seats):
                agent = await service.create_user(
                    session,
                    tenant_id=tenant_id,
                    email=f"agent{index}@{slug}.example.com",
                    name=f"Agent {index}",
                    role_name="agent",
                    password=PASSWORD,
                    verified=True,
                )
                credentials = await service.assign_seat(session, system, agent.id)
                user, _, domain = credentials.sip_uri.removeprefix("sip:").partition("@")
                found.append((user, domain))
        return str(tenant_id), found
    finally:
        await engine.dispose()


def directory_form(node_name: str, user: str, domain: str) -> bytes:
    """A sip_auth directory request with FreeSWITCH's fields in its order (as the simulator sends them)."""
    from backend.channels.voice.esl._wire import url_encode
    from backend.channels.voice.simulator import SimulatorConfig, Switch

    switch = Switch(SimulatorConfig(hostname=node_name))
    extra = [
        ("action", "sip_auth"),
        ("sip_profile", "internal"),
        ("sip_user_agent", "bench-phone"),
        ("sip_auth_username", user),
        ("sip_auth_realm", domain),
        ("sip_auth_nonce", str(uuid.uuid4())),
        ("sip_auth_uri", f"sip:{domain}:5060"),
        ("sip_contact_user", user),
        ("sip_contact_host", "127.0.0.1"),
        ("sip_to_user", user),
        ("sip_to_host", domain),
        ("sip_via_protocol", "udp"),
        ("sip_from_user", user),
        ("sip_from_host", domain),
        ("sip_call_id", f"{uuid.uuid4().hex[:12]}@127.0.0.1"),
        ("sip_request_host", domain),
        ("sip_request_port", "5060"),
        ("sip_auth_qop", "auth"),
        ("sip_auth_cnonce", "6b8b4567"),
        ("sip_auth_nc", "00000001"),
        ("sip_auth_response", "0" * 32),
        ("sip_auth_method", "REGISTER"),
        ("client_port", "5090"),
        ("key", "id"),
        ("user", user),
        ("domain", domain),
        ("ip", "127.0.0.1"),
    ]
    params = switch.request_params(("sofia_reg.c", "sofia_reg_parse_auth", 3124), extra)
    fields = [
        ("hostname", node_name),
        ("section", "directory"),
        ("tag_name", "domain"),
        ("key_name", "name"),
        ("key_value", domain),
        *params,
    ]
    return "&".join(f"{name}={url_encode(value)}" for name, value in fields).encode()


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    writer.write(request)
    await writer.drain()
    status_line = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length)
    return int(status_line.split()[1]), body


_RESET = struct.pack("ii", 1, 0)


async def open_loop(port: int, requests: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Requests sent at a fixed rate whatever the answers' speed; latency counts from the scheduled instant.

    Each request has a connection of its own, opened when it is due and closed after the answer, as
    mod_xml_curl does (a new curl handle per fetch, mod_xml_curl.c `xml_url_fetch`): the connect is part
    of the latency, and a multi-process server shares the connections as the kernel hands them out.
    """
    latencies: list[float] = []
    slow_seconds: dict[int, int] = {}
    errors = 0
    wrong = 0
    clock = time.perf_counter  # uvloop's loop.time() counts whole milliseconds
    start = clock() + 0.5
    total = int(rate * seconds)
    tasks: set[asyncio.Task[None]] = set()

    async def one(index: int, scheduled: float) -> None:
        nonlocal errors, wrong
        writer = None
        try:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                status, body = await _post(reader, writer, requests[index % len(requests)])
            if status != 200:
                errors += 1
            elif b"a1-hash" not in body:
                wrong += 1
            latencies.append((clock() - scheduled) * 1000)
            if latencies[-1] > 20:
                slow_seconds[int(scheduled - start)] = slow_seconds.get(int(scheduled - start), 0) + 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            if writer is not None:
                # Reset rather than close: thousands of client ports in TIME_WAIT would otherwise block the
                # fixed ports our scripts give PostgreSQL and Redis (they are in the ephemeral range).
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                writer.close()

    # The generator's own pauses would count as the server's latency: a full collection walking
    # thousands of live tasks and streams stalls it for tens of milliseconds, so it collects only after.
    gc.collect()
    gc.disable()
    try:
        for index in range(total):
            scheduled = start + index / rate
            delay = scheduled - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(index, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*tasks)
    finally:
        gc.enable()
    return {
        "sent": total,
        "errors": errors,
        "wrong": wrong,
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "slow_seconds": dict(sorted(slow_seconds.items())),
    }


def bench_directory(rate: float, seconds: float, workers: int) -> None:
    port = free_port()
    node_name = f"fs-dir-{uuid.uuid4().hex[:6]}"
    _, seats = asyncio.run(prepare_tenant_and_node(node_name, 20))
    server = start_server(port, workers, {"CC_SWITCH_SECRET": SECRET, "CC_SECRET_KEY": KEY})
    try:
        credentials = base64.b64encode(f"{node_name}:{SECRET}".encode()).decode()
        requests = []
        for user, domain in seats:
            body = directory_form(node_name, user, domain)
            requests.append(
                (
                    f"POST /api/v1/switch/directory HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"User-Agent: freeswitch-xml/1.0\r\nAuthorization: Basic {credentials}\r\n"
                    f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
        uvloop.run(open_loop(port, requests, rate, 3))  # warm up
        print(
            f"directory: {rate:,.0f} requests/s for {seconds:.0f} s, {workers} API workers (load {load()}) ...",
            flush=True,
        )
        r = uvloop.run(open_loop(port, requests, rate, seconds))  # the generator on the loop the server runs
    finally:
        stop_server(server)
    print(
        f"directory {r['sent']:,} sip_auth lookups at {rate:,.0f}/s: p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
        f"max {r['max_ms']:.1f} ms, errors {r['errors']}, answers without a1-hash {r['wrong']} (goal p99 < 10 ms); "
        f"answers over 20 ms by second of the run: {r['slow_seconds'] or 'none'}",
        flush=True,
    )


# --- 4. chaos ----------------------------------------------------------------------------------------


def cdr_document(leg: str, tenant_id: str) -> bytes:
    """d01 (a real mod_json_cdr body) for another leg of our tenant."""
    raw = D01.read_bytes().partition(b"\r\n\r\n")[2]
    document = json.loads(raw)
    document["variables"]["cc_tenant_id"] = tenant_id
    text = json.dumps(document)
    return text.replace(A_LEG, leg).encode()


def pg_ctl(*args: str) -> None:
    command = os.environ["CC_BENCH_PG_CTL"].split() + list(args)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def uvicorn_workers(server: subprocess.Popen[bytes]) -> list[int]:
    output = subprocess.run(["pgrep", "-P", str(server.pid)], check=False, capture_output=True, text=True).stdout
    return [int(pid) for pid in output.split()]


async def deliver(
    port: int, node: str, bodies: list[tuple[str, bytes]], err_dir: Path, retries: int, delay: float, concurrency: int
) -> dict[str, int]:
    """mod_json_cdr's delivery: each leg posted, retried `retries` times `delay` apart, then written to err-log-dir."""
    credentials = "Basic " + base64.b64encode(f"{node}:{SECRET}".encode()).decode()
    counts = {"delivered": 0, "attempts": 0, "to_err_log_dir": 0}
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for item in bodies:
        queue.put_nowait(item)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:

        async def worker() -> None:
            while not queue.empty():
                leg, body = queue.get_nowait()
                for attempt in range(retries + 1):
                    if attempt:
                        await asyncio.sleep(delay)
                    counts["attempts"] += 1
                    try:
                        response = await http.post(
                            f"/api/v1/switch/cdr?uuid={leg}",
                            content=body,
                            headers={"Authorization": credentials, "Content-Type": "application/json"},
                        )
                        if 200 <= response.status_code < 300:
                            counts["delivered"] += 1
                            break
                    except httpx.HTTPError:
                        pass
                else:
                    (err_dir / f"{leg}.cdr.json").write_bytes(body + b"\n")
                    counts["to_err_log_dir"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counts


def bench_chaos(count: int, workers: int) -> None:
    port = free_port()
    node_name = f"fs-chaos-{uuid.uuid4().hex[:6]}"
    tenant_id, _ = asyncio.run(prepare_tenant_and_node(node_name, 0))
    server = start_server(port, workers, {"CC_SWITCH_SECRET": SECRET, "CC_SECRET_KEY": KEY})
    err_dir = Path(tempfile.mkdtemp(prefix="cc-chaos-"))
    try:
        legs = [str(uuid.uuid4()) for _ in range(count)]
        bodies = [(leg, cdr_document(leg, tenant_id)) for leg in legs]
        print(
            f"chaos: {count:,} CDRs posted as mod_json_cdr does (retries 2, delay 1 s, then its err-log-dir), {workers} API workers (load {load()})",
            flush=True,
        )

        async def run() -> dict[str, int]:
            delivery = asyncio.create_task(
                deliver(port, node_name, bodies, err_dir, retries=2, delay=1.0, concurrency=32)
            )
            await asyncio.sleep(3)
            victims = uvicorn_workers(server)
            os.kill(victims[0], signal.SIGKILL)
            print(f"  t+3 s  kill -9 API worker {victims[0]} (uvicorn starts another)", flush=True)
            await asyncio.sleep(2)
            await asyncio.to_thread(pg_ctl, "stop", "-m", "immediate", "-w")
            print("  t+5 s  PostgreSQL stopped with -m immediate", flush=True)
            await asyncio.sleep(5)
            await asyncio.to_thread(pg_ctl, "start", "-w", "-t", "60", "-l", os.environ["CC_BENCH_PG_LOG"])
            print("  t+10 s PostgreSQL started again", flush=True)
            return await delivery

        started = time.monotonic()
        counts = asyncio.run(run())
        took = time.monotonic() - started
        left = sorted(err_dir.glob("*.cdr.json"))
        imported = subprocess.run(
            [sys.executable, "-m", "backend.cli", "import-cdrs", "--dir", str(err_dir)],
            check=False,
            capture_output=True,
            text=True,
            env={**os.environ, "CC_LOG_LEVEL": "WARNING"},
        )
    finally:
        stop_server(server)

    async def rows() -> tuple[int, int, int]:
        import asyncpg

        connection = await asyncpg.connect(os.environ["CC_BENCH_SUPERUSER_DSN"])
        try:
            record = await connection.fetchrow(
                "SELECT count(*) AS n, count(DISTINCT leg_uuid) AS distinct_legs, "
                "count(*) FILTER (WHERE leg_uuid = ANY($2::uuid[])) AS ours FROM voice_cdrs WHERE tenant_id = $1",
                uuid.UUID(tenant_id),
                [uuid.UUID(leg) for leg in legs],
            )
            assert record is not None
            return int(record["n"]), int(record["distinct_legs"]), int(record["ours"])
        finally:
            await connection.close()

    total, distinct, ours = asyncio.run(rows())
    print(
        f"chaos  {counts['delivered']:,} posted OK, {counts['to_err_log_dir']} left in the err-log-dir "
        f"({len(left)} files, imported: {imported.stdout.strip()}), {counts['attempts']:,} attempts in {took:.1f} s; "
        f"rows {total:,}, distinct legs {distinct:,}, ours {ours:,} (goal exactly {count:,}, none duplicated)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["parse", "ingest", "directory", "chaos"])
    parser.add_argument("--ingest-rate", type=float, default=5000)
    parser.add_argument("--ingest-seconds", type=float, default=20)
    parser.add_argument("--ingest-mix", choices=["redis", "full"], nargs="*", default=["redis", "full"])
    parser.add_argument("--holders", type=int, nargs="*", default=[1, 2], help="holder (worker) processes")
    parser.add_argument("--directory-rate", type=float, default=500)
    parser.add_argument("--directory-seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cdrs", type=int, default=10_000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; load average {load()}", flush=True)
    if "parse" in args.parts:
        bench_parse()
    if "ingest" in args.parts:
        for mix in args.ingest_mix:
            for processes in args.holders:
                bench_ingest(args.ingest_rate, args.ingest_seconds, mix, processes)
    if "directory" in args.parts:
        bench_directory(args.directory_rate, args.directory_seconds, args.workers)
    if "chaos" in args.parts:
        bench_chaos(args.cdrs, args.workers)


if __name__ == "__main__":
    main()
