"""Demo data for the quick start: a provider operator, two tenants with owners, agents with seats."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from backend.auth.passwords import hash_password
from backend.auth.principal import Principal
from backend.config import get_settings
from backend.db.engine import make_engine, make_sessionmaker, tenant_transaction
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


async def create_demo_data() -> list[str]:
    """Create (or top up) the demo and return the lines to print, SIP passwords included."""
    settings = get_settings()
    await ensure_provider_user(PROVIDER_EMAIL, "Provider Operations", DEMO_PASSWORD)
    engine = make_engine(settings)
    sessionmaker = make_sessionmaker(engine)
    lines = [
        f"Provider operations: {PROVIDER_EMAIL} / {DEMO_PASSWORD}  (POST /api/v1/ops/auth/login)",
    ]
    try:
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
    finally:
        await engine.dispose()
    return lines
