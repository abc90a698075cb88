"""agent_transition(...): an agent's state change and its time-in-state period in one statement

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-25 21:05:00.000000

Every call moves its agent twice (busy when bridged, available or wrap-up when it ends). Each move closed the
open period, inserted the new one and updated the state row: three round trips through the ORM's unit of work.
This function does the three in one statement, inside the caller's transaction (whose tenant it relies on:
SECURITY INVOKER, under row-level security). The audit entry stays with `audit.record`.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "agent_transition(uuid, uuid, text, text, timestamptz)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION agent_transition(p_tenant uuid, p_user uuid, p_state text, p_reason text, p_at timestamptz)
        RETURNS void
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        BEGIN
            UPDATE agent_state_periods SET ended_at = p_at
            WHERE tenant_id = p_tenant AND user_id = p_user AND ended_at IS NULL;
            INSERT INTO agent_state_periods (tenant_id, id, user_id, state, reason, started_at)
            VALUES (p_tenant, gen_random_uuid(), p_user, p_state, p_reason, p_at);
            UPDATE agent_states SET state = p_state, reason = p_reason, since = p_at
            WHERE tenant_id = p_tenant AND user_id = p_user;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
