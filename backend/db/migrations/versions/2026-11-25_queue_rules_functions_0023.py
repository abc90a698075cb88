"""queue_rules(...) and queue_interaction(...): a channel's contact put in its queue in two statements

Revision ID: 0023
Revises: 0022
Create Date: 2026-11-25 23:20:00.000000

Every call leaves its IVR for a queue. The routing engine locked the interaction, read the queue, its skill
requirements, its business hours and whether anyone is logged in, and wrote the new state and its `queued` event:
a transaction of eight to ten round trips. Now it reads what it decides on in one statement (`queue_rules`,
which every reader of a queue's routing rules uses, inside a transaction or not), and when the queue takes the
contact, writes that in one more (`queue_interaction`). Both run as their caller (SECURITY INVOKER), under the
tenant's row-level security, and put back the caller's tenant setting before they return.

`queue_rules` returns the queue's row, its requirements (`[[skill id, steps], ...]`), its business hours (time
zone, weekly, holidays, exceptions; NULL without hours) and, only for a queue with a no-agents action, whether any
agent is logged in; no row when the tenant has no such queue. `queue_interaction` queues a contact that is still
`new` (`r_result` `queued`), with the given priority and its attributes merged with `p_attributes`; otherwise
nothing is written (`not_new`). No row when the tenant has no such interaction.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RULES = "queue_rules(uuid, uuid)"
_QUEUE = "queue_interaction(uuid, uuid, uuid, smallint, jsonb, timestamptz)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION queue_rules(p_tenant uuid, p_queue uuid)
        RETURNS TABLE (r_queue queues, r_requirements jsonb, r_hours jsonb, r_anyone_logged_in boolean)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_found boolean;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            SELECT * INTO r_queue FROM queues q WHERE q.tenant_id = p_tenant AND q.id = p_queue;
            v_found := FOUND;
            IF v_found THEN
                SELECT coalesce(jsonb_agg(jsonb_build_array(s.skill_id::text, s.steps) ORDER BY s.skill_id),
                                '[]'::jsonb)
                INTO r_requirements
                FROM queue_skills s WHERE s.tenant_id = p_tenant AND s.queue_id = p_queue;
                IF r_queue.business_hours_id IS NOT NULL THEN
                    SELECT jsonb_build_object('time_zone', b.time_zone, 'weekly', b.weekly, 'holidays', b.holidays,
                                              'exceptions', b.exceptions)
                    INTO r_hours
                    FROM business_hours b WHERE b.tenant_id = p_tenant AND b.id = r_queue.business_hours_id;
                END IF;
                IF coalesce(r_queue.no_agents_action ->> 'type', 'none') <> 'none' THEN
                    r_anyone_logged_in := EXISTS (
                        SELECT 1 FROM agent_states a WHERE a.tenant_id = p_tenant AND a.state <> 'offline'
                    );
                END IF;
            END IF;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            IF v_found THEN
                RETURN NEXT;
            END IF;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION queue_interaction(
            p_tenant uuid, p_interaction uuid, p_queue uuid, p_priority smallint, p_attributes jsonb, p_at timestamptz
        )
        RETURNS TABLE (r_result text, r_interaction interactions)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            SELECT * INTO r_interaction FROM interactions i
            WHERE i.tenant_id = p_tenant AND i.id = p_interaction FOR UPDATE;
            IF NOT FOUND THEN
                PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
                RETURN;
            END IF;
            IF r_interaction.state <> 'new' THEN
                r_result := 'not_new';
            ELSE
                r_result := 'queued';
                UPDATE interactions i
                SET queue_id = p_queue, state = 'queued', queued_at = p_at, priority = p_priority,
                    attributes = i.attributes || coalesce(p_attributes, '{}'::jsonb), last_seq = i.last_seq + 1
                WHERE i.tenant_id = p_tenant AND i.id = p_interaction
                RETURNING i.* INTO r_interaction;
                INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                VALUES (p_tenant, p_interaction, r_interaction.last_seq, 'queued', p_at, NULL,
                        jsonb_build_object('queue_id', p_queue::text));
            END IF;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            RETURN NEXT;
        END
        $$
        """
    )
    for signature in (_RULES, _QUEUE):
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_QUEUE}")
    op.execute(f"DROP FUNCTION {_RULES}")
