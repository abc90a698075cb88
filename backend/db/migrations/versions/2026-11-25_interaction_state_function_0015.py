"""interaction_state(tenant, interaction): an interaction's state in one statement, outside a transaction

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-25 20:40:00.000000

Every call's end is reported three times: by call control when the caller's socket closes, and by both CDR
paths (the node's CHANNEL_HANGUP_COMPLETE in the worker, mod_json_cdr's POST in the API). The first ends the
interaction; the others found it ended only after a transaction of four round trips (BEGIN, the tenant
setting, the row locked, COMMIT). This read answers them in one. It runs as its caller (SECURITY INVOKER),
under the tenant's row-level security, and puts back the caller's tenant setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "interaction_state(uuid, uuid)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION interaction_state(p_tenant uuid, p_interaction uuid)
        RETURNS text
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_state text;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            SELECT state INTO v_state FROM interactions WHERE tenant_id = p_tenant AND id = p_interaction;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN v_state;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
