"""dialplan_route(node, did, tenant): everything the xml_curl dialplan reads, in one statement

Revision ID: 0014
Revises: 0013
Create Date: 2026-11-25 20:10:00.000000

Every new call asks the dialplan where it goes. The answer read, in one transaction through the ORM,
whether the node takes calls (up, not draining), the dialled number, its tenant, then (with the tenant
set) the queue's name: eight round trips counting BEGIN, the tenant setting and COMMIT. This function
reads the same rows in one statement, which is its own transaction. The node's health is read fresh on
every call, as before, so a node marked down or draining stops getting new calls at once.

`switch_nodes`, `phone_numbers` and `tenants` are global tables. The queue is read under the tenant's
row-level security, the tenant being the one the number is assigned to (inbound) or the one the caller
passes (a seat's call, whose tenant comes from our own directory answer), exactly as the ORM read it after
`SET LOCAL app.tenant_id`. It runs as its caller (SECURITY INVOKER) and puts back the caller's tenant
setting before it returns.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "dialplan_route(uuid, text, uuid)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION dialplan_route(p_node uuid, p_did text, p_tenant uuid)
        RETURNS TABLE (
            node_accepting boolean, tenant_id uuid, tenant_status text, sip_domain text,
            number_id uuid, queue_id uuid, ivr_flow_id uuid, queue_name text
        )
        LANGUAGE plpgsql VOLATILE SECURITY INVOKER
        AS $$
        DECLARE
            previous text := current_setting('app.tenant_id', true);
            v_tenant uuid := p_tenant;
            v_status text;
            v_domain text;
            v_number uuid;
            v_queue uuid;
            v_flow uuid;
            v_queue_name text;
        BEGIN
            IF NOT EXISTS (
                SELECT 1 FROM switch_nodes n WHERE n.id = p_node AND n.health = 'up' AND NOT n.draining
            ) THEN
                RETURN QUERY SELECT false, NULL::uuid, NULL::text, NULL::text, NULL::uuid, NULL::uuid, NULL::uuid,
                                    NULL::text;
                RETURN;
            END IF;
            IF p_did IS NOT NULL THEN
                -- An inbound call: the number's tenant, never the caller's say-so.
                v_tenant := NULL;
                SELECT pn.id, pn.tenant_id, pn.queue_id, pn.ivr_flow_id INTO v_number, v_tenant, v_queue, v_flow
                FROM phone_numbers pn WHERE pn.e164 = p_did;
            END IF;
            IF v_tenant IS NOT NULL THEN
                SELECT t.status::text, t.sip_domain::text INTO v_status, v_domain FROM tenants t WHERE t.id = v_tenant;
                IF NOT FOUND THEN
                    v_tenant := NULL;
                END IF;
            END IF;
            IF v_tenant IS NOT NULL AND v_queue IS NOT NULL THEN
                PERFORM set_config('app.tenant_id', v_tenant::text, true);
                SELECT q.name::text INTO v_queue_name FROM queues q WHERE q.tenant_id = v_tenant AND q.id = v_queue;
                PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            END IF;
            RETURN QUERY SELECT true, v_tenant, v_status, v_domain, v_number, v_queue, v_flow, v_queue_name;
        END
        $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
