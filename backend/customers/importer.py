"""Bulk import of customers from CSV: streamed upload, then a background job in constant memory.

The upload is streamed into PostgreSQL in fixed-size chunks (so any worker can
read it), refused beyond its own size limit, and checked on the way for its
encoding (UTF-8, or GB18030 which Chinese exports often use) and its header.
The job then reads the chunks one at a time, cuts them into records by
quote parity (a record ends at a newline outside quotes), parses each with the
standard `csv` module, and writes a batch of rows per transaction: progress
is readable while it runs, a crash resumes after the last committed batch, and
every refused row is listed in the error report. Rows are matched to existing
customers on the chosen keys; a second row of the same file matching the same
customer is a duplicate, so re-running a file changes nothing.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import hashlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import String, and_, any_, bindparam, delete, insert, or_, select, text, tuple_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import BindParameter

from backend.config import Settings, get_settings
from backend.customers.access import Viewer
from backend.customers.contacts import normalise_email, normalise_phone
from backend.customers.fields import FieldRule, check_values
from backend.customers.models import (
    Customer,
    CustomerIdentity,
    CustomerImport,
    CustomerImportChunk,
    CustomerImportError,
    CustomerImportRow,
)
from backend.customers.schemas import ImportCreate, ImportOut
from backend.customers.service import StoreConfig, forget_config, store_config
from backend.db.base import time_ordered_ids, time_ordered_uuids, utcnow
from backend.db.engine import tenant_transaction
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, InvalidInput, NotFound, Problem
from backend.tenants import audit
from backend.tenants import service as tenants_service

log = structlog.get_logger("customers.import")

TARGETS = ("name", "phone", "email", "wechat_openid", "external_id", "tags", "team", "ignore")
MATCH_KIND = {"phone": "phone", "email": "email", "external_id": "external"}
_AUTO = {
    "name": "name",
    "full_name": "name",
    "customer": "name",
    "phone": "phone",
    "phones": "phone",
    "mobile": "phone",
    "tel": "phone",
    "telephone": "phone",
    "phone_number": "phone",
    "email": "email",
    "e_mail": "email",
    "emails": "email",
    "wechat": "wechat_openid",
    "openid": "wechat_openid",
    "wechat_openid": "wechat_openid",
    "external_id": "external_id",
    "crm_id": "external_id",
    "tags": "tags",
    "team": "team",
    "business_unit": "team",
}
YIELD_EVERY_ROWS = 10
"""While parsing, hand the event loop to the batch being written this often. Each of its statements waits for
this to be sent on: at every 100 rows (about 8 ms of parsing) the database sat idle a good part of each batch."""
_CONTROL = re.compile(r"[\x00-\x1f]")
"""A control character (below 32): refused in names and external ids. A pattern, not a loop over the characters,
which cost more than the rest of a name's checks."""
_OVERSIZE = "\ue000oversize\ue000"
"""Stands in for a physical line that was cut off at the row limit (a private-use character no export writes)."""


class PayloadTooLarge(Problem):
    """The upload is larger than the import's own limit."""

    status = 413
    kind = "payload-too-large"
    title = "File too large"


