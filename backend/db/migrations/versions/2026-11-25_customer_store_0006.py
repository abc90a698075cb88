"""customer store: customers, contact points, custom fields, notes, tickets, imports; new permissions

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 09:00:00
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out here, not imported, so that this migration never changes once landed.
RLS_PREDICATE = "tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid"

TENANT_TABLES = (
    "customer_settings",
    "customers",
    "customer_identities",
    "customer_field_defs",
    "customer_notes",
    "tickets",
    "ticket_events",
    "ticket_slas",
    "customer_imports",
    "customer_import_chunks",
    "customer_import_rows",
    "customer_import_errors",
)

# Permissions this revision adds to the built-in roles of tenants that exist already (new tenants get
# them from backend.tenants.permissions). Owners and admins hold every permission.
NEW_PERMISSIONS = {
    "owner": ["customers:all_units", "customers:configure", "tickets:read", "tickets:write", "tickets:configure"],
    "admin": ["customers:all_units", "customers:configure", "tickets:read", "tickets:write", "tickets:configure"],
    "supervisor": ["customers:all_units", "tickets:read", "tickets:write"],
    "agent": ["tickets:read", "tickets:write"],
}


def grant_new_permissions_sql() -> str:
    """One statement that adds NEW_PERMISSIONS to every tenant's built-in roles.

    Roles are under forced row-level security, which binds the owner role too, so the
    statement scopes itself to each tenant in turn, then clears the setting.
    """
    updates = "\n".join(
        f"    UPDATE roles SET permissions = ARRAY(SELECT DISTINCT p FROM unnest(permissions || "
        f"ARRAY[{', '.join(repr(p) for p in perms)}]::varchar[]) AS p ORDER BY p)"
        f" WHERE builtin AND name = '{name}';"
        for name, perms in NEW_PERMISSIONS.items()
    )
    return f"""
DO $$
DECLARE t record;
BEGIN
  FOR t IN SELECT id FROM tenants LOOP
    PERFORM set_config('app.tenant_id', t.id::text, true);
{updates}
  END LOOP;
  PERFORM set_config('app.tenant_id', '', true);
