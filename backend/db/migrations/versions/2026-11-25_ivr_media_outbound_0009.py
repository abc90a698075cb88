"""IVR flows and their versions, prompts, queues' voice settings, recordings, voicemail, outbound safety, supervision

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 10:00:00.000000
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here, not imported, so that this landed migration never changes.
RLS_PREDICATE = "tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid"

# Permissions this revision adds to the built-in roles of tenants that exist already (new tenants get
# them from the catalogue). `calls:supervise` is split into one permission per supervision mode.
SUPERVISION = ["calls:listen", "calls:whisper", "calls:barge"]
NEW_PERMISSIONS = {
    "owner": [*SUPERVISION, "calls:outbound", "recordings:read", "voicemail:read"],
    "admin": [*SUPERVISION, "calls:outbound", "recordings:read", "voicemail:read"],
    "supervisor": [*SUPERVISION, "calls:outbound", "recordings:read", "voicemail:read"],
    "agent": ["calls:outbound"],
}


def rls_policy_sql(table: str, grants: str = "SELECT, INSERT, UPDATE, DELETE") -> list[str]:
    return [
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} USING ({RLS_PREDICATE}) WITH CHECK ({RLS_PREDICATE})",
        f"GRANT {grants} ON {table} TO cc_app",
    ]


def _timestamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    ]


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"), ondelete="CASCADE"
    )


def upgrade() -> None:
    # --- IVR flows ----------------------------------------------------------------------------
    op.create_table(
        "ivr_flows",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("draft", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("draft_revision", sa.Integer(), nullable=False),
        sa.Column("published_version", sa.Integer(), nullable=True),
        sa.Column("referenced_queues", postgresql.ARRAY(sa.UUID()), nullable=False),
        sa.Column("referenced_hours", postgresql.ARRAY(sa.UUID()), nullable=False),
        sa.Column("referenced_prompts", postgresql.ARRAY(sa.UUID()), nullable=False),
        sa.Column("referenced_agents", postgresql.ARRAY(sa.UUID()), nullable=False),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        *_timestamps(),
        _tenant_fk("ivr_flows"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_ivr_flows")),
    )
    op.create_index(
        "uq_ivr_flows_live_name",
        "ivr_flows",
        ["tenant_id", "name"],
        unique=True,
        postgresql_where=sa.text("archived_at IS NULL"),
    )
    op.create_table(
        "ivr_flow_versions",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("flow_id", sa.UUID(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("graph", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("published_by", sa.UUID(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _tenant_fk("ivr_flow_versions"),
        sa.ForeignKeyConstraint(
            ["tenant_id", "flow_id"],
            ["ivr_flows.tenant_id", "ivr_flows.id"],
            name=op.f("fk_ivr_flow_versions_tenant_id_flow_id_ivr_flows"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_ivr_flow_versions")),
        sa.UniqueConstraint(
            "tenant_id", "flow_id", "version", name=op.f("uq_ivr_flow_versions_tenant_id_flow_id_version")
        ),
    )
    # A number may point at a flow of its own tenant only.
    op.create_foreign_key(
        op.f("fk_phone_numbers_tenant_id_ivr_flow_id_ivr_flows"),
        "phone_numbers",
        "ivr_flows",
        ["tenant_id", "ivr_flow_id"],
        ["tenant_id", "id"],
    )

    # --- prompts and queues' voice settings ---------------------------------------------------
    op.create_table(
        "voice_prompts",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("format", sa.String(length=4), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("duration_ms", sa.BigInteger(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("channels", sa.SmallInteger(), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        *_timestamps(),
        sa.CheckConstraint("kind IN ('prompt', 'music')", name=op.f("ck_voice_prompts_kind")),
        sa.CheckConstraint("format IN ('wav', 'mp3')", name=op.f("ck_voice_prompts_format")),
        _tenant_fk("voice_prompts"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_prompts")),
        sa.UniqueConstraint("tenant_id", "name", name=op.f("uq_voice_prompts_tenant_id_name")),
    )
    op.create_table(
        "voice_queue_settings",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("queue_id", sa.UUID(), nullable=False),
        sa.Column("music_on_hold_id", sa.UUID(), nullable=True),
        sa.Column("announcement_id", sa.UUID(), nullable=True),
        sa.Column("recording_policy", sa.String(length=12), nullable=False),
        sa.Column("voicemail_enabled", sa.Boolean(), nullable=False),
        sa.Column("voicemail_greeting_id", sa.UUID(), nullable=True),
        sa.Column("voicemail_max_seconds", sa.Integer(), nullable=False),
        sa.Column("voicemail_creates_ticket", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "recording_policy IN ('always', 'never', 'on_demand')",
            name=op.f("ck_voice_queue_settings_recording_policy"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "queue_id"],
            ["queues.tenant_id", "queues.id"],
            name=op.f("fk_voice_queue_settings_tenant_id_queue_id_queues"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "music_on_hold_id"],
            ["voice_prompts.tenant_id", "voice_prompts.id"],
            name=op.f("fk_voice_queue_settings_tenant_id_music_on_hold_id_voice_prompts"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "announcement_id"],
            ["voice_prompts.tenant_id", "voice_prompts.id"],
            name=op.f("fk_voice_queue_settings_tenant_id_announcement_id_voice_prompts"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "voicemail_greeting_id"],
            ["voice_prompts.tenant_id", "voice_prompts.id"],
            name=op.f("fk_voice_queue_settings_tenant_id_voicemail_greeting_id_voice_prompts"),
        ),
        sa.PrimaryKeyConstraint("tenant_id", "queue_id", name=op.f("pk_voice_queue_settings")),
    )

    # --- recordings and voicemail -------------------------------------------------------------
    op.create_table(
        "voice_recordings",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        sa.Column("call_uuid", sa.UUID(), nullable=True),
        sa.Column("leg_uuid", sa.UUID(), nullable=True),
        sa.Column("queue_id", sa.UUID(), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("policy", sa.String(length=12), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("format", sa.String(length=4), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("paused_intervals", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('recording', 'stored', 'failed')", name=op.f("ck_voice_recordings_status")),
        sa.CheckConstraint("policy IN ('always','on_demand')", name=op.f("ck_voice_recordings_policy")),
        sa.CheckConstraint("format IN ('wav', 'mp3')", name=op.f("ck_voice_recordings_format")),
        _tenant_fk("voice_recordings"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_recordings")),
    )
    op.create_index("ix_voice_recordings_interaction", "voice_recordings", ["tenant_id", "interaction_id"])
    op.create_index("ix_voice_recordings_started", "voice_recordings", ["tenant_id", "started_at", "id"])
    op.create_table(
        "voice_voicemails",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("box", sa.String(length=8), nullable=False),
        sa.Column("queue_id", sa.UUID(), nullable=True),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        sa.Column("call_uuid", sa.UUID(), nullable=True),
        sa.Column("caller_number", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("format", sa.String(length=4), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("ticket_id", sa.String(length=80), nullable=True),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("announced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('recording', 'stored', 'failed')", name=op.f("ck_voice_voicemails_status")),
        sa.CheckConstraint(
            "(box = 'queue' AND queue_id IS NOT NULL) OR (box = 'agent' AND agent_id IS NOT NULL)",
            name=op.f("ck_voice_voicemails_box"),
        ),
        sa.CheckConstraint("format IN ('wav', 'mp3')", name=op.f("ck_voice_voicemails_format")),
        _tenant_fk("voice_voicemails"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_voicemails")),
    )
    op.create_index("ix_voice_voicemails_created", "voice_voicemails", ["tenant_id", "created_at", "id"])

    # --- outbound safety ----------------------------------------------------------------------
    op.create_table(
        "carrier_gateways",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        *_timestamps(),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_carrier_gateways")),
        sa.UniqueConstraint("name", name=op.f("uq_carrier_gateways_name")),
    )
    op.create_table(
        "outbound_routes",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("gateway_id", sa.UUID(), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("prefix ~ '^\\+[0-9]{0,15}$'", name=op.f("ck_outbound_routes_prefix")),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["carrier_gateways.id"],
            name=op.f("fk_outbound_routes_gateway_id_carrier_gateways"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbound_routes")),
        sa.UniqueConstraint("prefix", "gateway_id", name=op.f("uq_outbound_routes_prefix_gateway_id")),
    )
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON carrier_gateways, outbound_routes TO cc_app")
    op.create_table(
        "voice_outbound_policies",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("home_regions", postgresql.ARRAY(sa.String(length=2)), nullable=False),
        sa.Column("allow_international", sa.Boolean(), nullable=False),
        sa.Column("allowed_regions", postgresql.ARRAY(sa.String(length=2)), nullable=False),
        sa.Column("allow_premium", sa.Boolean(), nullable=False),
        sa.Column("max_concurrent_calls", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        _tenant_fk("voice_outbound_policies"),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_voice_outbound_policies")),
    )
    op.add_column("plans", sa.Column("outbound_call_cap", sa.Integer(), nullable=True))

    # --- supervision --------------------------------------------------------------------------
    op.create_table(
        "voice_supervision_sessions",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("supervisor_id", sa.UUID(), nullable=False),
        sa.Column("agent_id", sa.UUID(), nullable=True),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        sa.Column("call_uuid", sa.UUID(), nullable=True),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("modes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("mode IN ('listen', 'whisper', 'barge')", name=op.f("ck_voice_supervision_sessions_mode")),
        _tenant_fk("voice_supervision_sessions"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_voice_supervision_sessions")),
    )
    op.create_index("ix_voice_supervision_started", "voice_supervision_sessions", ["tenant_id", "started_at", "id"])

    for table in (
        "ivr_flows",
        "voice_prompts",
        "voice_queue_settings",
        "voice_recordings",
        "voice_voicemails",
        "voice_outbound_policies",
        "voice_supervision_sessions",
    ):
        for statement in rls_policy_sql(table):
            op.execute(statement)
    # Published versions are immutable: the application may add and read them, never change or delete one.
    for statement in rls_policy_sql("ivr_flow_versions", grants="SELECT, INSERT"):
        op.execute(statement)

    # --- the new permissions on existing tenants' built-in roles ------------------------------
    # Roles are tenant-owned under forced RLS, which binds this (owner) role too: each tenant's roles
    # are changed in that tenant's context, as the application itself would.
    connection = op.get_bind()
    tenant_ids = connection.execute(sa.text("SELECT id FROM tenants")).scalars().all()
    for tenant_id in tenant_ids:
        connection.execute(sa.text("SELECT set_config('app.tenant_id', :t, true)"), {"t": str(tenant_id)})
        for role, added in NEW_PERMISSIONS.items():
            connection.execute(
                sa.text(
                    "UPDATE roles SET permissions = ARRAY(SELECT DISTINCT unnest(permissions || CAST(:added AS varchar[]))"
                    " ORDER BY 1) WHERE builtin AND name = :role"
                ),
                {"added": added, "role": role},
            )
        # Custom roles that could supervise keep every supervision mode.
        connection.execute(
            sa.text(
                "UPDATE roles SET permissions = ARRAY(SELECT DISTINCT p FROM unnest(permissions || CAST(:modes AS"
                " varchar[])) AS p WHERE p <> 'calls:supervise' ORDER BY 1) WHERE 'calls:supervise' = ANY(permissions)"
            ),
            {"modes": SUPERVISION},
        )
    connection.execute(sa.text("SELECT set_config('app.tenant_id', '', true)"))


def downgrade() -> None:
    op.drop_index("ix_voice_supervision_started", table_name="voice_supervision_sessions")
    op.drop_table("voice_supervision_sessions")
    op.drop_column("plans", "outbound_call_cap")
    op.drop_table("voice_outbound_policies")
    op.drop_table("outbound_routes")
    op.drop_table("carrier_gateways")
    op.drop_index("ix_voice_voicemails_created", table_name="voice_voicemails")
    op.drop_table("voice_voicemails")
    op.drop_index("ix_voice_recordings_started", table_name="voice_recordings")
    op.drop_index("ix_voice_recordings_interaction", table_name="voice_recordings")
    op.drop_table("voice_recordings")
    op.drop_table("voice_queue_settings")
    op.drop_table("voice_prompts")
    op.drop_constraint(op.f("fk_phone_numbers_tenant_id_ivr_flow_id_ivr_flows"), "phone_numbers", type_="foreignkey")
    op.drop_table("ivr_flow_versions")
    op.drop_index("uq_ivr_flows_live_name", table_name="ivr_flows")
    op.drop_table("ivr_flows")
