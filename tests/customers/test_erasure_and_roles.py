"""Erasure through the hook registry, every built-in role against the store, and the permission migration."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select

from backend.customers import service
from backend.customers.access import Viewer
from backend.customers.erasure import ErasureRequest, erasure_hooks, register_erasure_hook, unregister_erasure_hook
from backend.customers.schemas import CustomerCreate, CustomerUpdate
from backend.db.engine import tenant_transaction
from backend.lib.problems import Forbidden, NotFound
from backend.routing.models import Interaction, InteractionEvent
from backend.tenants.models import AuditEntry
from backend.tenants.permissions import BUILTIN_ROLES

pytestmark = pytest.mark.integration


async def test_erasure_anonymises_everywhere_and_keeps_statistics(client, factory, sessionmaker):
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    customer = await factory.customer(
        ctx, name="Chen Jing", phones=["+8613855556666"], emails=["chen.jing@example.com"]
    )
    skill = await factory.skill(ctx)
    queue = await factory.queue(
        ctx, skills=[{"skill_id": str(skill), "steps": [{"after_seconds": 0, "min_level": 10}]}]
    )
    waiting = await client.post(
        "/api/v1/interactions",
        json={
            "channel": "voice",
            "queue_id": str(queue),
            "customer_ref": "+8613855556666",
            "attributes": {"caller_name": "Chen Jing", "ivr_choice": "2"},
        },
        headers=ctx.headers,
    )
    interaction_id = waiting.json()["id"]
    callback = await client.post(
        f"/api/v1/interactions/{interaction_id}/callback", json={"number": "+8613855556666"}, headers=ctx.headers
    )
    assert callback.status_code == 200, callback.text
    await client.post(
        f"/api/v1/customers/{customer['id']}/notes", json={"body": "Chen Jing is a teacher"}, headers=ctx.headers
    )
    ticket = await factory.ticket(ctx, customer_id=customer["id"], subject="Chen Jing wants a refund")
    seen: list[ErasureRequest] = []

    async def recordings(session, request: ErasureRequest) -> int:
        seen.append(request)
        return 3

    register_erasure_hook("test_recordings", recordings)
    try:
        assert set(erasure_hooks()) >= {"interactions", "customer_notes_and_tickets", "test_recordings"}
        erased = await client.post(
            f"/api/v1/customers/{customer['id']}/erase", headers={**ctx.headers, "If-Match": customer["etag"]}
        )
    finally:
        unregister_erasure_hook("test_recordings")
    assert erased.status_code == 200, erased.text
    body = erased.json()
    assert body["erased"] is True and body["name"] == "[erased]" and body["phones"] == [] and body["emails"] == []
    assert seen[0].customer_id.hex == customer["id"].replace("-", "")
    assert "+8613855556666" in seen[0].secrets and "Chen Jing" in seen[0].secrets
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        interaction = await session.scalar(select(Interaction).where(Interaction.id == interaction_id))
        events = (
            await session.scalars(select(InteractionEvent).where(InteractionEvent.interaction_id == interaction_id))
        ).all()
        entries = (await session.scalars(select(AuditEntry).where(AuditEntry.target_id == customer["id"]))).all()
    # The interaction (and so every statistic) stays, pointing at the anonymised record, with no trace of the person.
    assert interaction is not None and interaction.channel == "callback"
    assert interaction.customer_ref == customer["id"]
    assert interaction.attributes["caller_name"] == "[erased]" and interaction.attributes["ivr_choice"] == "2"
    assert "13855556666" not in str(interaction.attributes)
    assert all("13855556666" not in str(e.data) for e in events)
    assert [e.name for e in events][:2] == ["created", "queued"]
    notes = (await client.get(f"/api/v1/customers/{customer['id']}/notes", headers=ctx.headers)).json()["items"]
    assert notes[0]["body"] == "[erased]"
    assert (await client.get(f"/api/v1/tickets/{ticket['id']}", headers=ctx.headers)).json()[
        "subject"
    ] == "[erased] wants a refund"
    erase_entry = next(e for e in entries if e.action == "customer.erase")
    assert erase_entry.after["changed"]["test_recordings"] == 3
    assert erase_entry.after["changed"]["interactions"] == 1
    for entry in entries:
        assert "Chen Jing" not in str(entry.before) + str(entry.after)
        assert "13855556666" not in str(entry.before) + str(entry.after)
    pop = (
        await client.get("/api/v1/customers/screen-pop", params={"phone": "13855556666"}, headers=ctx.headers)
    ).json()
    assert pop["known"] is False
    again = await client.post(f"/api/v1/customers/{customer['id']}/erase", headers={**ctx.headers, "If-Match": '"2"'})
    assert again.status_code == 409


async def test_a_failing_hook_erases_nothing(client, factory, sessionmaker):
    ctx = await factory.tenant()
    customer = await factory.customer(ctx, name="Keep Me")

    async def broken(session, request: ErasureRequest) -> int:
        raise RuntimeError("storage down")

    register_erasure_hook("test_broken", broken)
    try:
        response = await client.post(
            f"/api/v1/customers/{customer['id']}/erase", headers={**ctx.headers, "If-Match": customer["etag"]}
        )
    finally:
        unregister_erasure_hook("test_broken")
    assert response.status_code == 500
    assert (await client.get(f"/api/v1/customers/{customer['id']}", headers=ctx.headers)).json()["name"] == "Keep Me"


def _viewer(ctx, role: str, user_id, teams=frozenset()) -> Viewer:
    return Viewer(ctx.tenant_id, user_id, "user", user_id, BUILTIN_ROLES[role][1], frozenset(teams))


@pytest.mark.parametrize("role", ["owner", "admin", "supervisor", "agent"])
async def test_every_builtin_role_against_the_store(role, factory, sessionmaker):
    """The service layer decides, whatever route or job calls it: scope by unit, masking, and the permissions."""
    ctx = await factory.tenant(time_zone="Asia/Shanghai")
    north, south = await factory.team(ctx), await factory.team(ctx)
    user = await factory.user(ctx, role=role)
    viewer = _viewer(ctx, role, user["id"], {north})
    permissions = BUILTIN_ROLES[role][1]
    async with tenant_transaction(sessionmaker, ctx.tenant_id) as session:
        admin = _viewer(ctx, "owner", ctx.owner_id)
        ours = await service.create_customer(
            session, admin, CustomerCreate(name="Ours", phones=["13800001111"], team_id=north)
        )
        theirs = await service.create_customer(
            session, admin, CustomerCreate(name="Theirs", phones=["13800002222"], team_id=south)
        )
        seen = await service.get_customer(session, viewer, ours.id)
        assert seen.masked is ("customers:read_sensitive" not in permissions)
        assert seen.phones[0].number == ("+8613800001111" if not seen.masked else "+86 138****1111")
        if "customers:all_units" in permissions:
            assert (await service.get_customer(session, viewer, theirs.id)).name == "Theirs"
        else:
            with pytest.raises(NotFound):
                await service.get_customer(session, viewer, theirs.id)
            with pytest.raises(Forbidden):
                await service.create_customer(session, viewer, CustomerCreate(name="Moved", team_id=south))
        # Agents' new records belong to their one unit.
        made = await service.create_customer(session, viewer, CustomerCreate(name="Made here"))
        assert made.team_id == (None if "customers:all_units" in permissions else north)
        changed = await service.update_customer(session, viewer, ours.id, CustomerUpdate(tags=["x"]), '"1"')
        assert changed.version == 2
    expected = {
        "owner": {
            "customers:delete",
            "customers:import",
            "customers:export",
            "customers:configure",
            "tickets:configure",
        },
        "admin": {
            "customers:delete",
            "customers:import",
            "customers:export",
            "customers:configure",
            "tickets:configure",
        },
        "supervisor": {"customers:export", "tickets:write"},
        "agent": {"customers:write", "tickets:write"},
    }[role]
    assert expected <= permissions
    if role == "agent":
        assert (
            not {"customers:read_sensitive", "customers:delete", "customers:export", "customers:import"} & permissions
        )
    if role == "supervisor":
        assert not {"customers:delete", "customers:import", "customers:configure"} & permissions


MIGRATION_0006 = next(Path("backend/db/migrations/versions").glob("*_customer_store_0006.py"))


async def test_migration_gives_existing_tenants_the_new_permissions(factory):
    """Tenants created before revision 0006 get the new permissions on their built-in roles."""
    path = MIGRATION_0006
    spec = importlib.util.spec_from_file_location("migration_0006", path)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    ctx = await factory.tenant(login=False)
    dsn = os.environ["DATABASE_OWNER_URL"].replace("postgresql+asyncpg://", "postgresql://")
    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(ctx.tenant_id))
            # As the tenant's roles were before this revision.
            await connection.execute(
                "UPDATE roles SET permissions = ARRAY(SELECT p FROM unnest(permissions) p "
                "WHERE p NOT LIKE 'tickets:%' AND p NOT IN ('customers:all_units', 'customers:configure'))"
            )
        await connection.execute(migration.grant_new_permissions_sql())
        await connection.execute(migration.grant_new_permissions_sql())  # twice: no duplicates
        async with connection.transaction():
            await connection.execute("SELECT set_config('app.tenant_id', $1, true)", str(ctx.tenant_id))
            roles = {
                r["name"]: set(r["permissions"]) for r in await connection.fetch("SELECT name, permissions FROM roles")
            }
            counts = await connection.fetch(
                "SELECT cardinality(permissions) = cardinality(ARRAY(SELECT DISTINCT unnest(permissions))) AS ok FROM roles"
            )
    finally:
        await connection.close()
    for name, (_, permissions) in BUILTIN_ROLES.items():
        assert roles[name] == set(permissions), name
    assert all(r["ok"] for r in counts)
