"""connect_interaction(...): a channel's contact connected to the agent who answered, in one statement

Revision ID: 0020
Revises: 0019
Create Date: 2026-11-25 22:50:00.000000

Every call connects its interaction when the agent's leg answers: the locked read, the state, two timeline
events (`offer_accepted`, `connected`) and the agent going busy (`agent_transition`, audited as the system, as
`routing.service.mark_busy` does). Through the ORM that was a transaction of ten round trips. This function does
it in one statement, its own transaction. It runs as its caller (SECURITY INVOKER), under the tenant's row-level
security, and puts back the caller's tenant setting before it returns.

It returns the interaction as it now is, whether the agent went busy (`r_agent_moved`), and `r_outcome`:
`connected`, `already` (connected to this agent before: nothing written) or `ended` (the customer left first:
nothing written); no row when the tenant has no such interaction. `p_forced` (the switch connected an agent the
matcher had not offered it to) is recorded on `offer_accepted`, and a contact connected that way that never
waited gets its queue time now.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "connect_interaction(uuid, uuid, uuid, boolean, timestamptz, text, text)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION connect_interaction(
            p_tenant uuid, p_interaction uuid, p_agent uuid, p_forced boolean, p_at timestamptz, p_ip text,
            p_request_id text
        )
        RETURNS TABLE (r_outcome text, r_agent_moved boolean, r_interaction interactions)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_row interactions;
            v_agent_state text;
            v_agent_reason text;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            r_agent_moved := false;
            SELECT * INTO v_row FROM interactions i WHERE i.tenant_id = p_tenant AND i.id = p_interaction FOR UPDATE;
            IF NOT FOUND THEN
                PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
                RETURN;
            END IF;
            IF v_row.state IN ('ended', 'wrap_up') THEN
                r_outcome := 'ended';
            ELSIF v_row.state = 'connected' AND v_row.agent_id = p_agent THEN
                r_outcome := 'already';
            ELSE
                r_outcome := 'connected';
                UPDATE interactions i
                SET state = 'connected', agent_id = p_agent, connected_at = coalesce(i.connected_at, p_at),
                    queued_at = CASE WHEN p_forced AND i.queue_id IS NOT NULL THEN coalesce(i.queued_at, p_at)
                                     ELSE i.queued_at END,
                    last_seq = i.last_seq + 2
                WHERE i.tenant_id = p_tenant AND i.id = p_interaction
                RETURNING i.* INTO v_row;
                INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                VALUES (p_tenant, p_interaction, v_row.last_seq - 1, 'offer_accepted', p_at, p_agent,
                        jsonb_build_object('forced', p_forced)),
                       (p_tenant, p_interaction, v_row.last_seq, 'connected', p_at, p_agent, '{}'::jsonb);
                SELECT s.state, s.reason INTO v_agent_state, v_agent_reason
                FROM agent_states s WHERE s.tenant_id = p_tenant AND s.user_id = p_agent
                FOR UPDATE;
                IF v_agent_state IN ('available', 'away') THEN
                    PERFORM agent_transition(p_tenant, p_agent, 'busy', NULL, p_at);
                    INSERT INTO audit_log (tenant_id, id, actor_type, actor_id, action, target_type, target_id,
                                           before, after, ip, request_id)
                    VALUES (p_tenant, gen_random_uuid(), 'system', NULL, 'agent_state.change', 'user', p_agent::text,
                            jsonb_build_object('state', v_agent_state, 'reason', v_agent_reason),
                            jsonb_build_object('state', 'busy', 'reason', NULL), p_ip::inet, p_request_id);
                    r_agent_moved := true;
                END IF;
            END IF;
            r_interaction := v_row;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN NEXT;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
