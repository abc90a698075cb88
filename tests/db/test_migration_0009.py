"""Migration 0009 on a database that already has tenants: their built-in roles gain the new permissions.

Also checks that the tables 0009 creates match the models (Alembic's autogenerate finds nothing to do).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from backend.db.migrate import upgrade

pytestmark = pytest.mark.integration

NEW_TABLES = {
    "ivr_flows",
    "ivr_flow_versions",
    "voice_prompts",
    "voice_queue_settings",
    "voice_recordings",
    "voice_voicemails",
    "carrier_gateways",
    "outbound_routes",
    "voice_outbound_policies",
    "voice_supervision_sessions",
}


def _run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture
def scratch_database(database_name: str):
    """A database of its own, migrated only as far as the test says."""
    superuser = os.environ["CC_TEST_PG_SUPERUSER_DSN"]
    hostport = os.environ["CC_TEST_PG_HOSTPORT"]
    name = f"cc_mig_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        connection = await asyncpg.connect(superuser)
        await connection.execute(f'CREATE DATABASE "{name}" OWNER cc_owner')
        await connection.close()
        connection = await asyncpg.connect(superuser.replace("/postgres?", f"/{name}?"))
        await connection.execute(
            f"""
            REVOKE ALL ON SCHEMA public FROM PUBLIC;
            ALTER SCHEMA public OWNER TO cc_owner;
            GRANT USAGE ON SCHEMA public TO cc_app;
            GRANT CONNECT ON DATABASE "{name}" TO cc_app;
            CREATE EXTENSION IF NOT EXISTS citext;
            CREATE EXTENSION IF NOT EXISTS pg_trgm;
            """
        )
        await connection.close()

    async def drop() -> None:
        connection = await asyncpg.connect(superuser)
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.close()

    _run(create())
    yield (
        f"postgresql+asyncpg://cc_owner:cc_owner@{hostport}/{name}",
        f"postgresql://cc_owner:cc_owner@{hostport}/{name}",
    )
    _run(drop())


def test_existing_tenants_built_in_roles_gain_the_new_permissions(scratch_database):
    alembic_url, plain_url = scratch_database
    upgrade(alembic_url, "0008")
    tenant = uuid.uuid4()
    roles = {
        "owner": ["calls:supervise", "users:read"],
        "supervisor": ["calls:supervise", "reports:read"],
        "agent": ["agent:workspace"],
    }

    async def seed() -> None:
        connection = await asyncpg.connect(plain_url)
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant))
            plan = await connection.fetchval("SELECT id FROM plans ORDER BY seat_cap LIMIT 1")
            await connection.execute(
                "INSERT INTO tenants (id, slug, name, status, plan_id, time_zone, sip_domain, require_mfa, created_at)"
                " VALUES ($1, 'old-co', 'Old Co', 'active', $2, 'UTC', 'old-co.sip.test', false, now())",
                tenant,
                plan,
            )
            for name, permissions in [*roles.items(), ("night-shift", ["calls:supervise"])]:
                await connection.execute(
                    "INSERT INTO roles (tenant_id, id, name, description, builtin, permissions, created_at)"
                    " VALUES ($1, $2, $3, '', $4, $5, now())",
                    tenant,
                    uuid.uuid4(),
                    name,
                    name in roles,
                    permissions,
                )
        await connection.close()

    async def read() -> dict[str, list[str]]:
        connection = await asyncpg.connect(plain_url)
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant))
            rows = await connection.fetch("SELECT name, permissions FROM roles")
        await connection.close()
        return {r["name"]: list(r["permissions"]) for r in rows}

    _run(seed())
    upgrade(alembic_url, "head")
    after = _run(read())
    modes = {"calls:listen", "calls:whisper", "calls:barge"}
    assert modes | {"calls:outbound", "recordings:read", "voicemail:read", "reports:read"} <= set(after["supervisor"])
    assert "calls:supervise" not in set().union(*after.values())
    assert set(after["agent"]) == {"agent:workspace", "calls:outbound"}
    assert set(after["night-shift"]) == modes  # a custom role keeps what it could do
    assert after["owner"] == sorted(after["owner"])

    # The tables 0009 made are what the models say.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from backend.db.models import metadata

    async def compare() -> list:
        engine = create_async_engine(alembic_url)
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync, opts={"compare_type": True}), metadata
                    )
                )
        finally:
            await engine.dispose()

    differences = _run(compare())

    def table_of(diff) -> str:
        item = diff[0] if isinstance(diff, list) else diff
        for part in item[1:]:
            name = getattr(part, "name", None) if not isinstance(part, str) else part
            table = getattr(part, "table", None)
            if table is not None:
                return str(table.name)
            if isinstance(name, str) and name in NEW_TABLES:
                return name
        return ""

    ours = [d for d in differences if table_of(d) in NEW_TABLES]
    assert ours == []
