"""voice switching: switch nodes, the number pool, CDRs per leg, SIP registrations

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 08:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here, not imported, so that this landed migration never changes.
RLS_PREDICATE = "tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid"


def rls_policy_sql(table: str) -> list[str]:
    return [
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} USING ({RLS_PREDICATE}) WITH CHECK ({RLS_PREDICATE})",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO cc_app",
    ]


def upgrade() -> None:
    op.create_table(
        "switch_nodes",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("esl_host", sa.String(length=255), nullable=False),
        sa.Column("esl_port", sa.Integer(), nullable=False),
        sa.Column("esl_password_sealed", sa.Text(), nullable=False),
        sa.Column("xml_curl_sources", postgresql.ARRAY(sa.String(length=64)), nullable=False),
        sa.Column("sip_address", sa.String(length=255), nullable=True),
        sa.Column("health", sa.String(length=8), nullable=False),
        sa.Column("draining", sa.Boolean(), nullable=False),
        sa.Column("last_heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("went_down_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failover_claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failover_done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("core_uuid", sa.String(length=64), nullable=True),
        sa.Column("stats", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("health IN ('unknown', 'up', 'down')", name=op.f("ck_switch_nodes_health")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_switch_nodes")),
        sa.UniqueConstraint("name", name=op.f("uq_switch_nodes_name")),
    )
    op.create_table(
        "phone_numbers",
        sa.Column("e164", sa.String(length=16), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=True),
        sa.Column("queue_id", sa.UUID(), nullable=True),
        sa.Column("ivr_flow_id", sa.UUID(), nullable=True),
        sa.Column("label", sa.String(length=120), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("e164 ~ '^\\+[1-9][0-9]{6,14}$'", name=op.f("ck_phone_numbers_e164")),
        sa.CheckConstraint(
            "tenant_id IS NOT NULL OR (queue_id IS NULL AND ivr_flow_id IS NULL)",
            name=op.f("ck_phone_numbers_free_has_no_target"),
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_phone_numbers_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_phone_numbers")),
        sa.UniqueConstraint("e164", name=op.f("uq_phone_numbers_e164")),
    )
    # A deleted queue leaves its numbers assigned but unrouted (PostgreSQL 15's column list on SET NULL).
    op.execute(
        "ALTER TABLE phone_numbers ADD CONSTRAINT fk_phone_numbers_tenant_id_queue_id_queues "
        "FOREIGN KEY (tenant_id, queue_id) REFERENCES queues (tenant_id, id) ON DELETE SET NULL (queue_id)"
    )
    op.create_index("ix_phone_numbers_tenant", "phone_numbers", ["tenant_id", "e164"])
    op.create_table(
        "unattributed_cdrs",
        sa.Column("leg_uuid", sa.UUID(), nullable=False),
        sa.Column("node_name", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=120), nullable=False),
        sa.Column("sources", postgresql.ARRAY(sa.String(length=16)), nullable=False),
        sa.Column("leg", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unattributed_cdrs")),
        sa.UniqueConstraint("leg_uuid", name=op.f("uq_unattributed_cdrs_leg_uuid")),
    )
    op.create_table(
        "voice_cdrs",
        sa.Column("leg_uuid", sa.UUID(), nullable=False),
        sa.Column("call_uuid", sa.UUID(), nullable=True),
        sa.Column("node_id", sa.UUID(), nullable=True),
        sa.Column("node_name", sa.String(length=64), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("caller_number", sa.String(length=64), nullable=False),
        sa.Column("caller_name", sa.String(length=120), nullable=False),
        sa.Column("destination_number", sa.String(length=64), nullable=False),
        sa.Column("did", sa.String(length=16), nullable=True),
        sa.Column("queue_id", sa.UUID(), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ringing_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("bridged_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("billable_ms", sa.BigInteger(), nullable=False),
        sa.Column("hangup_cause", sa.String(length=48), nullable=True),
        sa.Column("hangup_cause_q850", sa.SmallInteger(), nullable=True),
        sa.Column("disposition", sa.String(length=16), nullable=False),
        sa.Column("sources", postgresql.ARRAY(sa.String(length=16)), nullable=False),
        sa.Column("details", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "disposition IN ('answered', 'no_answer', 'busy', 'cancelled', 'refused', 'failed', 'node_failure')",
            name=op.f("ck_voice_cdrs_disposition"),
        ),
        sa.CheckConstraint("direction IN ('inbound','outbound')", name=op.f("ck_voice_cdrs_direction")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_voice_cdrs_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_cdrs")),
        sa.UniqueConstraint("tenant_id", "leg_uuid", name=op.f("uq_voice_cdrs_tenant_id_leg_uuid")),
    )
    op.create_index("ix_voice_cdrs_ended", "voice_cdrs", ["tenant_id", "ended_at", "id"])
    op.create_index("ix_voice_cdrs_interaction", "voice_cdrs", ["tenant_id", "interaction_id"])
    op.create_table(
        "voice_registrations",
        sa.Column("user_id", sa.UUID(), nullable=False),
        sa.Column("node_id", sa.UUID(), nullable=False),
        sa.Column("sip_username", sa.String(length=64), nullable=False),
        sa.Column("contact", sa.String(length=512), nullable=False),
        sa.Column("call_id", sa.String(length=255), nullable=False),
        sa.Column("transport", sa.String(length=8), nullable=False),
        sa.Column("network_ip", sa.String(length=64), nullable=False),
        sa.Column("network_port", sa.Integer(), nullable=True),
        sa.Column("user_agent", sa.String(length=255), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "transport IN ('udp', 'tcp', 'tls', 'ws', 'wss')", name=op.f("ck_voice_registrations_transport")
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["switch_nodes.id"],
            name=op.f("fk_voice_registrations_node_id_switch_nodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "user_id"],
            ["users.tenant_id", "users.id"],
            name=op.f("fk_voice_registrations_tenant_id_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_voice_registrations_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_registrations")),
        sa.UniqueConstraint(
            "tenant_id",
            "node_id",
            "sip_username",
            "contact",
            name=op.f("uq_voice_registrations_tenant_id_node_id_sip_username_contact"),
        ),
    )
    op.create_index("ix_voice_registrations_user", "voice_registrations", ["tenant_id", "user_id"])

    op.execute("GRANT SELECT, INSERT, UPDATE ON switch_nodes, phone_numbers, unattributed_cdrs TO cc_app")
    for table in ("voice_cdrs", "voice_registrations"):
        for statement in rls_policy_sql(table):
            op.execute(statement)

    # A failed node's agents live in every tenant: one audited SECURITY DEFINER function (owned by the
    # NOLOGIN cc_lookup role, like xt_api_key_tenant) names the tenants that have registrations on a
    # node, or past a moment of expiry, and nothing else; the work itself runs in each tenant's context.
    op.execute("GRANT CREATE ON SCHEMA public TO cc_lookup")
    op.execute("GRANT SELECT (tenant_id, node_id, expires_at) ON voice_registrations TO cc_lookup")
    op.execute("CREATE POLICY xt_lookup ON voice_registrations FOR SELECT TO cc_lookup USING (true)")
    op.execute(
        """
        CREATE FUNCTION xt_voice_registration_tenants(p_node uuid, p_expired_before timestamptz)
        RETURNS SETOF uuid
        LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
          SELECT DISTINCT tenant_id FROM public.voice_registrations
          WHERE (p_node IS NULL OR node_id = p_node)
            AND (p_expired_before IS NULL OR expires_at < p_expired_before)
        $$
        """
    )
    op.execute("ALTER FUNCTION xt_voice_registration_tenants(uuid, timestamptz) OWNER TO cc_lookup")
    op.execute("REVOKE ALL ON FUNCTION xt_voice_registration_tenants(uuid, timestamptz) FROM PUBLIC")
    op.execute("GRANT EXECUTE ON FUNCTION xt_voice_registration_tenants(uuid, timestamptz) TO cc_app")
    op.execute("REVOKE CREATE ON SCHEMA public FROM cc_lookup")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS xt_voice_registration_tenants(uuid, timestamptz)")
    op.drop_index("ix_voice_registrations_user", table_name="voice_registrations")
    op.drop_table("voice_registrations")
    op.drop_index("ix_voice_cdrs_interaction", table_name="voice_cdrs")
    op.drop_index("ix_voice_cdrs_ended", table_name="voice_cdrs")
    op.drop_table("voice_cdrs")
    op.drop_table("unattributed_cdrs")
    op.drop_index("ix_phone_numbers_tenant", table_name="phone_numbers")
    op.drop_table("phone_numbers")
    op.drop_table("switch_nodes")
