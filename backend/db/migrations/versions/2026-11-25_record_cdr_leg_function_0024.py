"""record_cdr_leg(...): a report of a call leg stored, or folded into the leg's row, in one statement

Revision ID: 0024
Revises: 0023
Create Date: 2026-11-25 23:30:00.000000

Every leg is reported twice (the worker from CHANNEL_HANGUP_COMPLETE, the API from mod_json_cdr), so every call
brings four reports. Each was a group-commit batch of its own at the rates we see (BEGIN, the tenant setting, the
INSERT, COMMIT), and the second report of a leg then read the row locked through the ORM and wrote it back: about
twenty round trips a call. This function stores a report in one statement: the INSERT, or when the leg is stored
already, the merge that `cdrs.merge` did in Python (and this replaces):

* a source already on the row is a duplicate, unless it is `node_failure` on a row FreeSWITCH never reported;
* `node_failure` on a row FreeSWITCH reported is a duplicate;
* FreeSWITCH's first report on a row we closed for a lost node replaces its columns (ringing, answer, bridge
  times and the cause even when now empty), details merged with the report's winning;
* otherwise a report only fills what the row lacks (empty texts, NULL columns), the row's details winning;
* the node is filled if the row has none; the sources are the sorted union.

`p_leg` is the row as JSON (`jsonb_populate_record` over `voice_cdrs`: tenant, id, leg, node, sources and the
columns). It runs as its caller (SECURITY INVOKER), under the tenant's row-level security, and puts back the
caller's tenant setting before it returns: on its own it is its own transaction, inside a batch's it shares it.
Returns `created`, `merged` or `duplicate` and the row's id.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "record_cdr_leg(uuid, text, jsonb)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION record_cdr_leg(p_tenant uuid, p_source text, p_leg jsonb)
        RETURNS TABLE (r_outcome text, r_id uuid)
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_new voice_cdrs := jsonb_populate_record(NULL::voice_cdrs, p_leg);
            v_row voice_cdrs;
            v_real boolean;
        BEGIN
            PERFORM set_config('app.tenant_id', p_tenant::text, true);
            v_new.tenant_id := p_tenant;
            v_new.sources := ARRAY[p_source];
            v_new.created_at := coalesce(v_new.created_at, now());
            v_new.updated_at := coalesce(v_new.updated_at, now());
            INSERT INTO voice_cdrs SELECT v_new.*
            ON CONFLICT (tenant_id, leg_uuid) DO NOTHING
            RETURNING id INTO r_id;
            IF FOUND THEN
                r_outcome := 'created';
            ELSE
                SELECT * INTO v_row FROM voice_cdrs c
                WHERE c.tenant_id = p_tenant AND c.leg_uuid = v_new.leg_uuid FOR UPDATE;
                r_id := v_row.id;
                v_real := v_row.sources && ARRAY['event', 'json_cdr', 'err_log']::varchar[];
                IF (p_source = ANY (v_row.sources) AND (p_source <> 'node_failure' OR NOT v_real))
                   OR (p_source = 'node_failure' AND v_real) THEN
                    r_outcome := 'duplicate';
                    IF v_row.node_id IS NULL AND v_new.node_id IS NOT NULL THEN
                        UPDATE voice_cdrs c SET node_id = v_new.node_id
                        WHERE c.tenant_id = p_tenant AND c.id = v_row.id;
                    END IF;
                ELSE
                    r_outcome := 'merged';
                    IF p_source <> 'node_failure' AND NOT v_real THEN
                        UPDATE voice_cdrs c SET
                            call_uuid = coalesce(v_new.call_uuid, c.call_uuid),
                            node_name = coalesce(v_new.node_name, c.node_name),
                            direction = coalesce(v_new.direction, c.direction),
                            caller_number = coalesce(v_new.caller_number, c.caller_number),
                            caller_name = coalesce(v_new.caller_name, c.caller_name),
                            destination_number = coalesce(v_new.destination_number, c.destination_number),
                            did = coalesce(v_new.did, c.did),
                            queue_id = coalesce(v_new.queue_id, c.queue_id),
                            agent_id = coalesce(v_new.agent_id, c.agent_id),
                            interaction_id = coalesce(v_new.interaction_id, c.interaction_id),
                            started_at = coalesce(v_new.started_at, c.started_at),
                            ringing_at = v_new.ringing_at,
                            answered_at = v_new.answered_at,
                            bridged_at = v_new.bridged_at,
                            ended_at = coalesce(v_new.ended_at, c.ended_at),
                            duration_ms = coalesce(v_new.duration_ms, c.duration_ms),
                            billable_ms = coalesce(v_new.billable_ms, c.billable_ms),
                            hangup_cause = v_new.hangup_cause,
                            hangup_cause_q850 = coalesce(v_new.hangup_cause_q850, c.hangup_cause_q850),
                            disposition = coalesce(v_new.disposition, c.disposition),
                            details = c.details || coalesce(v_new.details, '{}'::jsonb),
                            node_id = coalesce(c.node_id, v_new.node_id),
                            sources = ARRAY(
                                SELECT DISTINCT s FROM unnest(c.sources || p_source::varchar) AS s ORDER BY s
                            ),
                            updated_at = now()
                        WHERE c.tenant_id = p_tenant AND c.id = v_row.id;
                    ELSE
                        UPDATE voice_cdrs c SET
                            call_uuid = coalesce(c.call_uuid, v_new.call_uuid),
                            did = coalesce(c.did, v_new.did),
                            queue_id = coalesce(c.queue_id, v_new.queue_id),
                            agent_id = coalesce(c.agent_id, v_new.agent_id),
                            interaction_id = coalesce(c.interaction_id, v_new.interaction_id),
                            ringing_at = coalesce(c.ringing_at, v_new.ringing_at),
                            answered_at = coalesce(c.answered_at, v_new.answered_at),
                            bridged_at = coalesce(c.bridged_at, v_new.bridged_at),
                            hangup_cause = coalesce(c.hangup_cause, v_new.hangup_cause),
                            hangup_cause_q850 = coalesce(c.hangup_cause_q850, v_new.hangup_cause_q850),
                            node_name = CASE WHEN coalesce(c.node_name, '') = ''
                                             THEN coalesce(v_new.node_name, c.node_name) ELSE c.node_name END,
                            caller_number = CASE WHEN coalesce(c.caller_number, '') = ''
                                                 THEN coalesce(v_new.caller_number, c.caller_number)
                                                 ELSE c.caller_number END,
                            caller_name = CASE WHEN coalesce(c.caller_name, '') = ''
                                               THEN coalesce(v_new.caller_name, c.caller_name) ELSE c.caller_name END,
                            destination_number = CASE WHEN coalesce(c.destination_number, '') = ''
                                                      THEN coalesce(v_new.destination_number, c.destination_number)
                                                      ELSE c.destination_number END,
                            details = coalesce(v_new.details, '{}'::jsonb) || c.details,
                            node_id = coalesce(c.node_id, v_new.node_id),
                            sources = ARRAY(
                                SELECT DISTINCT s FROM unnest(c.sources || p_source::varchar) AS s ORDER BY s
                            ),
                            updated_at = now()
                        WHERE c.tenant_id = p_tenant AND c.id = v_row.id;
                    END IF;
                END IF;
            END IF;
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
