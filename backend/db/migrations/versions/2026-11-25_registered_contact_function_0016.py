"""registered_contact(tenant, user, now): where to bridge a call to an agent, in one statement

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-25 20:45:00.000000

Call control asks once per offered call where the agent's softphone is (their freshest live registration on a
node that is up). That was a transaction of four round trips through the ORM. This function reads the same
row in one statement outside a transaction. It runs as its caller (SECURITY INVOKER), under the tenant's
row-level security, and puts back the caller's tenant setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "registered_contact(uuid, uuid, timestamptz)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION registered_contact(p_tenant uuid, p_user uuid, p_now timestamptz)
        RETURNS TABLE (
            node_id uuid, node_name text, node_sip_address text, contact text, transport text,
            sip_username text, expires_at timestamptz
        )
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            RETURN QUERY
                SELECT r.node_id, n.name::text, n.sip_address::text, r.contact::text, r.transport::text,
                       r.sip_username::text, r.expires_at
                FROM voice_registrations r JOIN switch_nodes n ON n.id = r.node_id
                WHERE r.tenant_id = p_tenant AND r.user_id = p_user AND r.expires_at > p_now AND n.health = 'up'
                ORDER BY r.registered_at DESC
                LIMIT 1;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