def import_out(row: CustomerImport) -> ImportOut:
    """The import and its progress."""
    if row.status == "done":
        percent = 100.0
    elif row.file_bytes:
        percent = round(min(99.9, 100 * row.bytes_done / row.file_bytes), 1)
    else:
        percent = 0.0
    return ImportOut(
        id=row.id,
        status=row.status,
        mode=row.mode,
        match_on=list(row.match_on),
        mapping=dict(row.mapping),
        encoding=row.encoding,
        detected_encoding=row.detected_encoding,
        file_name=row.file_name,
        file_bytes=row.file_bytes,
        rows_done=row.rows_done,
        created=row.created,
        updated=row.updated,
        unchanged=row.unchanged,
        skipped=row.skipped,
        errors=row.errors,
        percent=percent,
        failure=row.failure,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _target_ok(target: str, rules: dict[str, FieldRule]) -> bool:
    if target in TARGETS:
        return True
    return target.startswith("custom.") and target.removeprefix("custom.") in rules


async def create_import(session: AsyncSession, viewer: Viewer, data: ImportCreate) -> ImportOut:
    """Record an import's options; the file is sent next, to `.../file`."""
    config = await store_config(session, viewer.tenant_id)
    errors = [
        {
            "field": f"mapping.{column}",
            "message": f"{target!r} is not a field (name, phone, email, wechat_openid, "
            "external_id, tags, team, custom.<key>, ignore)",
        }
        for column, target in data.mapping.items()
        if not _target_ok(target, config.rules)
    ]
    if errors:
        raise InvalidInput("; ".join(e["message"] for e in errors), errors=errors)
    team_id = data.team_id
    if team_id is None and not viewer.all_units and len(viewer.team_ids) == 1:
        team_id = next(iter(viewer.team_ids))
    if team_id is not None:
        try:
            await tenants_service.get_team(session, team_id)
        except NotFound as exc:
            raise InvalidInput.field("team_id", "is not a team of this tenant") from exc
        if not viewer.owns_unit(team_id):
            raise InvalidInput.field("team_id", "is not one of your business units")
    row = CustomerImport(
        tenant_id=viewer.tenant_id,
        id=uuid.uuid4(),
        created_by=viewer.actor_id,
        actor_type=viewer.actor_type,
        status="awaiting_file",
        mode=data.mode,
        match_on=list(dict.fromkeys(data.match_on)),
        mapping=dict(data.mapping),
        encoding=data.encoding,
        team_id=team_id,
        file_name=data.file_name,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return import_out(row)


async def _import(session: AsyncSession, import_id: uuid.UUID, *, lock: bool = False) -> CustomerImport:
    statement = select(CustomerImport).where(CustomerImport.id == import_id)
    found = await session.scalar(statement.with_for_update() if lock else statement)
    if found is None:
        raise NotFound("No such import")
    return found


async def get_import(session: AsyncSession, import_id: uuid.UUID) -> ImportOut:
    """An import and how far it got."""
    return import_out(await _import(session, import_id))


async def list_imports(session: AsyncSession, page: PageRequest) -> tuple[list[ImportOut], str | None]:
    """Imports, newest first."""
    rows, cursor = await paginate(
        session,
        select(CustomerImport),
        page,
        sortable={"created_at": CustomerImport.created_at},
        default_sort="-created_at",
        id_column=CustomerImport.id,
    )
    return [import_out(r) for r in rows], cursor


def _normal_header(header: str) -> str:
    return header.strip().lower().replace(" ", "_").replace("-", "_")


def effective_mapping(headers: Sequence[str], requested: dict[str, str], rules: dict[str, FieldRule]) -> dict[str, str]:
    """{column: field}: the requested mapping, or columns named like fields (and custom-field keys)."""
    if requested:
        return dict(requested)
    mapping = {}
    for header in headers:
        key = _normal_header(header)
        if key in _AUTO:
            mapping[header] = _AUTO[key]
        elif key.startswith("custom.") and key.removeprefix("custom.") in rules:
            mapping[header] = key
        elif key in rules:
            mapping[header] = f"custom.{key}"
    return mapping


def check_header(
    headers: Sequence[str], requested: dict[str, str], match_on: Sequence[str], rules: dict[str, FieldRule]
) -> dict[str, str]:
    """The mapping to use, or `InvalidInput` naming what is wrong with the header."""
    errors: list[dict[str, str]] = []
    if not headers or all(not h.strip() for h in headers):
        raise InvalidInput.field("file", "the first line must be a header naming the columns")
    for index, header in enumerate(headers):
        if not header.strip():
            errors.append({"field": f"header[{index}]", "message": "a column has no name"})
    for header in {h for h in headers if headers.count(h) > 1}:
        errors.append({"field": f"header.{header}", "message": "appears twice"})
    mapping = effective_mapping(headers, requested, rules)
    for column in mapping:
        if column not in headers:
            errors.append({"field": f"mapping.{column}", "message": "is not a column of the file"})
    targets = set(mapping.values())
    if not any(key in targets for key in match_on):
        errors.append(
            {
                "field": "match_on",
                "message": f"no column is mapped to {', '.join(match_on)}, so rows cannot be matched or de-duplicated",
            }
        )
    if errors:
        raise InvalidInput("; ".join(f"{e['field']}: {e['message']}" for e in errors), errors=errors)
    return mapping


def _first_record(text: str) -> list[str]:
    for record in RecordSplitter(1_000_000).feed(text + "\n"):
        cells = next(csv.reader([record.text]), [])
        if cells:
            cells[0] = cells[0].lstrip("\ufeff")
        return cells
    return []


async def receive_file(
    session: AsyncSession,
    viewer: Viewer,
    import_id: uuid.UUID,
    body: AsyncIterator[bytes],
    settings: Settings,
    file_name: str | None = None,
) -> ImportOut:
    """Store an upload chunk by chunk (never whole in memory), check encoding and header, and queue the import.

    Anything wrong refuses the whole request and, the transaction rolling back, stores nothing.
    """
    row = await _import(session, import_id, lock=True)
    if row.status != "awaiting_file":
        raise Conflict("This import already has its file; start a new import", kind="import-has-file")
    candidates = ["utf-8", "gb18030"] if row.encoding == "auto" else [row.encoding]
    decoders = {name: codecs.getincrementaldecoder(name)("strict") for name in candidates}
    failures: dict[str, int] = {}
    digest = hashlib.sha256()
    buffer = bytearray()
    head = bytearray()
    total = seq = 0
    async for piece in body:
        if not piece:
            continue
        if total + len(piece) > settings.customer_import_max_bytes:
            raise PayloadTooLarge(
                f"The file is larger than the import limit of {settings.customer_import_max_bytes} bytes",
                extra={"limit_bytes": settings.customer_import_max_bytes},
            )
        for name, decoder in decoders.items():
            if name in failures:
                continue
            try:
                decoder.decode(piece)
            except UnicodeDecodeError as exc:
                failures[name] = total + exc.start
        total += len(piece)
        digest.update(piece)
        if len(head) < settings.customer_import_chunk_bytes:
            head += piece[: settings.customer_import_chunk_bytes - len(head)]
        buffer += piece
        while len(buffer) >= settings.customer_import_chunk_bytes:
            session.add(
                CustomerImportChunk(
                    tenant_id=viewer.tenant_id,
                    import_id=row.id,
                    seq=seq,
                    data=bytes(buffer[: settings.customer_import_chunk_bytes]),
                )
            )
            del buffer[: settings.customer_import_chunk_bytes]
            seq += 1
            await session.flush()
    if buffer:
        session.add(CustomerImportChunk(tenant_id=viewer.tenant_id, import_id=row.id, seq=seq, data=bytes(buffer)))
        seq += 1
    for name, decoder in decoders.items():
        if name not in failures:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                failures[name] = total
    if total == 0:
        raise InvalidInput.field("file", "is empty")
    chosen = next((name for name in candidates if name not in failures), None)
    if chosen is None:
        where = min(failures.values())
        raise InvalidInput.field(
            "file",
            f"is not valid {' or '.join(candidates)} text (first bad byte at offset {where}); "
            "save it as UTF-8, or choose the encoding it was written in",
        )
    config = await store_config(session, viewer.tenant_id)
    head_text = codecs.getincrementaldecoder(chosen)("ignore").decode(bytes(head))
    if "\n" not in head_text and total > len(head):
        raise InvalidInput.field("file", "the header line is longer than the import allows")
    headers = _first_record(head_text)
    mapping = check_header(headers, dict(row.mapping), row.match_on, config.rules)
    row.mapping = mapping
    row.detected_encoding = chosen
    row.file_bytes = total
    row.file_sha256 = digest.hexdigest()
    row.chunks = seq
    row.file_name = file_name or row.file_name
    row.status = "queued"
    await session.flush()
    return import_out(row)


# --- reading the file back: records by quote parity ------------------------------------------------


@dataclass(slots=True)
class Record:
    """One CSV record's text and the physical line it starts on."""

    text: str
    line: int
    oversize: bool = False


@dataclass(slots=True)
class RecordSplitter:
    """Cuts decoded text into CSV records: a record ends at a newline outside quotes.

    RFC 4180 doubles quotes inside quoted fields, so a record is complete when its
    count of `"` is even. A record longer than `max_chars` is cut off (and marked),
    so a runaway quote or a 10 MB cell costs at most `max_chars` of memory.
    """

    max_chars: int
    line: int = 0
    _pending: list[str] = field(default_factory=list)
    _pending_len: int = 0
    _quotes: int = 0
    _start: int = 1
    _skipping: bool = False
    _open_line: bool = False

    def feed(self, text: str) -> Iterator[Record]:
        """The records completed by `text` (which may end, or start, in the middle of a line)."""
        pieces = text.split("\n")
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            if self._skipping:
                if last:
                    continue
                self.line += 1
                yield Record(_OVERSIZE, self._start, oversize=True)
                self._reset()
                continue
            if self._open_line:
                self._pending[-1] += piece
            else:
                if not self._pending:
                    self._start = self.line + 1
                self._pending.append(piece)
                self._pending_len += 1
            self._pending_len += len(piece)
            self._quotes += piece.count('"')
            self._open_line = last
            if self._pending_len > self.max_chars:
                self._pending = []
                self._pending_len = 0
                if last:
                    self._skipping = True
                    continue
                self.line += 1
                yield Record(_OVERSIZE, self._start, oversize=True)
                self._reset()
                continue
            if last:
                continue
            self.line += 1
            if self._quotes % 2 == 0:
                record = "\n".join(self._pending)
                self._reset()
                yield Record(record, self._start)

    def finish(self) -> Iterator[Record]:
        """The last record, if the text did not end with a newline."""
        if self._skipping:
            yield Record(_OVERSIZE, self._start, oversize=True)
        elif self._pending and any(self._pending):
            yield Record("\n".join(self._pending), self._start)
        self._reset()

    def _reset(self) -> None:
        self._pending = []
        self._pending_len = 0
        self._quotes = 0
        self._skipping = False
        self._open_line = False


# --- the job -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedRow:
    """A data row turned into customer values, or the reasons it cannot be."""

    row: int
    line: int
    name: str | None = None
    contacts: list[tuple[str, str, str, bool]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    team_id: uuid.UUID | None = None
    custom: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)

    _keys: list[tuple[str, str]] | None = field(default=None, repr=False)

    def keys(self, match_on: Sequence[str]) -> list[tuple[str, str]]:
        """The (kind, value) pairs this row is matched and de-duplicated on (one import has one `match_on`)."""
        if self._keys is None:
            kinds = {MATCH_KIND[m] for m in match_on}
            self._keys = [(kind, value) for kind, value, _, _ in self.contacts if kind in kinds]
        return self._keys


def values_array(values: list[str]) -> BindParameter[list[str]]:
    """One array parameter (not one parameter per value): a batch's keys stay far below the protocol's limit."""
    array: Any = ARRAY(String())
    return bindparam(None, values, type_=array)


def _split(cell: str) -> list[str]:
    return [part.strip() for part in cell.replace("|", ";").split(";") if part.strip()]


@dataclass(slots=True)
class RowReader:
    """Turns the cells of a row into customer values with the same checks as the API."""

    headers: list[str]
    mapping: dict[str, str]
    config: StoreConfig
    teams: dict[str, uuid.UUID]
    settings: Settings

    def parse(self, row: int, line: int, cells: list[str]) -> ParsedRow:
        """One row's values and errors."""
        parsed = ParsedRow(row, line)
        if len(cells) != len(self.headers):
            parsed.errors.append(("row", f"has {len(cells)} cells where the header has {len(self.headers)}"))
            return parsed
        custom: dict[str, str] = {}
        for header, cell in zip(self.headers, cells, strict=True):
            target = self.mapping.get(header)
            if target is None or target == "ignore":
                continue
            if len(cell) > self.settings.customer_import_max_cell_chars:
                parsed.errors.append(
                    (header, f"is longer than {self.settings.customer_import_max_cell_chars} characters")
                )
                continue
            value = cell.strip()
            if not value:
                continue
            if target == "name":
                if len(value) > 200 or _CONTROL.search(value):
                    parsed.errors.append((header, "must be at most 200 printable characters"))
                else:
                    parsed.name = value
            elif target == "phone":
                for raw in _split(value):
                    phone = normalise_phone(raw, self.config.region)
                    parsed.contacts.append(("phone", phone.value[:320], phone.raw[:320], phone.valid))
            elif target == "email":
                for raw in _split(value):
                    email = normalise_email(raw)
                    if email is None:
                        parsed.errors.append((header, f"{raw[:80]!r} is not a valid e-mail address"))
                    else:
                        parsed.contacts.append(("email", email, raw, True))
            elif target == "wechat_openid":
                for raw in _split(value):
                    if len(raw) > 128 or not raw.replace("-", "").replace("_", "").isalnum() or not raw.isascii():
                        parsed.errors.append((header, "is not a WeChat OpenID"))
                    else:
                        parsed.contacts.append(("wechat", raw, raw, True))
            elif target == "external_id":
                if len(value) > 120 or _CONTROL.search(value):
                    parsed.errors.append((header, "must be at most 120 printable characters"))
                else:
                    parsed.contacts.append(("external", value, value, True))
            elif target == "tags":
                tags = [t for t in (p.strip() for p in value.replace(",", ";").split(";")) if t]
                if any(len(t) > 60 for t in tags) or len(tags) > self.settings.customer_tags_max:
                    parsed.errors.append((header, f"at most {self.settings.customer_tags_max} tags of 60 characters"))
                else:
                    parsed.tags = list(dict.fromkeys([*parsed.tags, *tags]))
            elif target == "team":
                team = self.teams.get(value) or self.teams.get(value.lower())
                if team is None:
                    parsed.errors.append((header, f"{value[:80]!r} is not a team of this tenant"))
                else:
                    parsed.team_id = team
            elif target.startswith("custom."):
                custom[target.removeprefix("custom.")] = value
        if custom:
            accepted, problems = check_values(
                self.config.rules, custom, text_limit=self.settings.customer_text_field_max, from_text=True
            )
            parsed.custom = {k: v for k, v in accepted.items() if v is not None}
            parsed.errors += problems
        seen: set[tuple[str, str]] = set()
        unique = []
        for contact in parsed.contacts:
            if (contact[0], contact[1]) not in seen:
                seen.add((contact[0], contact[1]))
                unique.append(contact)
        parsed.contacts = unique
        if sum(1 for c in unique if c[0] == "phone") > self.settings.customer_phones_max:
            parsed.errors.append(("phone", f"at most {self.settings.customer_phones_max} numbers"))
        return parsed


@dataclass(slots=True)
class BatchResult:
    """What one batch did."""

    created: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    errors: list[tuple[int, int, str, str]] = field(default_factory=list)


_INSERT_CUSTOMERS = text(
    """
    INSERT INTO customers (tenant_id, id, name, team_id, tags, custom, version, created_at, updated_at)
    SELECT :tenant, u.id, u.name, u.team_id,
           ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb))::varchar[], u.custom::jsonb, 1, :now, :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:names AS text[]), CAST(:teams AS uuid[]), CAST(:tags AS text[]),
                CAST(:customs AS text[])) AS u(id, name, team_id, tags, custom)
    """
)
_INSERT_IDENTITIES = text(
    """
    INSERT INTO customer_identities (tenant_id, id, customer_id, kind, value, raw, valid, position, created_at)
    SELECT :tenant, u.id, u.customer_id, u.kind, u.value, u.raw, u.valid, u.position, :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:customers AS uuid[]), CAST(:kinds AS text[]), CAST(:values AS text[]),
                CAST(:raws AS text[]), CAST(:valids AS boolean[]), CAST(:positions AS smallint[]))
         AS u(id, customer_id, kind, value, raw, valid, position)
    """
)
_UPDATE_CUSTOMERS = text(
    """
    UPDATE customers c
    SET name = u.name, tags = ARRAY(SELECT jsonb_array_elements_text(u.tags::jsonb))::varchar[],
        custom = u.custom::jsonb, team_id = u.team_id, version = c.version + 1, updated_at = :now
    FROM unnest(CAST(:ids AS uuid[]), CAST(:names AS text[]), CAST(:tags AS text[]), CAST(:customs AS text[]),
                CAST(:teams AS uuid[])) AS u(id, name, tags, custom, team_id)
    WHERE c.id = u.id
    """
)
_INSERT_MARKS = text(
    """
    INSERT INTO customer_import_rows (tenant_id, import_id, customer_id, row)
    SELECT :tenant, :import_id, u.customer_id, u.row
    FROM unnest(CAST(:customers AS uuid[]), CAST(:rows AS integer[])) AS u(customer_id, row)
    """
)


class ImportRunner:
    """Runs one import: reads the stored file, writes batches, keeps the progress current."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, import_id: uuid.UUID
    ) -> None:
        self.sessionmaker = sessionmaker
        self.tenant_id = tenant_id
        self.import_id = import_id
        self.settings = get_settings()

    async def run(self) -> dict[str, Any]:
        """Import the file; returns the final counts."""
        async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
            job = await _import(session, self.import_id, lock=True)
            if job.status not in ("queued", "running"):
                return {"status": job.status}
            job.status = "running"
            job.started_at = job.started_at or utcnow()
            job.attempts += 1
            forget_config(self.tenant_id)
            config = await store_config(session, self.tenant_id)
            teams_page, _ = await tenants_service.list_teams(
                session, PageRequest(limit=100_000, cursor=None, sort=None)
            )
            teams: dict[str, uuid.UUID] = {}
            for team in teams_page:
                teams[team.name] = team.id
                teams[team.name.lower()] = team.id
                teams[str(team.id)] = team.id
            resume = job.rows_done
            options = (
                job.mode,
                list(job.match_on),
                dict(job.mapping),
                job.detected_encoding or "utf-8",
                job.chunks,
                job.team_id,
            )
        mode, match_on, mapping, encoding, chunks, default_team = options
        try:
            await self._read(config, teams, mode, match_on, mapping, encoding, chunks, default_team, resume)
        except Exception as exc:
            log.exception("customer_import_failed", import_id=str(self.import_id))
            async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
                job = await _import(session, self.import_id, lock=True)
                job.failure = f"The import stopped after {job.rows_done} rows: {type(exc).__name__}"
                if job.attempts >= self.settings.customer_import_attempts:
                    job.status = "failed"
                    job.finished_at = utcnow()
                else:
                    job.status = "queued"  # the queue's retry, or the workers' sweep, resumes it
            raise
        return await self._finish()

    async def _chunks(self, chunks: int) -> AsyncIterator[tuple[bytes, int]]:
        for seq in range(chunks):
            async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
                data = await session.scalar(
                    select(CustomerImportChunk.data).where(
                        CustomerImportChunk.import_id == self.import_id, CustomerImportChunk.seq == seq
                    )
                )
            if data is None:
                raise RuntimeError(f"chunk {seq} of import {self.import_id} is missing")
            yield data, len(data)

    async def _read(
        self,
        config: StoreConfig,
        teams: dict[str, uuid.UUID],
        mode: str,
        match_on: list[str],
        mapping: dict[str, str],
        encoding: str,
        chunks: int,
        default_team: uuid.UUID | None,
        resume: int,
    ) -> None:
        decoder = codecs.getincrementaldecoder("utf-8-sig" if encoding == "utf-8" else encoding)("strict")
        splitter = RecordSplitter(self.settings.customer_import_max_row_chars)
        reader: RowReader | None = None
        batch: list[ParsedRow] = []
        row_number = 0
        bytes_read = 0
        limit = self.settings.customer_import_max_rows

        def records_of(text: str, final: bool) -> Iterator[Record]:
            yield from splitter.feed(text)
            if final:
                yield from splitter.finish()

        writing: asyncio.Task[None] | None = None

        async def flush() -> None:
            # Batches are written one after another (the next one's de-duplication must see this one), but the
            # next batch is parsed while this one is written: PostgreSQL works on its core while Python parses.
            nonlocal writing, batch
            if writing is not None:
                await writing
            writing = asyncio.create_task(self._write(batch, mode, match_on, bytes_read))
            batch = []

        async def handle(records: Iterator[Record]) -> None:
            nonlocal reader, row_number, batch
            for record in records:
                if reader is None:
                    headers = next(csv.reader([record.text]), [])
                    if headers:
                        headers[0] = headers[0].lstrip("\ufeff")
                    reader = RowReader(headers, mapping, config, teams, self.settings)
                    continue
                if record.oversize:
                    row_number += 1
                    if row_number > resume:
                        batch.append(
                            ParsedRow(
                                row_number,
                                record.line,
                                errors=[
                                    ("row", f"is longer than {self.settings.customer_import_max_row_chars} characters")
                                ],
                            )
                        )
                else:
                    try:
                        cells = next(csv.reader([record.text]), [])
                    except csv.Error as exc:
                        cells = None
                        problem = str(exc)
                    if cells is not None and not any(c.strip() for c in cells):
                        continue  # blank lines are not rows
                    row_number += 1
                    if row_number <= resume:
                        continue
                    if row_number > limit:
                        batch.append(
                            ParsedRow(
                                row_number, record.line, errors=[("row", f"is beyond the import limit of {limit} rows")]
                            )
                        )
                    elif cells is None:
                        batch.append(
                            ParsedRow(row_number, record.line, errors=[("row", f"is not valid CSV ({problem})")])
                        )
                    else:
                        parsed = reader.parse(row_number, record.line, cells)
                        if parsed.team_id is None:
                            parsed.team_id = default_team
                        batch.append(parsed)
                if len(batch) >= self.settings.customer_import_batch_rows:
                    await flush()
                elif len(batch) % YIELD_EVERY_ROWS == 0:
                    await asyncio.sleep(0)  # let the write in flight send its next statement

        async for data, size in self._chunks(chunks):
            bytes_read += size
            await handle(records_of(decoder.decode(data), final=False))
        await handle(records_of(decoder.decode(b"", final=True), final=True))
        if batch:
            await flush()
        if writing is not None:
            await writing
        elif row_number <= resume:
            async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
                job = await _import(session, self.import_id, lock=True)
                job.bytes_done = bytes_read

    async def _write(self, batch: list[ParsedRow], mode: str, match_on: list[str], bytes_read: int) -> None:
        for attempt in range(3):
            try:
                async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
                    result = await self._apply(session, batch, mode, match_on)
                    job = await _import(session, self.import_id, lock=True)
                    job.rows_done = batch[-1].row
                    job.bytes_done = bytes_read
                    job.created += result.created
                    job.updated += result.updated
                    job.unchanged += result.unchanged
                    job.skipped += result.skipped
                    job.errors += len({e[0] for e in result.errors})
                    if result.errors:
                        positions: dict[int, int] = {}
                        rows = []
                        for row, line, field_name, message in result.errors:
                            position = positions.get(row, 0)
                            positions[row] = position + 1
                            rows.append(
                                {
                                    "tenant_id": self.tenant_id,
                                    "import_id": self.import_id,
                                    "row": row,
                                    "position": position,
                                    "line": line,
                                    "field": field_name[:80],
                                    "message": message[:500],
                                }
                            )
                        await session.execute(insert(CustomerImportError), rows)
                return
            except IntegrityError:
                # Someone created a matching customer meanwhile: resolve the batch again, it now matches.
                if attempt == 2:
                    raise
                log.warning("customer_import_batch_retry", import_id=str(self.import_id))

    async def _apply(
        self, session: AsyncSession, batch: list[ParsedRow], mode: str, match_on: list[str]
    ) -> BatchResult:
        result = BatchResult()
        usable = []
        for parsed in batch:
            if not parsed.errors and not parsed.keys(match_on):
                parsed.errors.append(
                    ("row", f"has no {', '.join(m.replace('_', ' ') for m in match_on)} to match it on")
                )
            if parsed.errors:
                result.errors += [(parsed.row, parsed.line, f, m) for f, m in parsed.errors]
            else:
                usable.append(parsed)
        keys = list({key for parsed in usable for key in parsed.keys(match_on)})
        existing: dict[tuple[str, str], set[uuid.UUID]] = {}
        if keys:
            by_kind: dict[str, list[str]] = {}
            for kind, value in keys:
                by_kind.setdefault(kind, []).append(value)
            # One `value = ANY(...)` per kind: each is a probe of the (tenant, kind, value) index, where a
            # row-value IN list would be compared against every row.
            found = await session.execute(
                select(CustomerIdentity.kind, CustomerIdentity.value, CustomerIdentity.customer_id).where(
                    or_(
                        *(
                            and_(CustomerIdentity.kind == kind, CustomerIdentity.value == any_(values_array(values)))
                            for kind, values in by_kind.items()
                        )
                    )
                )
            )
            for kind, value, customer_id in found.all():
                existing.setdefault((kind, value), set()).add(customer_id)
        matched_ids = {i for ids in existing.values() for i in ids}
        touched: dict[uuid.UUID, int] = {}
        if matched_ids:
            for customer_id, row in (
                await session.execute(
                    select(CustomerImportRow.customer_id, CustomerImportRow.row).where(
                        CustomerImportRow.import_id == self.import_id,
                        CustomerImportRow.customer_id.in_(list(matched_ids)),
                    )
                )
            ).all():
                touched[customer_id] = row
        fresh: dict[tuple[str, str], uuid.UUID] = {}
        creates: list[tuple[uuid.UUID, ParsedRow]] = []
        updates: dict[uuid.UUID, ParsedRow] = {}
        marks: list[dict[str, Any]] = []
        new_ids = iter(time_ordered_uuids(len(usable)))
        for parsed in usable:
            ids: set[uuid.UUID] = set()
            for key in parsed.keys(match_on):
                ids |= existing.get(key, set())
                if key in fresh:
                    ids.add(fresh[key])
            if len(ids) > 1:
                result.errors.append(
                    (
                        parsed.row,
                        parsed.line,
                        "row",
                        f"matches {len(ids)} different customers; split or merge them first",
                    )
                )
                continue
            if ids:
                customer_id = next(iter(ids))
                if customer_id in touched:
                    result.errors.append(
                        (
                            parsed.row,
                            parsed.line,
                            "row",
                            f"duplicates row {touched[customer_id]} (same {'/'.join(match_on)})",
                        )
                    )
                    continue
                touched[customer_id] = parsed.row
                marks.append(
                    {
                        "tenant_id": self.tenant_id,
                        "import_id": self.import_id,
                        "customer_id": customer_id,
                        "row": parsed.row,
                    }
                )
                if customer_id in {c for c, _ in creates}:
                    continue  # unreachable: fresh ids are in `touched`
                if mode == "skip":
                    result.skipped += 1
                else:
                    updates[customer_id] = parsed
                continue
            if not parsed.name:
                result.errors.append((parsed.row, parsed.line, "name", "is required for a new customer"))
                continue
            customer_id = next(new_ids)
            for key in parsed.keys(match_on):
                fresh[key] = customer_id
            touched[customer_id] = parsed.row
            creates.append((customer_id, parsed))
            marks.append(
                {
                    "tenant_id": self.tenant_id,
                    "import_id": self.import_id,
                    "customer_id": customer_id,
                    "row": parsed.row,
                }
            )
        now = utcnow()
        if creates:
            # One INSERT ... SELECT FROM unnest(arrays) per table: the server does a batch in one statement,
            # several times faster than a row-by-row executemany.
            await session.execute(
                _INSERT_CUSTOMERS,
                {
                    "tenant": self.tenant_id,
                    "now": now,
                    "ids": [customer_id for customer_id, _ in creates],
                    "names": [parsed.name for _, parsed in creates],
                    "teams": [parsed.team_id for _, parsed in creates],
                    "tags": [json.dumps(parsed.tags) for _, parsed in creates],
                    "customs": [json.dumps(parsed.custom) for _, parsed in creates],
                },
            )
            columns: dict[str, list[Any]] = {
                k: [] for k in ("customers", "kinds", "values", "raws", "valids", "positions")
            }
            for customer_id, parsed in creates:
                positions: dict[str, int] = {}
                for kind, value, raw, valid in parsed.contacts:
                    position = positions.get(kind, 0)
                    positions[kind] = position + 1
                    columns["customers"].append(customer_id)
                    columns["kinds"].append(kind)
                    columns["values"].append(value)
                    columns["raws"].append(raw)
                    columns["valids"].append(valid)
                    columns["positions"].append(position)
            if columns["customers"]:
                columns["ids"] = time_ordered_ids(len(columns["customers"]))
                await session.execute(_INSERT_IDENTITIES, {"tenant": self.tenant_id, "now": now, **columns})
            result.created += len(creates)
        if updates:
            result.updated, result.unchanged = await self._update(session, updates, now)
        if marks:
            await session.execute(
                _INSERT_MARKS,
                {
                    "tenant": self.tenant_id,
                    "import_id": self.import_id,
                    "customers": [m["customer_id"] for m in marks],
                    "rows": [m["row"] for m in marks],
                },
            )
        return result

    async def _update(self, session: AsyncSession, updates: dict[uuid.UUID, ParsedRow], now: Any) -> tuple[int, int]:
        """Merge rows into the records they matched; plain rows, not ORM objects (a batch is a thousand records)."""
        ids = list(updates)
        current = {
            row.id: row
            for row in (
                await session.execute(
                    select(Customer.id, Customer.name, Customer.tags, Customer.custom, Customer.team_id)
                    .where(Customer.id.in_(ids))
                    .with_for_update()
                )
            ).all()
        }
        held: dict[uuid.UUID, dict[str, list[str]]] = {i: {} for i in ids}
        for customer_id, kind, value in (
            await session.execute(
                select(CustomerIdentity.customer_id, CustomerIdentity.kind, CustomerIdentity.value).where(
                    CustomerIdentity.customer_id.in_(ids)
                )
            )
        ).all():
            held[customer_id].setdefault(kind, []).append(value)
        changes: dict[str, list[Any]] = {k: [] for k in ("ids", "names", "tags", "customs", "teams")}
        names = ("customers", "kinds", "values", "raws", "valids", "positions")
        fresh: dict[str, list[Any]] = {k: [] for k in names}
        unchanged = 0
        for customer_id, parsed in updates.items():
            row = current.get(customer_id)
            if row is None:
                continue
            name = parsed.name or row.name
            tags = list(dict.fromkeys([*row.tags, *parsed.tags]))
            custom = {**row.custom, **parsed.custom}
            team = row.team_id if row.team_id is not None else parsed.team_id
            added = False
            for kind, value, raw, valid in parsed.contacts:
                existing = held[customer_id].setdefault(kind, [])
                if value in existing:
                    continue
                fresh["customers"].append(customer_id)
                fresh["kinds"].append(kind)
                fresh["values"].append(value)
                fresh["raws"].append(raw)
                fresh["valids"].append(valid)
                fresh["positions"].append(len(existing))
                existing.append(value)
                added = True
            if not added and (name, tags, custom, team) == (row.name, list(row.tags), row.custom, row.team_id):
                unchanged += 1  # a re-run of the same file: no new version, no write
                continue
            changes["ids"].append(customer_id)
            changes["names"].append(name)
            changes["tags"].append(json.dumps(tags))
            changes["customs"].append(json.dumps(custom))
            changes["teams"].append(team)
        if changes["ids"]:
            await session.execute(_UPDATE_CUSTOMERS, {"now": now, **changes})
        if fresh["customers"]:
            fresh["ids"] = time_ordered_ids(len(fresh["customers"]))
            await session.execute(_INSERT_IDENTITIES, {"tenant": self.tenant_id, "now": now, **fresh})
        return len(changes["ids"]), unchanged

    async def _finish(self) -> dict[str, Any]:
        async with tenant_transaction(self.sessionmaker, self.tenant_id) as session:
            job = await _import(session, self.import_id, lock=True)
            job.status = "done"
            job.failure = None
            job.finished_at = utcnow()
            job.bytes_done = job.file_bytes
            counts = {
                "rows": job.rows_done,
                "created": job.created,
                "updated": job.updated,
                "unchanged": job.unchanged,
                "skipped": job.skipped,
                "errors": job.errors,
            }
            # The file and the de-duplication marks have served; the counts and the error report stay.
            await session.execute(delete(CustomerImportChunk).where(CustomerImportChunk.import_id == self.import_id))
            await session.execute(delete(CustomerImportRow).where(CustomerImportRow.import_id == self.import_id))
            await audit.record(
                session,
                tenant_id=self.tenant_id,
                actor_type=job.actor_type,
                actor_id=job.created_by,
                action="customers.import",
                target_type="customer_import",
                target_id=job.id,
                after={
                    **counts,
                    "file_name": job.file_name,
                    "file_sha256": job.file_sha256,
                    "mode": job.mode,
                    "match_on": list(job.match_on),
                },
            )
        log.info("customer_import_done", import_id=str(self.import_id), **counts)
        return counts


async def enqueue(queue: Any, tenant_id: uuid.UUID, import_id: uuid.UUID, settings: Settings) -> None:
    """Put an import's job on the queue; the job key is the import, so it is never queued twice at once."""
    await queue.enqueue(
        "import_customers",
        key=f"customer-import:{import_id}",
        timeout=settings.customer_import_job_timeout_seconds,
        retries=settings.customer_import_attempts,
        tenant_id=str(tenant_id),
        import_id=str(import_id),
    )


async def requeue_unfinished(sessionmaker: async_sessionmaker[AsyncSession], queue: Any) -> int:
    """Queue again every import that has its file but is not finished (its job was lost with Redis, or never
    queued); a job still on the queue is not duplicated (same key). Returns how many were handed over."""
    settings = get_settings()
    async with sessionmaker() as session:
        tenant_ids = await tenants_service.active_tenant_ids(session)
    handed = 0
    for tenant_id in tenant_ids:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            pending = list(
                (
                    await session.scalars(
                        select(CustomerImport.id).where(CustomerImport.status.in_(("queued", "running")))
                    )
                ).all()
            )
        for import_id in pending:
            if await queue.enqueue(
                "import_customers",
                key=f"customer-import:{import_id}",
                timeout=settings.customer_import_job_timeout_seconds,
                retries=settings.customer_import_attempts,
                tenant_id=str(tenant_id),
                import_id=str(import_id),
            ):
                handed += 1
    return handed


async def run_import(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, import_id: uuid.UUID
) -> dict[str, Any]:
    """The job: import one uploaded file (resuming after the last committed batch if it ran before)."""
    return await ImportRunner(sessionmaker, tenant_id, import_id).run()


async def error_report(
    sessionmaker: async_sessionmaker[AsyncSession], tenant_id: uuid.UUID, import_id: uuid.UUID, batch: int
) -> AsyncIterator[bytes]:
    """The import's refused rows as CSV (row, line, field, message), read a batch at a time."""
    yield b"row,line,field,message\r\n"
    last = (-1, -1)
    while True:
        async with tenant_transaction(sessionmaker, tenant_id) as session:
            rows = (
                await session.execute(
                    select(
                        CustomerImportError.row,
                        CustomerImportError.position,
                        CustomerImportError.line,
                        CustomerImportError.field,
                        CustomerImportError.message,
                    )
                    .where(
                        CustomerImportError.import_id == import_id,
                        tuple_(CustomerImportError.row, CustomerImportError.position) > last,
                    )
                    .order_by(CustomerImportError.row, CustomerImportError.position)
                    .limit(batch)
                )
            ).all()
        if not rows:
            return
        out = []
        for row, position, line, field_name, message in rows:
            out.append(_csv_line([str(row), str(line), field_name, message]))
            last = (row, position)
        yield "".join(out).encode()


def _csv_line(cells: Sequence[str]) -> str:
    from backend.customers.export import neutralise

    quoted = []
    for raw in cells:
        cell = neutralise(raw)
        if any(c in cell for c in ',"\r\n'):
            cell = '"' + cell.replace('"', '""') + '"'
        quoted.append(cell)
    return ",".join(quoted) + "\r\n"
