"""Declarative base and the column conventions every table follows."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import DateTime, MetaData, func
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current instant, timezone-aware in UTC: the only kind of time we store."""
    return datetime.now(UTC)


def time_ordered_ids(count: int) -> list[str]:
    """`count` new UUIDs of version 7 (RFC 9562), as text: the creation time in milliseconds, then 74 random bits.

    For rows written in bulk. Random (version 4) keys land on a random leaf of every index they lead, so a
    large import reads, dirties and (after each checkpoint) writes whole to the WAL one index page per row;
    keys that grow with time land together on the right-hand pages. Text, because building a `uuid.UUID`
    costs more than the rest of this, and the database parses either.
    """
    prefix = f"{time.time_ns() // 1_000_000:012x}"
    noise = os.urandom(10 * count).hex()
    return [
        f"{prefix}7{noise[i + 1 : i + 4]}{_VARIANT[noise[i + 4]]}{noise[i + 5 : i + 20]}"
        for i in range(0, 20 * count, 20)
    ]


# The variant's two high bits are 10: the first hex digit of that group is 8, 9, a or b.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def time_ordered_uuids(count: int) -> list[uuid.UUID]:
    """`time_ordered_ids` as `uuid.UUID`s, for ids the code keeps using."""
    return [uuid.UUID(i) for i in time_ordered_ids(count)]


class Base(DeclarativeBase):
    """Base of every table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True), uuid.UUID: UUID(as_uuid=True)}


class TenantOwned:
    """A row that belongs to one tenant: `tenant_id` leads the primary key.

    Every foreign key between tenant-owned tables is written `(tenant_id, x_id)` so
    a row can never point into another tenant, and so the schema can be
    distributed by `tenant_id` later. Row-level security guards these tables.
    """

    tenant_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow)


class GlobalRow:
    """A row of one of the few global tables (see `backend.db.tenancy.GLOBAL_TABLES`)."""

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), default=utcnow)
