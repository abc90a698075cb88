"""Demo data for the quick start: a provider operator, two tenants with owners, agents with seats.

Voice too: the switch simulator that `scripts/run.sh` starts is registered as a switch node, each tenant
gets a number pointed at a `Support` queue, and (with `CC_DEMO_SEATS_FILE`) the agents' SIP accounts are
written out so that run.sh can register their phones through the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.crypto import SecretBox
from backend.auth.passwords import hash_password
from backend.auth.principal import Principal
from backend.channels.voice import nodes, numbers
from backend.channels.voice.models import PhoneNumber
from backend.channels.voice.schemas import NumberCreate, NumberRouting, SwitchNodeCreate
from backend.config import Settings, get_settings
from backend.db.engine import make_engine, make_sessionmaker, tenant_transaction
from backend.routing import service as routing
from backend.routing.models import Queue
from backend.routing.schemas import QueueIn
from backend.tenants import service
from backend.tenants.models import ProviderUser, Seat
from backend.tenants.permissions import PERMISSIONS
from backend.tenants.schemas import SignupRequest

DEMO_PASSWORD = "Demo-Contact-Center-2026"
PROVIDER_EMAIL = "ops@provider.test"
DEMO_TENANTS = (
    ("acme", "Acme Support", "Europe/Paris", "team"),
    ("globex", "Globex Service", "Asia/Shanghai", "team"),
)
AGENTS_PER_TENANT = 3
DEMO_NUMBERS = {"acme": "+33184880100", "globex": "+33184880200"}
"""Each demo tenant's number (DID), pointed at its `Support` queue."""
DEMO_QUEUE = "Support"


async def ensure_provider_user(email: str, name: str, password: str) -> None:
    """Create a provider operator if none has that e-mail."""
    settings = get_settings()
    engine = make_engine(settings)
    try:
        async with make_sessionmaker(engine)() as session, session.begin():
            if await session.scalar(select(ProviderUser.id).where(ProviderUser.email == email)) is None:
                session.add(ProviderUser(email=email, name=name, password_hash=hash_password(password)))
    finally:
        await engine.dispose()


