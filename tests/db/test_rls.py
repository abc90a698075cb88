"""Row-level security: fail-closed tenant context, database-enforced writes, and coverage of every table."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from backend.db.engine import tenant_transaction
from backend.db.tenancy import CROSS_TENANT_FUNCTIONS, GLOBAL_TABLES

pytestmark = pytest.mark.integration


async def test_no_tenant_context_sees_no_rows(factory, sessionmaker):
    """ASVS V8.2.2: without `app.tenant_id` a query of a tenant table returns nothing, not everything."""
    await factory.tenant(login=False)
    async with sessionmaker() as session, session.begin():
        users = await session.scalar(text("SELECT count(*) FROM users"))
        roles = await session.scalar(text("SELECT count(*) FROM roles"))
    assert users == 0
    assert roles == 0


async def test_tenant_context_sees_only_its_rows(factory, sessionmaker):
    """A tenant's transaction sees its own users only, whatever the WHERE clause says."""
    a = await factory.tenant(login=False)
    b = await factory.tenant(login=False)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        tenants_seen = set((await session.scalars(text("SELECT DISTINCT tenant_id FROM users"))).all())
        b_rows = await session.scalar(text("SELECT count(*) FROM users WHERE tenant_id = :b"), {"b": b.tenant_id})
    assert tenants_seen == {a.tenant_id}
    assert b_rows == 0


async def test_context_does_not_outlive_its_transaction(factory, engine):
    """SET LOCAL: the next transaction on the same pooled connection has no tenant."""
    a = await factory.tenant(login=False)
    async with engine.connect() as connection:
        async with connection.begin():
            await connection.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": str(a.tenant_id)})
            assert await connection.scalar(text("SELECT count(*) FROM users")) == 1
        async with connection.begin():
            assert await connection.scalar(text("SELECT count(*) FROM users")) == 0


async def test_insert_with_another_tenants_id_is_refused_by_the_database(factory, sessionmaker):
    """ASVS V8.2.2: WITH CHECK refuses a row written for another tenant, even by raw SQL."""
    a = await factory.tenant(login=False)
    b = await factory.tenant(login=False)
    with pytest.raises(DBAPIError, match="row-level security"):
        async with tenant_transaction(sessionmaker, a.tenant_id) as session:
            await session.execute(
                text("INSERT INTO teams (tenant_id, id, name, description) VALUES (:b, :id, 'intruders', '')"),
                {"b": b.tenant_id, "id": uuid.uuid4()},
            )
    async with tenant_transaction(sessionmaker, b.tenant_id) as session:
        assert await session.scalar(text("SELECT count(*) FROM teams WHERE name = 'intruders'")) == 0


async def test_update_cannot_move_a_row_to_another_tenant(factory, sessionmaker):
    """An UPDATE that would hand a row to another tenant fails the policy's WITH CHECK."""
    a = await factory.tenant(login=False)
    b = await factory.tenant(login=False)
    with pytest.raises(DBAPIError, match="row-level security"):
        async with tenant_transaction(sessionmaker, a.tenant_id) as session:
            await session.execute(text("UPDATE audit_log SET tenant_id = :b"), {"b": b.tenant_id})


async def test_cannot_update_or_delete_another_tenants_rows(factory, sessionmaker):
    """USING hides other tenants' rows from UPDATE and DELETE: zero rows affected."""
    a = await factory.tenant(login=False)
    b = await factory.tenant(login=False)
    async with tenant_transaction(sessionmaker, a.tenant_id) as session:
        updated = await session.execute(
            text("UPDATE users SET name = 'pwned' WHERE tenant_id = :b"), {"b": b.tenant_id}
        )
        deleted = await session.execute(text("DELETE FROM roles WHERE tenant_id = :b"), {"b": b.tenant_id})
    assert updated.rowcount == 0  # type: ignore[attr-defined]
    assert deleted.rowcount == 0  # type: ignore[attr-defined]


