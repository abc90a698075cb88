"""Tables of the customer store: customers and their contact points, custom fields, notes, tickets, imports."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column

from backend.db.base import Base, TenantOwned, utcnow

IDENTITY_KINDS = ("phone", "email", "wechat", "external")
FIELD_TYPES = ("text", "number", "date", "choice")
TICKET_PRIORITIES = ("low", "normal", "high", "urgent")
TICKET_STATUSES = ("new", "open", "pending", "resolved", "closed")
IMPORT_STATUSES = ("awaiting_file", "queued", "running", "done", "failed")


class Customer(TenantOwned, Base):
    """A person or company the tenant deals with, shared by every team that may see it."""

    __tablename__ = "customers"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        # A deleted unit leaves its customers unowned (PostgreSQL 15's column list on SET NULL).
        ForeignKeyConstraint(["tenant_id", "team_id"], ["teams.tenant_id", "teams.id"], ondelete="SET NULL (team_id)"),
        Index("ix_customers_created", "tenant_id", "created_at", "id"),
        Index("ix_customers_name", "tenant_id", "name", "id"),
        Index("ix_customers_updated", "tenant_id", "updated_at", "id"),
        Index("ix_customers_team", "tenant_id", "team_id"),
        Index("ix_customers_name_trgm", "name", postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"}),
        Index("ix_customers_name_fts", text("to_tsvector('simple', name)"), postgresql_using="gin"),
        Index("ix_customers_tags", "tags", postgresql_using="gin"),
    )

    name: Mapped[str] = mapped_column(String(200))
    team_id: Mapped[uuid.UUID | None] = mapped_column()
    """The owning business unit; None means shared by the whole tenant."""
    tags: Mapped[list[str]] = mapped_column(ARRAY(String(60)), default=list)
    custom: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    """Values of the tenant's custom fields, by field key."""
    version: Mapped[int] = mapped_column(Integer, default=1)
    """Raised by every change; the ETag, and what If-Match is compared with."""
    created_by: Mapped[uuid.UUID | None] = mapped_column()
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    merged_into_id: Mapped[uuid.UUID | None] = mapped_column()
    """Set when this record was merged into another; it then leaves search and screen pop."""
    erased_at: Mapped[datetime | None] = mapped_column()


class CustomerIdentity(TenantOwned, Base):
    """One way to reach or recognise a customer: a phone number, an e-mail, a WeChat OpenID, an external id."""

    __tablename__ = "customer_identities"
    __table_args__ = (
        CheckConstraint(f"kind IN {IDENTITY_KINDS!r}", name="kind"),
        UniqueConstraint("tenant_id", "customer_id", "kind", "value"),
        ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.id"], ondelete="CASCADE"),
        Index("ix_customer_identities_lookup", "tenant_id", "kind", "value"),
        # An external id names one record of the tenant's other system: at most one customer holds it.
        Index(
            "uq_customer_identities_external",
            "tenant_id",
            "value",
            unique=True,
            postgresql_where=text("kind = 'external'"),
        ),
        # Fragment search; GiST, not GIN: phone numbers share few trigrams and GIN made imports ten times slower.
        Index(
            "ix_customer_identities_value_trgm",
            "value",
            postgresql_using="gist",
            postgresql_ops={"value": "gist_trgm_ops"},
            postgresql_where=text("kind IN ('phone', 'email')"),
        ),
    )

    customer_id: Mapped[uuid.UUID] = mapped_column()
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(320))
    """What lookups match: E.164 for phone numbers, the lower-cased address for e-mails."""
    raw: Mapped[str] = mapped_column(String(320))
    """As it was entered."""
    valid: Mapped[bool] = mapped_column(Boolean, default=True)
    """False for a phone number that could not be parsed: kept as entered, flagged."""
    label: Mapped[str | None] = mapped_column(String(40))
    position: Mapped[int] = mapped_column(SmallInteger, default=0)