async def ensure_switch_node(sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> str:
    """The demo's simulated FreeSWITCH (`contactcenter switch-sim`), registered as a node of the cluster."""
    from backend.channels.voice.simulator import SimulatorConfig

    simulator = SimulatorConfig()
    async with sessionmaker() as session, session.begin():
        operator = await session.scalar(select(ProviderUser.id).where(ProviderUser.email == PROVIDER_EMAIL))
        ops = Principal(kind="provider", tenant_id=None, user_id=operator)
        existing = await nodes.node_by_name(session, simulator.hostname)
        if existing is None:
            await nodes.register_node(
                session,
                ops,
                SwitchNodeCreate(
                    name=simulator.hostname,
                    esl_host="127.0.0.1",
                    esl_port=simulator.esl_port or 8021,
                    esl_password=simulator.esl_password,
                    xml_curl_sources=["127.0.0.1/32", "::1/128"],
                    sip_address=f"127.0.0.1:{simulator.sip_port}",
                ),
                SecretBox(settings.secret_key),
            )
        else:
            existing.esl_port = simulator.esl_port or 8021
            existing.esl_password_sealed = SecretBox(settings.secret_key).seal(simulator.esl_password)
    return f"Switch node {simulator.hostname!r}: the simulator, ESL 127.0.0.1:{simulator.esl_port or 8021}"


async def ensure_number(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, owner: Principal, e164: str
) -> str:
    """The tenant's demo number, from the pool, pointed at its `Support` queue (made if missing)."""
    async with sessionmaker() as session, session.begin():
        operator = await session.scalar(select(ProviderUser.id).where(ProviderUser.email == PROVIDER_EMAIL))
        ops = Principal(kind="provider", tenant_id=None, user_id=operator)
        number_id = await session.scalar(select(PhoneNumber.id).where(PhoneNumber.e164 == e164))
        if number_id is None:
            number_id = (await numbers.add_number(session, ops, NumberCreate(number=e164, label="demo"))).id
        await numbers.assign_number(session, ops, number_id, tenant_id)
    async with tenant_transaction(sessionmaker, tenant_id) as session:
        queue_id = await session.scalar(select(Queue.id).where(Queue.name == DEMO_QUEUE))
        if queue_id is None:
            queue_id = (await routing.create_queue(session, owner, QueueIn(name=DEMO_QUEUE))).id
        await numbers.route_number(session, owner, number_id, NumberRouting(queue_id=queue_id))
    return f"  number {e164} -> queue {DEMO_QUEUE!r}"


async def create_demo_data() -> list[str]:
    """Create (or top up) the demo and return the lines to print, SIP passwords included."""
    settings = get_settings()
    await ensure_provider_user(PROVIDER_EMAIL, "Provider Operations", DEMO_PASSWORD)
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    lines = [
        f"Provider operations: {PROVIDER_EMAIL} / {DEMO_PASSWORD}  (POST /api/v1/ops/auth/login)",
    ]
    phones: list[dict[str, str]] = []
    try:
        lines.append(await ensure_switch_node(sessionmaker, settings))
        for slug, company, zone, plan in DEMO_TENANTS:
            async with sessionmaker() as session, session.begin():
                tenant = await service.find_tenant_by_slug(session, slug)
                if tenant is None:
                    result = await service.signup(
                        session,
                        SignupRequest(
                            company_name=company,
                            slug=slug,
                            admin_email=f"owner@{slug}.test",
                            admin_name=f"{company} Owner",
                            password=DEMO_PASSWORD,
                            time_zone=zone,
                            plan=plan,
                        ),
                        settings,
                    )
                    tenant_id = result.tenant.id
                    owner_id = result.owner_id
                else:
                    tenant_id = tenant.id
                    owner_id = uuid.UUID(int=0)
            lines.append(f"Workspace {slug!r}: owner@{slug}.test / {DEMO_PASSWORD}")
            async with tenant_transaction(sessionmaker, tenant_id) as session:
                if owner_id.int == 0:
                    owner = await service.find_user_by_email(session, f"owner@{slug}.test")
                    assert owner is not None
                    owner_id = owner.id
                system = Principal(
                    kind="user", tenant_id=tenant_id, user_id=owner_id, permissions=frozenset(PERMISSIONS)
                )
                for number in range(1, AGENTS_PER_TENANT + 1):
                    email = f"agent{number}@{slug}.test"
                    agent = await service.find_user_by_email(session, email)
                    if agent is None:
                        agent = await service.create_user(
                            session,
                            tenant_id=tenant_id,
                            email=email,
                            name=f"Agent {number}",
                            role_name="agent",
                            password=DEMO_PASSWORD,
                            verified=True,
                        )
                    seat_id = await session.scalar(select(Seat.id).where(Seat.user_id == agent.id))
                    if seat_id is None:
                        credentials = await service.assign_seat(session, system, agent.id)
                    else:
                        credentials = await service.rotate_seat_credentials(session, system, seat_id)
                    sip = f"SIP {credentials.sip_uri} password {credentials.sip_password}"
                    lines.append(f"  agent {email} / {DEMO_PASSWORD}  {sip}")
                    user, _, domain = credentials.sip_uri.removeprefix("sip:").partition("@")
                    phones.append({"agent": email, "user": user, "domain": domain})
            lines.append(await ensure_number(sessionmaker, tenant_id, system, DEMO_NUMBERS[slug]))
    finally:
        await engine.dispose()
    seats_file = os.environ.get("CC_DEMO_SEATS_FILE")
    if seats_file:
        await asyncio.to_thread(Path(seats_file).write_text, json.dumps(phones, indent=2))
    return lines
