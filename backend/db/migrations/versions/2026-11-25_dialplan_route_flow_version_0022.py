"""dialplan_route(...) also pins the IVR flow version a new call starts on

Revision ID: 0022
Revises: 0021
Create Date: 2026-11-25 23:10:00.000000

Call control read the flow's published version when it answered each call: a transaction of four round trips
(BEGIN, the tenant setting, the read, COMMIT). The dialplan request already reads the number's flow, so it now
reads the flow's published version too (`ivr_flow_version`, None when the flow is archived or never published)
and the dialplan exports it with the flow id. The call starts on the version published when it arrived; a later
publication is for the calls after it, as before. Otherwise the function is the one of migration 0014.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SIGNATURE = "dialplan_route(uuid, text, uuid)"

_UPGRADED = """
        CREATE FUNCTION dialplan_route(p_node uuid, p_did text, p_tenant uuid)
        RETURNS TABLE (
            node_accepting boolean, tenant_id uuid, tenant_status text, sip_domain text,
            number_id uuid, queue_id uuid, ivr_flow_id uuid, queue_name text, ivr_flow_version integer
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
            v_version integer;
        BEGIN
            IF NOT EXISTS (
                SELECT 1 FROM switch_nodes n WHERE n.id = p_node AND n.health = 'up' AND NOT n.draining
            ) THEN
                RETURN QUERY SELECT false, NULL::uuid, NULL::text, NULL::text, NULL::uuid, NULL::uuid, NULL::uuid,
                                    NULL::text, NULL::integer;
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
            IF v_tenant IS NOT NULL AND (v_queue IS NOT NULL OR v_flow IS NOT NULL) THEN
                PERFORM set_config('app.tenant_id', v_tenant::text, true);
                IF v_queue IS NOT NULL THEN
                    SELECT q.name::text INTO v_queue_name
                    FROM queues q WHERE q.tenant_id = v_tenant AND q.id = v_queue;
                END IF;
                IF v_flow IS NOT NULL THEN
                    SELECT f.published_version INTO v_version
                    FROM ivr_flows f WHERE f.tenant_id = v_tenant AND f.id = v_flow AND f.archived_at IS NULL;
                END IF;
                PERFORM set_config('app.tenant_id', coalesce(previous, ''), true);
            END IF;
            RETURN QUERY SELECT true, v_tenant, v_status, v_domain, v_number, v_queue, v_flow, v_queue_name, v_version;
        END
        $$
"""

_ORIGINAL = """
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


def _create(function: str) -> None:
    op.execute(f"DROP FUNCTION {_SIGNATURE}")
    op.execute(function)
    op.execute(f"REVOKE ALL ON FUNCTION {_SIGNATURE} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {_SIGNATURE} TO cc_app")


def upgrade() -> None:
    _create(_UPGRADED)


def downgrade() -> None:
    _create(_ORIGINAL)
