"""CDRs: one row per call leg, whichever way FreeSWITCH reported it, written before it is acknowledged.

Three sources report a leg's end, and a leg may arrive from several of them,
or several times from one: the CHANNEL_HANGUP_COMPLETE event on the inbound
event socket, mod_json_cdr's HTTP post (retried by FreeSWITCH until it gets a
2xx), and the files mod_json_cdr leaves in its err-log-dir when it gives up.
They all become the same `LegFacts`, and `record` stores them once per
(tenant, leg UUID): the first report creates the row, later ones only fill in
what it lacked. A leg closed by us because its node was lost (`node_failure`)
gives way to FreeSWITCH's own report if one comes after all.

After the row is committed, listeners hear about it: the interaction
timeline (through the routing engine) now, billing later. A listener's failure
never loses the CDR; every listener must be idempotent because a repeated
report calls them again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec
import structlog
from sqlalchemy import literal_column, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.channels.voice import numbers
from backend.channels.voice.legs import Event, LegError, LegFacts, e164, leg_from_event, leg_from_json_cdr
from backend.channels.voice.models import CallLeg, SwitchNode, UnattributedLeg
from backend.channels.voice.schemas import CdrOut
from backend.db.engine import driver_connection, session_driver
from backend.db.tenancy import set_tenant
from backend.lib.pagination import PageRequest, paginate
from backend.routing.engine import RoutingEngine
from backend.tenants import service as tenants

log = structlog.get_logger("voice.cdrs")

Source = Literal["event", "json_cdr", "err_log", "node_failure"]
Outcome = Literal["created", "merged", "duplicate", "unattributed"]
REAL_SOURCES = frozenset({"event", "json_cdr", "err_log"})
_MERGED_SOURCES = "ARRAY(SELECT DISTINCT s FROM unnest(unattributed_cdrs.sources || excluded.sources) AS s ORDER BY s)"
MAX_CDR_FILE_BYTES = 4 * 1024 * 1024


class CdrListener(Protocol):
    """Told about every CDR once it is durable (the interaction timeline; billing's rating later)."""

    async def leg_recorded(self, tenant_id: uuid.UUID, cdr_id: uuid.UUID, leg: LegFacts, outcome: Outcome) -> None:
        """React to a stored leg; must be idempotent (a repeated report calls it again with `duplicate`)."""
        ...


@dataclass(frozen=True, slots=True)
class Recorded:
    """What became of a reported leg."""

    outcome: Outcome
    leg_uuid: uuid.UUID
    tenant_id: uuid.UUID | None
    cdr_id: uuid.UUID | None


async def attribute(session: AsyncSession, leg: LegFacts) -> tuple[uuid.UUID | None, str]:
    """The tenant a leg belongs to: our variables first, then its SIP domains, then (inbound) the number dialled."""
    if leg.tenant_hint is not None and await tenants.find_tenant(session, leg.tenant_hint) is not None:
        return leg.tenant_hint, "variable"
    for domain in leg.domains:
        tenant = await tenants.find_tenant_by_sip_domain(session, domain)
        if tenant is not None:
            return tenant.id, "domain"
    if leg.direction == "inbound":
        did = leg.did or e164(leg.destination_number)
        number = await numbers.number_for_did(session, did) if did else None
        if number is not None and number.tenant_id is not None:
            return number.tenant_id, "number"
    return None, "no tenant variable, known SIP domain or assigned number"


def _columns(leg: LegFacts) -> dict[str, Any]:
    assert leg.ended_at is not None
    return {
        "call_uuid": leg.call_uuid,
        "node_name": leg.node_name,
        "direction": leg.direction,
        "caller_number": leg.caller_number,
        "caller_name": leg.caller_name,
        "destination_number": leg.destination_number,
        "did": leg.did,
        "queue_id": leg.queue_id,
        "agent_id": leg.agent_id,
        "interaction_id": leg.interaction_id,
        "started_at": leg.started_at,
        "ringing_at": leg.ringing_at,
        "answered_at": leg.answered_at,
        "bridged_at": leg.bridged_at,
        "ended_at": leg.ended_at,
        "duration_ms": leg.duration_ms,
        "billable_ms": leg.billable_ms,
        "hangup_cause": leg.hangup_cause,
        "hangup_cause_q850": leg.hangup_cause_q850,
        "disposition": leg.disposition,
        "details": {**leg.details, **({"core_uuid": leg.core_uuid} if leg.core_uuid else {})},
    }


_JSON = msgspec.json.Encoder()
_RECORD_LEG = "SELECT * FROM record_cdr_leg($1, $2, $3::jsonb)"


async def _record_leg(
    driver: Any, tenant_id: uuid.UUID, leg: LegFacts, source: Source, node_id: uuid.UUID | None
) -> tuple[Outcome, uuid.UUID]:
    """Store a report of a leg, or fold it into the leg's row, in one statement (`record_cdr_leg`, migration 0024,
    which holds the merge rules). `driver` is a pooled asyncpg connection (the statement is its own transaction)
    or a batch's transaction's (`session_driver`)."""
    row = {"id": uuid.uuid4(), "leg_uuid": leg.leg_uuid, "node_id": node_id, **_columns(leg)}
    found = await driver.fetchrow(_RECORD_LEG, tenant_id, source, _JSON.encode(row).decode())
    return found["r_outcome"], found["r_id"]


@dataclass(slots=True)
class _PendingLeg:
    leg: LegFacts
    source: Source
    node_id: uuid.UUID | None
    done: asyncio.Future[tuple[Recorded, LegFacts]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


KNOWN_TENANT_SECONDS = 60.0
"""A tenant id a CDR's `cc_tenant_id` named and the database confirmed is trusted this long without asking."""


class CdrRecorder:
    """Stores legs idempotently and tells the listeners."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        listeners: Sequence[CdrListener] = (),
        *,
        max_batch: int = 500,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.listeners = list(listeners)
        self._known_tenants: dict[uuid.UUID, float] = {}
        self._node_ids: dict[str, tuple[uuid.UUID, float]] = {}
        self._max_batch = max_batch
        self._pending: list[_PendingLeg] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches_written = 0
        """Commits made so far (each carries one or more legs)."""

    async def _attribute(self, session: AsyncSession, leg: LegFacts) -> tuple[uuid.UUID | None, str]:
        known = self._known_tenant(leg)
        if known is not None:
            return known, "variable"
        tenant_id, how = await attribute(session, leg)
        if tenant_id is not None and how == "variable":
            if len(self._known_tenants) > 10_000:
                self._known_tenants.clear()
            self._known_tenants[tenant_id] = time.monotonic() + KNOWN_TENANT_SECONDS
        return tenant_id, how

    async def record(self, leg: LegFacts, source: Source, node_id: uuid.UUID | None = None) -> Recorded:
        """Store the leg (once per leg UUID) and commit; then notify the listeners.

        Legs reported while a commit is under way are written together by the next one (group commit: one
        transaction, one multi-row INSERT per tenant), so a node's hang-ups do not queue behind one commit
        each; every caller still returns only once its own leg is durable, and an idle system writes a leg
        at once.
        """
        if leg.ended_at is None:
            raise LegError("the leg has no end time")
        pending = _PendingLeg(leg, source, node_id)
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_while_pending(), name="cdr-group-commit")
        result, leg = await pending.done
        tenant_id = result.tenant_id
        log.info(
            "cdr_recorded",
            leg=str(leg.leg_uuid),
            outcome=result.outcome,
            source=source,
            tenant_id=str(tenant_id) if tenant_id else None,
            disposition=leg.disposition,
            node=leg.node_name,
        )
        if result.tenant_id is not None and result.cdr_id is not None:
            for listener in self.listeners:
                try:
                    await listener.leg_recorded(result.tenant_id, result.cdr_id, leg, result.outcome)
                except Exception:
                    log.exception("cdr_listener_failed", leg=str(leg.leg_uuid), listener=type(listener).__name__)
        return result

    async def _flush_while_pending(self) -> None:
        while self._pending:
            batch: list[_PendingLeg] = []
            deferred: list[_PendingLeg] = []
            seen: set[uuid.UUID] = set()
            for pending in self._pending:
                # Two reports of one leg in a batch go one after the other: the second merges into the first.
                if pending.leg.leg_uuid in seen or len(batch) >= self._max_batch:
                    deferred.append(pending)
                else:
                    seen.add(pending.leg.leg_uuid)
                    batch.append(pending)
            self._pending = deferred
            await self._write_halving(batch)

    async def _write_halving(self, batch: list[_PendingLeg]) -> None:
        """Write the batch; if the database refuses it, write each half on its own, so one bad leg fails
        alone and the others still share commits."""
        try:
            results = await self._write(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._failed(batch[0], exc)
                return
            log.warning("cdr_batch_failed", legs=len(batch), error=str(exc) or type(exc).__name__)
            middle = len(batch) // 2
            await self._write_halving(batch[:middle])
            await self._write_halving(batch[middle:])
            return
        self.batches_written += 1
        for pending, result in zip(batch, results, strict=True):
            if not pending.done.done():
                pending.done.set_result(result)

    @staticmethod
    def _failed(pending: _PendingLeg, exc: Exception) -> None:
        log.error("cdr_write_failed", leg=str(pending.leg.leg_uuid), error=str(exc) or type(exc).__name__)
        if not pending.done.done():
            pending.done.set_exception(exc)

    def _known_tenant(self, leg: LegFacts) -> uuid.UUID | None:
        hint = leg.tenant_hint
        return hint if hint is not None and time.monotonic() < self._known_tenants.get(hint, 0.0) else None

    def _known_node(self, pending: _PendingLeg) -> uuid.UUID | None:
        if pending.node_id is not None or not pending.leg.node_name:
            return pending.node_id
        node_id, until = self._node_ids.get(pending.leg.node_name, (None, 0.0))
        return node_id if time.monotonic() < until else None

    async def _write(self, batch: list[_PendingLeg]) -> list[tuple[Recorded, LegFacts]]:
        if len(batch) == 1:
            # Alone, with its tenant and node known: one statement, its own transaction (nothing to group with).
            pending = batch[0]
            tenant_id = self._known_tenant(pending.leg)
            node_id = self._known_node(pending)
            if tenant_id is not None and (node_id is not None or not pending.leg.node_name):
                async with driver_connection(self.sessionmaker.kw["bind"]) as driver:
                    outcome, cdr_id = await _record_leg(driver, tenant_id, pending.leg, pending.source, node_id)
                return [(Recorded(outcome, pending.leg.leg_uuid, tenant_id, cdr_id), pending.leg)]
        results: list[tuple[Recorded, LegFacts] | None] = [None] * len(batch)
        async with self.sessionmaker() as session, session.begin():
            names = {p.leg.node_name for p in batch if p.node_id is None and p.leg.node_name}
            node_ids: dict[str, uuid.UUID] = {}
            if names:
                found = await session.execute(select(SwitchNode.name, SwitchNode.id).where(SwitchNode.name.in_(names)))
                node_ids = dict(found.all())
                if len(self._node_ids) > 10_000:
                    self._node_ids.clear()
                until = time.monotonic() + KNOWN_TENANT_SECONDS
                self._node_ids.update({name: (node_id, until) for name, node_id in node_ids.items()})
            # Every leg's tenant first: the lookups read global tables, before any tenant context is set.
            by_tenant: dict[uuid.UUID, list[tuple[int, LegFacts, uuid.UUID | None]]] = {}
            for index, pending in enumerate(batch):
                leg = pending.leg
                node_id = pending.node_id or node_ids.get(leg.node_name or "")
                tenant_id, how = await self._attribute(session, leg)
                if tenant_id is None:
                    await self._unattributed(session, leg, pending.source, how)
                    results[index] = (Recorded("unattributed", leg.leg_uuid, None, None), leg)
                    continue
                if leg.did is None and how == "number":
                    leg = _with_did(leg)
                by_tenant.setdefault(tenant_id, []).append((index, leg, node_id))
            # Every writer (the holders from hang-up events, the API from mod_json_cdr) takes a batch's tenants and
            # legs in the same order, so two batches sharing legs wait on each other and never deadlock.
            for tenant_id, legs in sorted(by_tenant.items()):
                legs.sort(key=lambda entry: entry[1].leg_uuid)
                await set_tenant(session, tenant_id)  # the transaction begins here if no lookup began it
                driver = await session_driver(session)
                for index, leg, node_id in legs:
                    outcome, cdr_id = await _record_leg(driver, tenant_id, leg, batch[index].source, node_id)
                    results[index] = (Recorded(outcome, leg.leg_uuid, tenant_id, cdr_id), leg)
        return [result for result in results if result is not None]

    async def record_event(self, event: Event, node_id: uuid.UUID | None = None) -> Recorded:
        """A CHANNEL_HANGUP_COMPLETE event from a node's inbound event socket."""
        return await self.record(leg_from_event(event), "event", node_id)

    async def record_json_cdr(self, document: Mapping[str, Any], source: Source = "json_cdr") -> Recorded:
        """A mod_json_cdr document, posted or read from its err-log-dir."""
        return await self.record(leg_from_json_cdr(document), source)

    @staticmethod
    async def _unattributed(session: AsyncSession, leg: LegFacts, source: Source, reason: str) -> None:
        log.warning("cdr_unattributed", leg=str(leg.leg_uuid), node=leg.node_name, reason=reason, source=source)
        await session.execute(
            insert(UnattributedLeg)
            .values(
                id=uuid.uuid4(),
                leg_uuid=leg.leg_uuid,
                node_name=leg.node_name,
                reason=reason[:120],
                sources=[source],
                leg=leg.to_json(),
            )
            .on_conflict_do_update(
                index_elements=["leg_uuid"],
                set_={"sources": literal_column(_MERGED_SOURCES)},
            )
        )


def _with_did(leg: LegFacts) -> LegFacts:
    return replace(leg, did=e164(leg.destination_number))


class InteractionTimeline:
    """Ends a call's interaction when its caller leg ends (hang-up, or its node lost), through the routing engine."""

    def __init__(self, routing: RoutingEngine) -> None:
        self.routing = routing

    async def leg_recorded(self, tenant_id: uuid.UUID, cdr_id: uuid.UUID, leg: LegFacts, outcome: Outcome) -> None:
        """The caller's leg ended: the interaction ends too (idempotent; an ended interaction is left alone)."""
        if leg.interaction_id is None or not leg.is_caller_leg:
            return
        await self.routing.end_from_channel(
            tenant_id,
            leg.interaction_id,
            outcome="node_failure" if leg.lost else None,
            at=leg.ended_at,
            leg_uuid=str(leg.leg_uuid),
            hangup_cause=leg.hangup_cause,
            disposition=leg.disposition,
            billable_ms=leg.billable_ms,
        )


# --- reading CDRs ---------------------------------------------------------------------------------


def cdr_out(row: CallLeg) -> CdrOut:
    """The API's view of a CDR."""
    return CdrOut(
        id=row.id,
        leg_uuid=row.leg_uuid,
        call_uuid=row.call_uuid,
        direction=row.direction,
        caller_number=row.caller_number,
        caller_name=row.caller_name,
        destination_number=row.destination_number,
        did=row.did,
        queue_id=row.queue_id,
        agent_id=row.agent_id,
        interaction_id=row.interaction_id,
        node_name=row.node_name,
        started_at=row.started_at,
        ringing_at=row.ringing_at,
        answered_at=row.answered_at,
        bridged_at=row.bridged_at,
        ended_at=row.ended_at,
        duration_ms=row.duration_ms,
        billable_ms=row.billable_ms,
        hangup_cause=row.hangup_cause,
        disposition=row.disposition,
        sources=list(row.sources),
    )


async def list_cdrs(
    session: AsyncSession,
    page: PageRequest,
    *,
    interaction_id: uuid.UUID | None = None,
    call_uuid: uuid.UUID | None = None,
    disposition: str | None = None,
) -> tuple[list[CdrOut], str | None]:
    """The tenant's CDRs (row-level security scopes them), newest first by default."""
    statement = select(CallLeg)
    if interaction_id is not None:
        statement = statement.where(CallLeg.interaction_id == interaction_id)
    if call_uuid is not None:
        statement = statement.where(CallLeg.call_uuid == call_uuid)
    if disposition is not None:
        statement = statement.where(CallLeg.disposition == disposition)
    rows, cursor = await paginate(
        session,
        statement,
        page,
        sortable={"ended_at": CallLeg.ended_at},
        default_sort="-ended_at",
        id_column=CallLeg.id,
    )
    return [cdr_out(r) for r in rows], cursor


# --- mod_json_cdr's err-log-dir --------------------------------------------------------------------


def parse_cdr_body(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    """A mod_json_cdr body: JSON (`encode=false`), or a form with `cdr=<urlencoded JSON>` (`encode=true`)."""
    from urllib.parse import parse_qs

    raw = body
    if content_type.startswith("application/x-www-form-urlencoded"):
        values = parse_qs(body.decode("ascii", errors="strict"), max_num_fields=10).get("cdr")
        if not values:
            raise LegError("the form carries no `cdr` field")
        raw = values[0].encode()
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LegError(f"the CDR is not JSON ({exc.__class__.__name__})") from exc
    if not isinstance(document, dict):
        raise LegError("the CDR is not a JSON object")
    return document


@dataclass
class ImportReport:
    """What an err-log-dir import did."""

    imported: int = 0
    duplicates: int = 0
    unattributed: int = 0
    rejected: int = 0
    failed: int = 0


REJECTED_DIR = ".rejected"


def _cdr_files(directory: Path) -> list[Path]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in sorted(files) if name.endswith(".cdr.json")]
    return found


def _read(path: Path) -> bytes:
    if path.stat().st_size > MAX_CDR_FILE_BYTES:
        raise LegError("the file is larger than any CDR")
    return path.read_bytes()


def _reject(path: Path) -> None:
    rejected = path.parent / REJECTED_DIR
    rejected.mkdir(exist_ok=True)
    shutil.move(str(path), str(rejected / path.name))


def _done(path: Path, done_directory: Path | None) -> None:
    if done_directory is None:
        path.unlink()
        return
    done_directory.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(done_directory / path.name))


async def import_cdr_directory(
    recorder: CdrRecorder, directory: Path, done_directory: Path | None = None
) -> ImportReport:
    """Import every `*.cdr.json` mod_json_cdr left in its err-log-dir (and its dated subfolders).

    Each file is stored (idempotently: a leg already known is a duplicate, not a second row) and
    only then moved to `done_directory`, or deleted when there is none. A file that is not a CDR
    goes to `.rejected/` beside it; a file whose import failed (database down) stays for next time.
    """
    report = ImportReport()
    for path in await asyncio.to_thread(_cdr_files, directory):
        try:
            document = parse_cdr_body(await asyncio.to_thread(_read, path))
            result = await recorder.record_json_cdr(document, source="err_log")
        except LegError as exc:
            log.warning("cdr_file_rejected", path=str(path), error=str(exc))
            await asyncio.to_thread(_reject, path)
            report.rejected += 1
            continue
        except Exception:
            log.exception("cdr_file_import_failed", path=str(path))
            report.failed += 1
            continue
        if result.outcome == "duplicate":
            report.duplicates += 1
        elif result.outcome == "unattributed":
            report.unattributed += 1
        else:
            report.imported += 1
        await asyncio.to_thread(_done, path, done_directory)
    if report.imported or report.rejected or report.failed or report.duplicates or report.unattributed:
        log.info("cdr_directory_imported", directory=str(directory), **vars(report))
    return report
