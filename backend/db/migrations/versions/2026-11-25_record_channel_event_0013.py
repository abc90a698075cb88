"""record_channel_event(...): a channel's own timeline event (an IVR step, hold, resume) in one statement

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-25 17:40:00.000000

Call control notes every IVR node a caller passes (`RoutingEngine.note`). Each note was a transaction
of six round trips (BEGIN, the tenant setting, the interaction locked, its sequence bumped, the event
inserted, COMMIT) through the ORM: at 30 new calls/s, about a tenth of a call-control process's CPU.
This function does the same in one statement, which is its own transaction: the interaction's row is
locked by the UPDATE that takes the next sequence number, exactly as the lock did, and an interaction
that has ended (or is not the tenant's) records nothing. It runs as its caller (SECURITY INVOKER),
under the tenant's row-level security, and puts back the caller's tenant setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "record_channel_event(uuid, uuid, text, uuid, timestamptz, jsonb)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION record_channel_event(
            p_tenant uuid, p_interaction uuid, p_name text, p_agent uuid, p_at timestamptz, p_data jsonb
        )
        RETURNS boolean
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_seq int;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            UPDATE interactions SET last_seq = last_seq + 1
            WHERE tenant_id = p_tenant AND id = p_interaction AND state NOT IN ('ended', 'wrap_up')
            RETURNING last_seq INTO v_seq;
            IF v_seq IS NOT NULL THEN
                INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                VALUES (p_tenant, p_interaction, v_seq, p_name, p_at, p_agent, coalesce(p_data, '{}'::jsonb));
            END IF;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN v_seq IS NOT NULL;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