class CustomerFieldDef(TenantOwned, Base):
    """A custom field a tenant admin defined for customer records."""

    __tablename__ = "customer_field_defs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key"),
        CheckConstraint(f"type IN {FIELD_TYPES!r}", name="type"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    key: Mapped[str] = mapped_column(String(40))
    label: Mapped[str] = mapped_column(String(120))
    type: Mapped[str] = mapped_column(String(16))
    choices: Mapped[list[str]] = mapped_column(ARRAY(String(120)), default=list)
    required: Mapped[bool] = mapped_column(Boolean, default=False)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False)
    """Masked like phone numbers for those without `customers:read_sensitive` (an ID card number)."""
    max_length: Mapped[int | None] = mapped_column(Integer)
    min_value: Mapped[float | None] = mapped_column()
    max_value: Mapped[float | None] = mapped_column()
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    position: Mapped[int] = mapped_column(Integer, default=0)


class CustomerNote(TenantOwned, Base):
    """A note an agent wrote on a customer, with its author and time."""

    __tablename__ = "customer_notes"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.id"], ondelete="CASCADE"),
        Index("ix_customer_notes_customer", "tenant_id", "customer_id", "created_at"),
    )

    customer_id: Mapped[uuid.UUID] = mapped_column()
    author_id: Mapped[uuid.UUID | None] = mapped_column()
    author_type: Mapped[str] = mapped_column(String(16), default="user")
    body: Mapped[str] = mapped_column(Text)
    interaction_id: Mapped[uuid.UUID | None] = mapped_column()


