"""`contactcenter call-control`: the call-control server as a process of its own (several may run)."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import structlog

from backend.channels.voice.call_control.records import CallStore
from backend.channels.voice.call_control.server import CallControlServer
from backend.channels.voice.call_control.services import CallServices
from backend.channels.voice.esl_config import client_config
from backend.channels.voice.media import PromptPlayer
from backend.channels.voice.outbound import OutboundGuard
from backend.channels.voice.recordings import CustomerStoreTickets, VoicemailDesk
from backend.channels.voice.service import VoiceSwitchboard
from backend.config import Settings
from backend.db.engine import make_engine, make_sessionmaker
from backend.lib.redis_client import make_redis
from backend.lib.storage import make_storage

log = structlog.get_logger("voice.call_control")


def listen_address(settings: Settings) -> tuple[str, int]:
    """Where the server binds: `CC_CALL_CONTROL_LISTEN`, else the address the dialplan hands calls to."""
    host, _, port = (settings.call_control_listen or settings.call_control_address).rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - FreeSWITCH nodes connect from elsewhere


async def run(settings: Settings, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Build the services, serve until SIGTERM/SIGINT (or `stop`), then let the calls go to other processes."""
    from backend.worker import build_routing

    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    redis = make_redis(settings.redis_url)
    storage = make_storage(settings)
    routing = build_routing(settings, sessionmaker, redis)
    voice = VoiceSwitchboard(sessionmaker, redis, settings, routing)
    services = CallServices(
        settings=settings,
        sessionmaker=sessionmaker,
        routing=routing,
        voice=voice,
        player=PromptPlayer(settings),
        voicemail=VoicemailDesk(sessionmaker, storage, settings, routing, CustomerStoreTickets(sessionmaker)),
        outbound=OutboundGuard(sessionmaker, redis, settings),
        store=CallStore(redis, settings),
    )
    host, port = listen_address(settings)
    server = CallControlServer(services, host, port, config=client_config(settings), reuse_port=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        print(f'{{"ready": true, "port": {server.port}, "owner": "{services.store.owner}"}}', flush=True)  # noqa: T201
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        await server.close()
        await storage.close()
        await redis.aclose()
        await engine.dispose()
