"""Export of a filtered set of customers as streamed CSV, masked as the exporter must see it.

Rows are read a batch at a time by keyset (never the whole set in memory) in a
transaction of their own, so the response can stream after the request's
transaction has committed its audit entry. Cells that a spreadsheet would run
as a formula (`=cmd|...`, `+`, `-`, `@`, tab, carriage return) are neutralised.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.customers.access import Viewer
from backend.customers.models import Customer
from backend.customers.service import customer_out, identities_of, search_statement, store_config
from backend.db.engine import tenant_transaction

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?[0-9][0-9 ]*$")


def neutralise(cell: str) -> str:
    """A cell a spreadsheet shows as text: one starting like a formula gets a leading apostrophe.

    Phone numbers such as `+8613800138000` (a sign and digits) are left alone: no spreadsheet runs them.
    """
    if cell.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(cell):
        return "'" + cell
    return cell


def _row(cells: Sequence[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow([neutralise(c) for c in cells])
    return buffer.getvalue()


async def export_csv(
    sessionmaker: async_sessionmaker[AsyncSession],
    viewer: Viewer,
    filters: dict[str, Any],
    *,
    batch: int,
    encoding: str = "utf-8",
) -> AsyncIterator[bytes]:
    """The CSV, piece by piece: a header, then one line per customer the viewer may reach."""
    async with tenant_transaction(sessionmaker, viewer.tenant_id) as session:
        config = await store_config(session, viewer.tenant_id)
    custom_keys = list(config.rules)
    header = [
        "id",
        "name",
        "phones",
        "emails",
        "wechat_openids",
        "external_ids",
        "tags",
        "team_id",
        *[f"custom.{k}" for k in custom_keys],
        "version",
        "created_at",
        "updated_at",
    ]
    # A byte-order mark lets spreadsheet programs recognise UTF-8; GB18030 is for those that do not.
    prefix = "\ufeff" if encoding == "utf-8" else ""
    yield (prefix + _row(header)).encode(encoding, errors="replace")
    last: tuple[Any, uuid.UUID] | None = None
    while True:
        async with tenant_transaction(sessionmaker, viewer.tenant_id) as session:
            statement = search_statement(viewer, region=config.region, **filters)
            if last is not None:
                statement = statement.where(
                    or_(Customer.created_at > last[0], and_(Customer.created_at == last[0], Customer.id > last[1]))
                )
            rows = list(
                (await session.scalars(statement.order_by(Customer.created_at, Customer.id).limit(batch))).all()
            )
            if not rows:
                return
            identities = await identities_of(session, [c.id for c in rows])
        lines = []
        for customer in rows:
            out = customer_out(customer, identities[customer.id], config, viewer)
            lines.append(
                _row(
                    [
                        str(out.id),
                        out.name,
                        "; ".join(p.number for p in out.phones),
                        "; ".join(out.emails),
                        "; ".join(out.wechat_openids),
                        "; ".join(out.external_ids),
                        "; ".join(out.tags),
                        str(out.team_id or ""),
                        *["" if out.custom.get(k) is None else str(out.custom[k]) for k in custom_keys],
                        str(out.version),
                        out.created_at.isoformat(),
                        out.updated_at.isoformat(),
                    ]
                )
            )
        last = (rows[-1].created_at, rows[-1].id)
        yield "".join(lines).encode(encoding, errors="replace")