class Ticket(TenantOwned, Base):
    """A work order: something to do for a customer, with an owner, a status and a due time."""

    __tablename__ = "tickets"
    __table_args__ = (
        UniqueConstraint("tenant_id", "number"),
        CheckConstraint(f"priority IN {TICKET_PRIORITIES!r}", name="priority"),
        CheckConstraint(f"status IN {TICKET_STATUSES!r}", name="status"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        # What a ticket refers to may go; the ticket stays, with that column alone set to NULL.
        ForeignKeyConstraint(
            ["tenant_id", "customer_id"], ["customers.tenant_id", "customers.id"], ondelete="SET NULL (customer_id)"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "assignee_team_id"], ["teams.tenant_id", "teams.id"], ondelete="SET NULL (assignee_team_id)"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "assignee_user_id"], ["users.tenant_id", "users.id"], ondelete="SET NULL (assignee_user_id)"
        ),
        ForeignKeyConstraint(
            ["tenant_id", "interaction_id"],
            ["interactions.tenant_id", "interactions.id"],
            ondelete="SET NULL (interaction_id)",
        ),
        Index("ix_tickets_created", "tenant_id", "created_at", "id"),
        Index("ix_tickets_status_due", "tenant_id", "status", "due_at"),
        Index("ix_tickets_customer", "tenant_id", "customer_id", "status"),
        Index("ix_tickets_assignee", "tenant_id", "assignee_user_id", "status"),
    )

    number: Mapped[int] = mapped_column(Integer)
    """The tenant's own running number, what people quote on the phone."""
    customer_id: Mapped[uuid.UUID | None] = mapped_column()
    interaction_id: Mapped[uuid.UUID | None] = mapped_column()
    subject: Mapped[str] = mapped_column(String(300))
    description: Mapped[str] = mapped_column(Text, default="")
    priority: Mapped[str] = mapped_column(String(8), default="normal")
    category: Mapped[str | None] = mapped_column(String(60))
    status: Mapped[str] = mapped_column(String(10), default="new")
    assignee_user_id: Mapped[uuid.UUID | None] = mapped_column()
    assignee_team_id: Mapped[uuid.UUID | None] = mapped_column()
    due_at: Mapped[datetime] = mapped_column()
    resolved_at: Mapped[datetime | None] = mapped_column()
    closed_at: Mapped[datetime | None] = mapped_column()
    created_by: Mapped[uuid.UUID | None] = mapped_column()
    version: Mapped[int] = mapped_column(Integer, default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class TicketEvent(TenantOwned, Base):
    """One entry of a ticket's history: its creation, a comment, or a change with before and after."""

    __tablename__ = "ticket_events"
    __table_args__ = (
        CheckConstraint("kind IN ('created','comment','changed')", name="kind"),
        ForeignKeyConstraint(["tenant_id", "ticket_id"], ["tickets.tenant_id", "tickets.id"], ondelete="CASCADE"),
        Index("ix_ticket_events_ticket", "tenant_id", "ticket_id", "created_at"),
    )

    ticket_id: Mapped[uuid.UUID] = mapped_column()
    kind: Mapped[str] = mapped_column(String(10))
    author_id: Mapped[uuid.UUID | None] = mapped_column()
    body: Mapped[str | None] = mapped_column(Text)
    changes: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    """{field: [before, after]}."""


class TicketSla(Base):
    """A tenant's resolution time for one ticket priority (defaults come from the settings)."""

    __tablename__ = "ticket_slas"
    __table_args__ = (
        CheckConstraint(f"priority IN {TICKET_PRIORITIES!r}", name="priority"),
        CheckConstraint("resolve_minutes > 0", name="resolve_minutes"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    priority: Mapped[str] = mapped_column(String(8), primary_key=True)
    resolve_minutes: Mapped[int] = mapped_column(Integer)


class CustomerImport(TenantOwned, Base):
    """One bulk import: its options, its file (in chunks), and its progress while the job runs."""

    __tablename__ = "customer_imports"
    __table_args__ = (
        CheckConstraint(f"status IN {IMPORT_STATUSES!r}", name="status"),
        CheckConstraint("mode IN ('update','skip')", name="mode"),
        ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),
        Index("ix_customer_imports_created", "tenant_id", "created_at", "id"),
    )

    created_by: Mapped[uuid.UUID | None] = mapped_column()
    actor_type: Mapped[str] = mapped_column(String(16), default="user")
    status: Mapped[str] = mapped_column(String(16), default="awaiting_file")
    mode: Mapped[str] = mapped_column(String(8))
    """What a row matching an existing customer does: `update` it or `skip` it."""
    match_on: Mapped[list[str]] = mapped_column(ARRAY(String(16)))
    mapping: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    """{CSV column header: field}; empty means columns named like the fields."""
    encoding: Mapped[str] = mapped_column(String(16), default="auto")
    detected_encoding: Mapped[str | None] = mapped_column(String(16))
    team_id: Mapped[uuid.UUID | None] = mapped_column()
    """The business unit new records get when the file names none."""
    file_name: Mapped[str | None] = mapped_column(String(255))
    file_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    file_sha256: Mapped[str | None] = mapped_column(String(64))
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_done: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[int] = mapped_column(Integer, default=0)
    updated: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[int] = mapped_column(Integer, default=0)
    failure: Mapped[str | None] = mapped_column(Text)
    """Why the whole import stopped, if it did."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Runs of the job so far; after the last allowed one a failing import is marked failed."""
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class CustomerImportChunk(Base):
    """A piece of an uploaded import file, kept in PostgreSQL so any worker can read it."""

    __tablename__ = "customer_import_chunks"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "import_id"], ["customer_imports.tenant_id", "customer_imports.id"], ondelete="CASCADE"
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    import_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class CustomerImportRow(Base):
    """Which customer an import row already wrote: a later row of the same file matching it is a duplicate."""

    __tablename__ = "customer_import_rows"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "import_id"], ["customer_imports.tenant_id", "customer_imports.id"], ondelete="CASCADE"
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    import_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    customer_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    row: Mapped[int] = mapped_column(Integer)


class CustomerImportError(Base):
    """One problem with one row of an import: the downloadable report."""

    __tablename__ = "customer_import_errors"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "import_id"], ["customer_imports.tenant_id", "customer_imports.id"], ondelete="CASCADE"
        ),
    )

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    import_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    row: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    field: Mapped[str] = mapped_column(String(80))
    message: Mapped[str] = mapped_column(String(500))


class CustomerSettings(Base):
    """A tenant's settings of the customer store."""

    __tablename__ = "customer_settings"
    __table_args__ = (ForeignKeyConstraint(["tenant_id"], ["tenants.id"], ondelete="CASCADE"),)

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    default_region: Mapped[str | None] = mapped_column(String(2))
    """ISO 3166 region local phone numbers are read in; None derives it from the tenant's time zone."""
