"""record_offers(...): a batch of offers of any number of tenants written in one statement, under row-level security

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 15:30:00.000000

Offers are group-committed (backend/routing/offers.py). A batch mixes tenants, and row-level
security needs the tenant set before each tenant's statement, so a batch of offers of 15 tenants
took 32 round trips (BEGIN, a tenant setting and a statement per tenant, COMMIT), which capped
routing on a small machine. This function takes the whole batch as arrays and, tenant by tenant,
sets the tenant and runs the same update and timeline insert as before: one statement, which is
its own transaction. It runs as its caller (SECURITY INVOKER), so every row is read and written
under that tenant's row-level security exactly as before, and it puts back the caller's tenant
setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "record_offers(uuid[], uuid[], uuid[], int[], int[], uuid[], int[], timestamptz)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION record_offers(
            p_tenants uuid[], p_ids uuid[], p_agents uuid[], p_ks int[], p_ns int[], p_holders uuid[],
            p_timeouts int[], p_at timestamptz
        )
        RETURNS SETOF interactions
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            v_tenant uuid;
            previous text := current_setting('app.tenant_id', true);
        BEGIN
            -- One row of input per (interaction, agent offered); the interaction moves to `offered` once
            -- and its timeline gets one `offered` event per agent (several for a ring-all call), numbered
            -- after its last event. An interaction no longer queued or offered (it ended) is left alone.
            FOR v_tenant IN SELECT DISTINCT t FROM unnest(p_tenants) AS u(t) LOOP
                PERFORM set_config('app.tenant_id', v_tenant::text, true);
                RETURN QUERY
                    WITH input AS (
                        SELECT x.id, x.agent, x.k, x.n, x.holder, x.timeout_ms
                        FROM unnest(p_tenants, p_ids, p_agents, p_ks, p_ns, p_holders, p_timeouts)
                            AS x(tenant, id, agent, k, n, holder, timeout_ms)
                        WHERE x.tenant = v_tenant
                    ),
                    moved AS (
                        UPDATE interactions AS i
                        SET state = 'offered', agent_id = x.holder, last_seq = i.last_seq + x.n
                        FROM (SELECT DISTINCT input.id, input.n, input.holder FROM input) AS x
                        WHERE i.tenant_id = v_tenant AND i.id = x.id AND i.state IN ('queued', 'offered')
                        RETURNING i.*
                    ),
                    written AS (
                        INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
                        SELECT v_tenant, x.id, m.last_seq - x.n + x.k, 'offered', p_at, x.agent,
                               jsonb_build_object('timeout_ms', x.timeout_ms)
                        FROM input AS x JOIN moved AS m ON m.id = x.id
                    )
                    SELECT * FROM moved;
            END LOOP;
            PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