END $$
"""


def rls_policy_sql(table: str) -> list[str]:
    return [
        f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY tenant_isolation ON {table} USING ({RLS_PREDICATE}) WITH CHECK ({RLS_PREDICATE})",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO cc_app",
    ]


def _base() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    ]


def _tenant_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["tenant_id"], ["tenants.id"], name=op.f(f"fk_{table}_tenant_id_tenants"), ondelete="CASCADE"
    )


def upgrade() -> None:
    # Trusted extension: the database owner may create it (the scripts already do as superuser).
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_table(
        "customer_settings",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("default_region", sa.String(2), nullable=True),
        _tenant_fk("customer_settings"),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_customer_settings")),
    )
    op.create_table(
        "customers",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("team_id", sa.UUID(), nullable=True),
        sa.Column("tags", postgresql.ARRAY(sa.String(60)), nullable=False, server_default="{}"),
        sa.Column("custom", postgresql.JSONB(), nullable=False, server_default="{}"),
        sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("merged_into_id", sa.UUID(), nullable=True),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True),
        *_base(),
        _tenant_fk("customers"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_customers")),
    )
    # A deleted business unit leaves its customers shared by the tenant, not orphaned or deleted.
    op.execute(
        "ALTER TABLE customers ADD CONSTRAINT fk_customers_tenant_id_team_id_teams FOREIGN KEY (tenant_id, team_id) "
        "REFERENCES teams (tenant_id, id) ON DELETE SET NULL (team_id)"
    )
    op.create_index("ix_customers_created", "customers", ["tenant_id", "created_at", "id"])
    op.create_index("ix_customers_name", "customers", ["tenant_id", "name", "id"])
    op.create_index("ix_customers_updated", "customers", ["tenant_id", "updated_at", "id"])
    op.create_index("ix_customers_team", "customers", ["tenant_id", "team_id"])
    op.execute("CREATE INDEX ix_customers_name_trgm ON customers USING gin (name gin_trgm_ops)")
    op.execute("CREATE INDEX ix_customers_name_fts ON customers USING gin (to_tsvector('simple', name))")
    op.execute("CREATE INDEX ix_customers_tags ON customers USING gin (tags)")

    op.create_table(
        "customer_identities",
        sa.Column("customer_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("value", sa.String(320), nullable=False),
        sa.Column("raw", sa.String(320), nullable=False),
        sa.Column("valid", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("label", sa.String(40), nullable=True),
        sa.Column("position", sa.SmallInteger(), nullable=False, server_default="0"),
        *_base(),
        sa.CheckConstraint(
            "kind IN ('phone', 'email', 'wechat', 'external')", name=op.f("ck_customer_identities_kind")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "customer_id"],
            ["customers.tenant_id", "customers.id"],
            name=op.f("fk_customer_identities_tenant_id_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_customer_identities")),
        sa.UniqueConstraint(
            "tenant_id",
            "customer_id",
            "kind",
            "value",
            name=op.f("uq_customer_identities_tenant_id_customer_id_kind_value"),
        ),
    )
    # Screen pop and import de-duplication: exact address -> customers.
    op.create_index("ix_customer_identities_lookup", "customer_identities", ["tenant_id", "kind", "value"])
    # An external id names one record of the tenant's other system: at most one customer holds it.
    op.execute(
        "CREATE UNIQUE INDEX uq_customer_identities_external ON customer_identities (tenant_id, value) "
        "WHERE kind = 'external'"
    )
    # Phone-fragment and e-mail-fragment search. GiST, not GIN: phone numbers share few distinct trigrams, and
    # GIN's posting trees for them made bulk imports more than ten times slower (benchmarks/RESULTS.md).
    op.execute(
        "CREATE INDEX ix_customer_identities_value_trgm ON customer_identities USING gist (value gist_trgm_ops) "
        "WHERE kind IN ('phone', 'email')"
    )

    op.create_table(
        "customer_field_defs",
        sa.Column("key", sa.String(40), nullable=False),
        sa.Column("label", sa.String(120), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("choices", postgresql.ARRAY(sa.String(120)), nullable=False, server_default="{}"),
        sa.Column("required", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("sensitive", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("max_length", sa.Integer(), nullable=True),
        sa.Column("min_value", sa.Float(), nullable=True),
        sa.Column("max_value", sa.Float(), nullable=True),
        sa.Column("active", sa.Boolean(), nullable=False, server_default=sa.true()),
        sa.Column("position", sa.Integer(), nullable=False, server_default="0"),
        *_base(),
        sa.CheckConstraint("type IN ('text', 'number', 'date', 'choice')", name=op.f("ck_customer_field_defs_type")),
        _tenant_fk("customer_field_defs"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_customer_field_defs")),
        sa.UniqueConstraint("tenant_id", "key", name=op.f("uq_customer_field_defs_tenant_id_key")),
    )

    op.create_table(
        "customer_notes",
        sa.Column("customer_id", sa.UUID(), nullable=False),
        sa.Column("author_id", sa.UUID(), nullable=True),
        sa.Column("author_type", sa.String(16), nullable=False, server_default="user"),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        *_base(),
        sa.ForeignKeyConstraint(
            ["tenant_id", "customer_id"],
            ["customers.tenant_id", "customers.id"],
            name=op.f("fk_customer_notes_tenant_id_customer_id_customers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_customer_notes")),
    )
    op.create_index("ix_customer_notes_customer", "customer_notes", ["tenant_id", "customer_id", "created_at"])

    op.create_table(
        "tickets",
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("customer_id", sa.UUID(), nullable=True),
        sa.Column("interaction_id", sa.UUID(), nullable=True),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("category", sa.String(60), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("assignee_user_id", sa.UUID(), nullable=True),
        sa.Column("assignee_team_id", sa.UUID(), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        *_base(),
        sa.CheckConstraint("priority IN ('low', 'normal', 'high', 'urgent')", name=op.f("ck_tickets_priority")),
        sa.CheckConstraint(
            "status IN ('new', 'open', 'pending', 'resolved', 'closed')", name=op.f("ck_tickets_status")
        ),
        _tenant_fk("tickets"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_tickets")),
        sa.UniqueConstraint("tenant_id", "number", name=op.f("uq_tickets_tenant_id_number")),
    )
    for column, table, ref in (
        ("customer_id", "customers", "id"),
        ("assignee_team_id", "teams", "id"),
        ("assignee_user_id", "users", "id"),
        ("interaction_id", "interactions", "id"),
    ):
        op.execute(
            f"ALTER TABLE tickets ADD CONSTRAINT fk_tickets_tenant_id_{column}_{table} FOREIGN KEY (tenant_id, {column}) "
            f"REFERENCES {table} (tenant_id, {ref}) ON DELETE SET NULL ({column})"
        )
    op.create_index("ix_tickets_created", "tickets", ["tenant_id", "created_at", "id"])
    op.create_index("ix_tickets_status_due", "tickets", ["tenant_id", "status", "due_at"])
    op.create_index("ix_tickets_customer", "tickets", ["tenant_id", "customer_id", "status"])
    op.create_index("ix_tickets_assignee", "tickets", ["tenant_id", "assignee_user_id", "status"])

    op.create_table(
        "ticket_events",
        sa.Column("ticket_id", sa.UUID(), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("author_id", sa.UUID(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("changes", postgresql.JSONB(), nullable=False, server_default="{}"),
        *_base(),
        sa.CheckConstraint("kind IN ('created','comment','changed')", name=op.f("ck_ticket_events_kind")),
        sa.ForeignKeyConstraint(
            ["tenant_id", "ticket_id"],
            ["tickets.tenant_id", "tickets.id"],
            name=op.f("fk_ticket_events_tenant_id_ticket_id_tickets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_ticket_events")),
    )
    op.create_index("ix_ticket_events_ticket", "ticket_events", ["tenant_id", "ticket_id", "created_at"])

    op.create_table(
        "ticket_slas",
        sa.Column("tenant_id", sa.UUID(), nullable=False),
        sa.Column("priority", sa.String(8), nullable=False),
        sa.Column("resolve_minutes", sa.Integer(), nullable=False),
        sa.CheckConstraint("priority IN ('low', 'normal', 'high', 'urgent')", name=op.f("ck_ticket_slas_priority")),
        sa.CheckConstraint("resolve_minutes > 0", name=op.f("ck_ticket_slas_resolve_minutes")),
        _tenant_fk("ticket_slas"),
        sa.PrimaryKeyConstraint("tenant_id", "priority", name=op.f("pk_ticket_slas")),
    )

    op.create_table(
        "customer_imports",
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("match_on", postgresql.ARRAY(sa.String(16)), nullable=False),
        sa.Column("mapping", postgresql.JSONB(), nullable=False),
        sa.Column("encoding", sa.String(16), nullable=False),
        sa.Column("detected_encoding", sa.String(16), nullable=True),
        sa.Column("team_id", sa.UUID(), nullable=True),
        sa.Column("file_name", sa.String(255), nullable=True),
        sa.Column("file_bytes", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("file_sha256", sa.String(64), nullable=True),
        sa.Column("chunks", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("bytes_done", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rows_done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("updated", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("unchanged", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("errors", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failure", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        *_base(),
        sa.CheckConstraint(
            "status IN ('awaiting_file', 'queued', 'running', 'done', 'failed')",
            name=op.f("ck_customer_imports_status"),
        ),
        sa.CheckConstraint("mode IN ('update','skip')", name=op.f("ck_customer_imports_mode")),
        _tenant_fk("customer_imports"),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_customer_imports")),
    )
    op.create_index("ix_customer_imports_created", "customer_imports", ["tenant_id", "created_at", "id"])
    side_tables: tuple[tuple[str, list[Any]], ...] = (
        (
            "customer_import_chunks",
            [sa.Column("seq", sa.Integer(), nullable=False), sa.Column("data", sa.LargeBinary(), nullable=False)],
        ),
        (
            "customer_import_rows",
            [sa.Column("customer_id", sa.UUID(), nullable=False), sa.Column("row", sa.Integer(), nullable=False)],
        ),
        (
            "customer_import_errors",
            [
                sa.Column("row", sa.Integer(), nullable=False),
                sa.Column("position", sa.SmallInteger(), nullable=False),
                sa.Column("line", sa.Integer(), nullable=False),
                sa.Column("field", sa.String(80), nullable=False),
                sa.Column("message", sa.String(500), nullable=False),
            ],
        ),
    )
    for table, columns in side_tables:
        key = {"customer_import_chunks": "seq", "customer_import_rows": "customer_id", "customer_import_errors": "row"}[
            table
        ]
        pk = ["tenant_id", "import_id", key] + (["position"] if table == "customer_import_errors" else [])
        op.create_table(
            table,
            sa.Column("tenant_id", sa.UUID(), nullable=False),
            sa.Column("import_id", sa.UUID(), nullable=False),
            *columns,
            sa.ForeignKeyConstraint(
                ["tenant_id", "import_id"],
                ["customer_imports.tenant_id", "customer_imports.id"],
                name=op.f(f"fk_{table}_tenant_id_import_id_customer_imports"),
                ondelete="CASCADE",
            ),
            sa.PrimaryKeyConstraint(*pk, name=op.f(f"pk_{table}")),
        )

    # The customer's history: interactions by the customer they are attached to (id or address).
    op.create_index("ix_interactions_customer", "interactions", ["tenant_id", "customer_ref", "created_at"])

    for table in TENANT_TABLES:
        for statement in rls_policy_sql(table):
            op.execute(statement)
    op.execute(grant_new_permissions_sql())


def downgrade() -> None:
    op.drop_index("ix_interactions_customer", table_name="interactions")
    for table in reversed(TENANT_TABLES):
        op.drop_table(table)
