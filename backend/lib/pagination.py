"""Cursor pagination and sorting, done one way for every list the API serves.

A list route takes `limit`, `cursor` and `sort` (a field name, `-` for
descending) plus its own typed filters, and answers `{items, next_cursor}`.
The cursor is opaque: the last row's sort value and id, so pages stay stable
while rows are added (keyset pagination, no OFFSET).
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec
from litestar.params import Parameter
from sqlalchemy import ColumnElement, Row, Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from backend.config import get_settings
from backend.lib.problems import InvalidInput

T = TypeVar("T")


class Page(msgspec.Struct, Generic[T]):
    """One page of a list and the cursor of the next, `null` on the last page."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class PageRequest:
    """What the client asked for: how many, from where, in which order."""

    limit: int
    cursor: str | None
    sort: str | None


def page_request(
    limit: int | None = Parameter(query="limit", default=None, ge=1, description="Items per page"),
    cursor: str | None = Parameter(query="cursor", default=None, max_length=500, description="From `next_cursor`"),
    sort: str | None = Parameter(
        query="sort", default=None, max_length=40, description="Field name; prefix `-` for descending"
    ),
) -> PageRequest:
    """Dependency that reads the pagination parameters every list route shares."""
    settings = get_settings()
    if limit is not None and limit > settings.page_size_max:
        raise InvalidInput.field("limit", f"at most {settings.page_size_max}")
    return PageRequest(limit=limit or settings.page_size_default, cursor=cursor, sort=sort)


def _encode(value: Any, row_id: uuid.UUID) -> str:
    raw = value.isoformat() if isinstance(value, datetime) else value
    data = json.dumps([raw, str(row_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _decode(cursor: str, column: InstrumentedAttribute[Any]) -> tuple[Any, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        raw, row_id = json.loads(base64.urlsafe_b64decode(padded))
        python_type = column.type.python_type
        value = datetime.fromisoformat(raw) if python_type is datetime and raw is not None else raw
        if python_type is uuid.UUID and raw is not None:
            value = uuid.UUID(raw)
        return value, uuid.UUID(row_id)
    except (ValueError, TypeError, json.JSONDecodeError, NotImplementedError) as exc:
        raise InvalidInput.field("cursor", "not a cursor this list gave out") from exc


async def paginate(
    session: AsyncSession,
    statement: Select[Any],
    page: PageRequest,
    *,
    sortable: Mapping[str, InstrumentedAttribute[Any]],
    default_sort: str,
    id_column: InstrumentedAttribute[Any],
) -> tuple[list[Any], str | None]:
    """Apply the sort, the cursor and the limit to `statement`; return rows and the next cursor."""
    sort = page.sort or default_sort
    descending = sort.startswith("-")
    field = sort.removeprefix("-")
    column = sortable.get(field)
    if column is None:
        raise InvalidInput.field("sort", f"one of {', '.join(sorted(sortable))}, optionally prefixed by -")
    if page.cursor:
        value, last_id = _decode(page.cursor, column)
        if descending:
            statement = statement.where(or_(column < value, and_(column == value, id_column < last_id)))
        else:
            statement = statement.where(or_(column > value, and_(column == value, id_column > last_id)))
    order = (column.desc(), id_column.desc()) if descending else (column.asc(), id_column.asc())
    statement = statement.order_by(*order).limit(page.limit + 1)
    rows = list((await session.execute(statement)).scalars().all())
    next_cursor = None
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        last = rows[-1]
        next_cursor = _encode(getattr(last, column.key), getattr(last, id_column.key))
    return rows, next_cursor


async def paginate_rows(
    session: AsyncSession,
    statement: Select[Any],
    page: PageRequest,
    *,
    sortable: Mapping[str, ColumnElement[Any]],
    default_sort: str,
    id_column: ColumnElement[Any],
) -> tuple[list[Row[Any]], str | None]:
    """`paginate` for statements whose rows are not one mapped entity (a UNION of several kinds of entries).

    The sort and id columns are columns of the statement (for example of a subquery); rows come back whole.
    """
    sort = page.sort or default_sort
    descending = sort.startswith("-")
    field = sort.removeprefix("-")
    column = sortable.get(field)
    if column is None:
        raise InvalidInput.field("sort", f"one of {', '.join(sorted(sortable))}, optionally prefixed by -")
    if page.cursor:
        value, last_id = _decode(page.cursor, column)  # type: ignore[arg-type]
        if descending:
            statement = statement.where(or_(column < value, and_(column == value, id_column < last_id)))
        else:
            statement = statement.where(or_(column > value, and_(column == value, id_column > last_id)))
    order = (column.desc(), id_column.desc()) if descending else (column.asc(), id_column.asc())
    statement = statement.order_by(*order).limit(page.limit + 1)
    rows = list((await session.execute(statement)).all())
    next_cursor = None
    if len(rows) > page.limit:
        rows = rows[: page.limit]
        last = rows[-1]._mapping
        next_cursor = _encode(last[column.key], last[id_column.key])
    return rows, next_cursor
