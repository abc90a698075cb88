"""Tenant context for row-level security, and the allow-list of global tables.

Every tenant-owned table has RLS enabled and forced with a policy on the
`app.tenant_id` setting. A transaction that has not set it sees no rows.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

TENANT_SETTING = "app.tenant_id"

# The only tables without row-level security. Each is either provider-owned or
# a lookup that must find a tenant before one is known. Adding a table here is
# a security decision: the RLS coverage test fails for any table not listed
# here that lacks forced RLS with both policies.
GLOBAL_TABLES: frozenset[str] = frozenset(
    {
        "alembic_version",
        "plans",
        "tenants",  # also the workspace-slug and SIP-domain lookups at login/registration
        "provider_users",
        "provider_audit_log",
        "phone_numbers",  # the provider's number pool; number -> tenant lookup
        "switch_nodes",
        "unattributed_cdrs",  # provider-owned: call legs no tenant could be found for, kept rather than lost
        "carrier_gateways",  # provider-owned: the SIP trunks outbound calls leave through
        "outbound_routes",  # provider-owned: which gateway carries which destination prefix
    }
)

# Functions that read across tenants. They are SECURITY DEFINER, owned by the
# NOLOGIN role `cc_lookup` whose only rights are SELECT policies on the tables
# they read, and each returns no more than the tenant id it resolves. A test
# fails if any other SECURITY DEFINER function exists.
CROSS_TENANT_FUNCTIONS: frozenset[str] = frozenset(
    {
        "xt_api_key_tenant",
        "xt_voice_registration_tenants",  # tenants with SIP registrations on a (failed) switch node
    }
)

_SET_TENANT = text("SELECT set_config('app.tenant_id', :tenant_id, true)")


async def set_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    """Scope the session's current transaction to one tenant (SET LOCAL semantics)."""
    await session.execute(_SET_TENANT, {"tenant_id": str(tenant_id)})


def rls_policy_sql(table: str) -> list[str]:
    """The statements that put a tenant-owned table under forced row-level security."""
    predicate = "tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid"
    return [
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} USING ({predicate}) WITH CHECK ({predicate})",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO cc_app",
    ]