async def test_every_table_is_global_or_under_forced_rls_with_both_policies(engine):
    """A table added later without RLS fails here, unless it is named on the global allow-list."""
    async with engine.connect() as connection:
        tables = (
            await connection.execute(
                text(
                    """
                    SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
                    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                    """
                )
            )
        ).all()
        policies = (
            await connection.execute(
                text(
                    """
                    SELECT tablename, cmd, roles::text[] AS roles, qual, with_check
                    FROM pg_policies WHERE schemaname = 'public'
                    """
                )
            )
        ).all()
    assert tables, "no tables found: migrations did not run"
    problems = []
    for name, enabled, forced in tables:
        if name in GLOBAL_TABLES:
            continue
        if not (enabled and forced):
            problems.append(f"{name}: RLS enabled={enabled} forced={forced}")
            continue
        guarding = [
            p
            for p in policies
            if p.tablename == name
            and p.cmd == "ALL"
            and p.roles == ["public"]
            and p.qual
            and p.with_check
            and "app.tenant_id" in p.qual
            and "app.tenant_id" in p.with_check
        ]
        if not guarding:
            problems.append(f"{name}: no policy on app.tenant_id with both USING and WITH CHECK")
        has_tenant_column = await _leads_with_tenant(engine, name)
        if not has_tenant_column:
            problems.append(f"{name}: primary key does not lead with tenant_id")
    assert not problems, "\n".join(problems)


async def _leads_with_tenant(engine, table: str) -> bool:
    async with engine.connect() as connection:
        first = await connection.scalar(
            text(
                """
                SELECT a.attname FROM pg_index i
                JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                WHERE i.indrelid = CAST(:t AS regclass) AND i.indisprimary
                """
            ),
            {"t": table},
        )
    return bool(first == "tenant_id")


async def test_application_role_owns_nothing_and_cannot_bypass_rls(engine):
    """The role the API connects as is neither owner, superuser nor BYPASSRLS, so RLS always applies."""
    async with engine.connect() as connection:
        role = (
            await connection.execute(
                text("SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user")
            )
        ).one()
        owned = (
            await connection.execute(
                text(
                    """
                    SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = current_user
                    """
                )
            )
        ).all()
        member_of_bypass = await connection.scalar(
            text(
                """
                SELECT count(*) FROM pg_roles r
                WHERE (r.rolbypassrls OR r.rolsuper) AND pg_has_role(current_user, r.oid, 'MEMBER')
                """
            )
        )
    assert role.current_user == "cc_app"
    assert role.rolsuper is False
    assert role.rolbypassrls is False
    assert owned == []
    assert member_of_bypass == 0


async def test_only_the_listed_functions_cross_tenants(engine):
    """Cross-tenant reads go through the SECURITY DEFINER functions on the allow-list, nothing else."""
    async with engine.connect() as connection:
        definers = set(
            (
                await connection.scalars(
                    text(
                        """
                        SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE n.nspname = 'public' AND p.prosecdef
                        """
                    )
                )
            ).all()
        )
        owners = set(
            (
                await connection.scalars(
                    text(
                        """
                        SELECT pg_get_userbyid(p.proowner) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                        WHERE n.nspname = 'public' AND p.prosecdef
                        """
                    )
                )
            ).all()
        )
    assert definers == set(CROSS_TENANT_FUNCTIONS)
    assert owners == {"cc_lookup"}


async def test_cross_tenant_lookup_returns_only_the_tenant_id(factory, sessionmaker):
    """The API-key lookup resolves a prefix to its tenant and exposes nothing else of the row."""
    a = await factory.tenant()
    created = await factory.api_key(a)
    async with sessionmaker() as session, session.begin():
        tenant_id = await session.scalar(text("SELECT xt_api_key_tenant(:p)"), {"p": created["api_key"]["prefix"]})
        assert await session.scalar(text("SELECT xt_api_key_tenant('nope')")) is None
        # Without a tenant context the table itself stays invisible to the application role.
        assert await session.scalar(text("SELECT count(*) FROM api_keys")) == 0
    assert tenant_id == a.tenant_id
