"""interaction_row(...) and end_interaction(...): a channel's report that its contact is over, in two statements

Revision ID: 0021
Revises: 0020
Create Date: 2026-11-25 23:00:00.000000

Every call's end is reported by call control and by both CDR paths. The first report read the state
(`interaction_state`), then ended the interaction in a transaction of seven round trips (BEGIN, the tenant
setting, the locked row, the update, its events, the queue's wrap-up time, COMMIT). Now the routing engine reads
the row (`interaction_row`, replacing `interaction_state`: the reports that come second learn it is over from
it), decides how it ends, and `end_interaction` writes that in one statement, provided the row is still in the
state the decision was made on (`r_result` `changed` otherwise, with the row as it now is, and nothing written).

`end_interaction` sets the state, outcome and end time, appends `abandoned` (with the time waited since queued,
when the outcome is abandoned) and `ended` (`p_data` and the outcome) to the timeline, and, with
`p_wrap_up_lookup`, returns the interaction's queue's wrap-up time. Both run as their caller (SECURITY INVOKER),
under the tenant's row-level security, and put back the caller's tenant setting before they return; no row when
the tenant has no such interaction.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ROW = "interaction_row(uuid, uuid)"
_END = "end_interaction(uuid, uuid, text, text, boolean, timestamptz, jsonb)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION interaction_row(p_tenant uuid, p_interaction uuid)
        RETURNS SETOF interactions
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_row interactions;
            v_found boolean;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            SELECT * INTO v_row FROM interactions i WHERE i.tenant_id = p_tenant AND i.id = p_interaction;
            v_found := FOUND;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            IF v_found THEN
                RETURN NEXT v_row;
            END IF;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION end_interaction(
            p_tenant uuid, p_interaction uuid, p_expect_state text, p_outcome text, p_wrap_up_lookup boolean,
            p_at timestamptz, p_data jsonb
        )
        RETURNS TABLE (r_result text, r_wrap_up_seconds integer, r_interaction interactions)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_row interactions;
            v_abandoned boolean := p_outcome = 'abandoned';
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            SELECT * INTO v_row FROM interactions i WHERE i.tenant_id = p_tenant AND i.id = p_interaction FOR UPDATE;
            IF NOT FOUND THEN
                PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
                RETURN;
            END IF;
            r_wrap_up_seconds := 0;
            IF v_row.state IS DISTINCT FROM p_expect_state THEN
                r_result := 'changed';
            ELSE
                r_result := 'ended';
                UPDATE interactions i
                SET state = 'ended', outcome = p_outcome, ended_at = p_at,
                    last_seq = i.last_seq + CASE WHEN v_abandoned THEN 2 ELSE 1 END
                WHERE i.tenant_id = p_tenant AND i.id = p_interaction
                RETURNING i.* INTO v_row;
                IF v_abandoned THEN
                    INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                    VALUES (p_tenant, p_interaction, v_row.last_seq - 1, 'abandoned', p_at, NULL,
                            jsonb_build_object('waited_seconds', CASE WHEN v_row.queued_at IS NULL THEN 0.0
                                ELSE round(greatest(0, extract(epoch FROM p_at - v_row.queued_at)), 3) END));
                END IF;
                INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                VALUES (p_tenant, p_interaction, v_row.last_seq, 'ended', p_at, v_row.agent_id,
                        coalesce(p_data, '{}'::jsonb) || jsonb_build_object('outcome', p_outcome));
                IF p_wrap_up_lookup AND v_row.queue_id IS NOT NULL THEN
                    SELECT coalesce(q.wrap_up_seconds, 0) INTO r_wrap_up_seconds
                    FROM queues q WHERE q.tenant_id = p_tenant AND q.id = v_row.queue_id;
                    r_wrap_up_seconds := coalesce(r_wrap_up_seconds, 0);
                END IF;
            END IF;
            r_interaction := v_row;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN NEXT;
        END
        $$
        """
    )
    for signature in (_ROW, _END):
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO cc_app")
    op.execute("DROP FUNCTION interaction_state(uuid, uuid)")


def downgrade() -> None:
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
    op.execute("REVOKE ALL ON FUNCTION interaction_state(uuid, uuid) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION interaction_state(uuid, uuid) TO cc_app")
    op.execute(f"DROP FUNCTION {_END}")
    op.execute(f"DROP FUNCTION {_ROW}")
