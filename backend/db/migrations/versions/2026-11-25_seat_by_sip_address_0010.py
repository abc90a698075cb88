"""seat_by_sip_address(domain, username): a SIP address's tenant and seat in one statement, under row-level security

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-25 15:00:00.000000

The switch asks for a seat on every REGISTER and every call a phone places (mod_xml_curl's
directory). Resolving the domain (global `tenants`), scoping to the tenant and reading the seat
took a transaction of four round trips; this function does it in one statement. It runs as its
caller (SECURITY INVOKER), so the seat and user are read under the tenant's row-level security
exactly as before, and it puts back the caller's tenant setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION seat_by_sip_address(p_domain text, p_username text)
        RETURNS TABLE (
            tenant_id uuid, tenant_status text, sip_domain text,
            seat_id uuid, user_id uuid, sip_username text, sip_a1_hash text, user_name text, user_status text
        )
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            found_tenant record;
            previous text := current_setting('app.tenant_id', true);
        BEGIN
            SELECT t.id, t.status, t.sip_domain INTO found_tenant
            FROM tenants t WHERE t.sip_domain = lower(btrim(p_domain));
            IF NOT FOUND THEN
                RETURN;
            END IF;
            PERFORM set_config('app.tenant_id', found_tenant.id::text, true);
            RETURN QUERY
                SELECT found_tenant.id, found_tenant.status::text, found_tenant.sip_domain::text,
                       s.id, s.user_id, s.sip_username::text, s.sip_a1_hash::text, u.name::text, u.status::text
                FROM (SELECT 1) AS one
                LEFT JOIN seats s ON s.tenant_id = found_tenant.id AND s.sip_username = p_username
                LEFT JOIN users u ON u.tenant_id = s.tenant_id AND u.id = s.user_id;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
        END
        $$
        """
    )
    op.execute("REVOKE ALL ON FUNCTION seat_by_sip_address(text, text) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION seat_by_sip_address(text, text) TO cc_app")


def downgrade() -> None:
    op.execute("DROP FUNCTION seat_by_sip_address(text, text)")
