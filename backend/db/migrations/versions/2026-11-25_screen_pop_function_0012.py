"""screen pop in one statement: customer_screen_pop(), an invoker's function under row-level security

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-25 14:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The screen pop is the hottest read of the store. Through the ORM it took six round trips (BEGIN, the
# tenant, the caller's teams, the records, their interactions, COMMIT); this function does the same reads in
# one statement that runs in its own implicit transaction. It is SECURITY INVOKER (the default, written out
# so nobody changes it in passing): it runs as cc_app, so every read below is filtered by the tables' forced
# row-level security exactly as the ORM's were, on the tenant it sets first. It gives the caller nothing
# cc_app could not already do with set_config and the same SELECTs.
SCREEN_POP = """
CREATE FUNCTION customer_screen_pop(
    p_tenant uuid, p_kind text, p_values text[], p_max integer, p_interactions integer, p_team_user uuid
) RETURNS json
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
-- Generic plans only: with the kind known (a custom plan), the planner may answer the equality lookup from the
-- partial trigram GiST (kind IN ('phone', 'email')), which it costs below the (tenant, kind, value) B-tree but
-- which read thousands of pages per lookup on the 1,000,000-customer store (60-800 ms instead of 0.1 ms). A
-- generic plan cannot prove the partial index's predicate, so it uses the B-tree.
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_ids uuid[];
    v_refs text[];
    v_customers json;
    v_interactions json;
    v_teams json;
BEGIN
    IF p_tenant IS NULL THEN
        RAISE EXCEPTION 'customer_screen_pop needs a tenant' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- Local to the transaction: with no BEGIN around the call, that is this one statement.
    PERFORM set_config('app.tenant_id', p_tenant::text, true);

    SELECT array_agg(m.id ORDER BY m.n) INTO v_ids
    FROM (
        SELECT c.id, row_number() OVER (ORDER BY c.updated_at DESC) AS n
        FROM customers c
        WHERE c.id IN (SELECT i.customer_id FROM customer_identities i WHERE i.kind = p_kind AND i.value = ANY(p_values))
          AND c.merged_into_id IS NULL AND c.erased_at IS NULL
        ORDER BY c.updated_at DESC
        LIMIT p_max
    ) m;

    IF v_ids IS NOT NULL THEN
        SELECT json_agg(json_build_array(
                   c.id, c.name, c.team_id, c.tags, c.custom, c.version, c.created_at, c.updated_at,
                   (SELECT coalesce(json_agg(json_build_array(i.kind, i.value, i.raw, i.valid)
                                             ORDER BY i.kind, i.position), '[]')
                    FROM customer_identities i WHERE i.customer_id = c.id),
                   (SELECT coalesce(json_agg(json_build_array(t.id, t.number, t.subject, t.status, t.priority,
                                                              t.due_at, t.assignee_user_id, t.assignee_team_id)
                                             ORDER BY t.due_at), '[]')
                    FROM tickets t WHERE t.customer_id = c.id AND t.status NOT IN ('resolved', 'closed'))
               ) ORDER BY o.n)
        INTO v_customers
        FROM unnest(v_ids) WITH ORDINALITY AS o(id, n) JOIN customers c ON c.id = o.id;

        -- How interactions point at these customers: their ids, or any of their addresses.
        v_refs := ARRAY(
            SELECT o.id::text FROM unnest(v_ids) AS o(id)
            UNION
            SELECT i.value FROM customer_identities i WHERE i.customer_id = ANY(v_ids)
        );
        SELECT coalesce(json_agg(json_build_array(
                   r.id, r.channel, r.state, r.outcome, r.customer_ref, r.agent_id, r.queue_id, r.created_at,
                   r.ended_at
               ) ORDER BY r.created_at DESC, r.id DESC), '[]')
        INTO v_interactions
        FROM (
            SELECT x.id, x.channel, x.state, x.outcome, x.customer_ref, x.agent_id, x.queue_id, x.created_at,
                   x.ended_at
            FROM interactions x
            WHERE x.customer_ref = ANY(v_refs)
            ORDER BY x.created_at DESC, x.id DESC
            LIMIT p_interactions
        ) r;
    END IF;

    IF p_team_user IS NOT NULL THEN
        SELECT coalesce(json_agg(m.team_id), '[]') INTO v_teams FROM team_members m WHERE m.user_id = p_team_user;
    END IF;

    RETURN json_build_array(coalesce(v_customers, '[]'), coalesce(v_interactions, '[]'), v_teams);
END
$$
"""
SIGNATURE = "customer_screen_pop(uuid, text, text[], integer, integer, uuid)"


def upgrade() -> None:
    op.execute(SCREEN_POP)
    op.execute(f"REVOKE ALL ON FUNCTION {SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
