"""open_interaction(...): a contact a channel holds itself (a call entering its IVR) opened in one statement

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-25 21:00:00.000000

Every call opens its interaction when call control answers it: the row in state `new` and its `created`
event. Through the ORM that was a transaction of five round trips (BEGIN, the tenant setting, two INSERTs,
COMMIT). This function writes both rows in one statement, its own transaction. It runs as its caller
(SECURITY INVOKER), under the tenant's row-level security, and puts back the caller's tenant setting before it
returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "open_interaction(uuid, uuid, text, text, jsonb, smallint, timestamptz, jsonb)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION open_interaction(
            p_tenant uuid, p_id uuid, p_channel text, p_customer_ref text, p_attributes jsonb, p_priority smallint,
            p_at timestamptz, p_data jsonb
        )
        RETURNS void
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            INSERT INTO interactions (tenant_id, id, channel, customer_ref, priority, attributes, state, last_seq,
                                      created_at)
            VALUES (p_tenant, p_id, p_channel, p_customer_ref, p_priority, p_attributes, 'new', 1, p_at);
            INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
            VALUES (p_tenant, p_id, 1, 'created', p_at, NULL, p_data);
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
