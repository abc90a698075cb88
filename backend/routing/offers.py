"""Offers written durably in batches: many concurrent offers share one PostgreSQL commit (group commit).

Offering is the hot path of routing: every match the matcher makes must be on the
interaction's timeline before the agent is told. One transaction per offer would
cap routing at the database's commit rate, so offers are collected while the
previous batch commits and written together: one statement for the batch, its own
transaction, in which `record_offers` (migration 0011) sets each tenant's context for
row-level security before writing that tenant's offers. Each
caller awaits the commit of the batch its offer is in, so nothing is announced
before it is durable, and an idle system writes each offer at once (no timer).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.db.base import utcnow
from backend.db.engine import driver_connection
from backend.routing.schemas import InteractionOut

log = structlog.get_logger("routing.offers")

# The batch as arrays, one row per (interaction, agent offered); record_offers (migration 0011) writes each
# tenant's part under that tenant's row-level security and returns the interactions it moved to `offered`.
_RECORD_OFFERS = "SELECT * FROM record_offers($1, $2, $3, $4, $5, $6, $7, $8)"


@dataclass(slots=True)
class _Pending:
    tenant_id: uuid.UUID
    interaction_id: uuid.UUID
    agents: tuple[uuid.UUID, ...]
    timeout_ms: int
    done: asyncio.Future[InteractionOut | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class OfferRecorder:
    """Records offers (interaction state and `offered` timeline events) in group-committed batches."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], max_batch: int = 1000) -> None:
        self._sessionmaker = sessionmaker
        self._max_batch = max_batch
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self.batches_written = 0
        """Commits made so far (each carries one or more offers)."""

    async def record(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agents: Sequence[uuid.UUID], timeout_ms: int
    ) -> InteractionOut | None:
        """Write the offer durably; returns the interaction as offered once its batch has committed, or None
        when it is no longer waiting (it ended meanwhile, or this tenant has no such interaction)."""
        pending = _Pending(tenant_id, interaction_id, tuple(agents), timeout_ms)
        self._pending.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_while_pending())
        return await pending.done

    async def _flush_while_pending(self) -> None:
        while self._pending:
            batch: list[_Pending] = []
            deferred: list[_Pending] = []
            seen: set[tuple[uuid.UUID, uuid.UUID]] = set()
            for pending in self._pending:
                key = (pending.tenant_id, pending.interaction_id)
                # The same interaction twice in a batch (offered, returned, offered again) goes in order.
                if key in seen or len(batch) >= self._max_batch:
                    deferred.append(pending)
                else:
                    seen.add(key)
                    batch.append(pending)
            self._pending = deferred
            try:
                written = await self._write(batch)
                self.batches_written += 1
            except Exception as exc:
                log.exception("offer_batch_failed", offers=len(batch))
                for pending in batch:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                continue
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_result(written.get((pending.tenant_id, pending.interaction_id)))

    async def _write(self, batch: list[_Pending]) -> dict[tuple[uuid.UUID, uuid.UUID], InteractionOut]:
        tenants: list[uuid.UUID] = []
        ids: list[uuid.UUID] = []
        agents: list[uuid.UUID] = []
        ks: list[int] = []
        ns: list[int] = []
        holders: list[uuid.UUID | None] = []
        timeouts: list[int] = []
        for offer in batch:
            holder = offer.agents[0] if len(offer.agents) == 1 else None
            for k, agent in enumerate(offer.agents, start=1):
                tenants.append(offer.tenant_id)
                ids.append(offer.interaction_id)
                agents.append(agent)
                ks.append(k)
                ns.append(len(offer.agents))
                holders.append(holder)
                timeouts.append(offer.timeout_ms)
        # One statement is its own transaction: no BEGIN and COMMIT round trips around it. The driver's own
        # connection skips SQLAlchemy's per-statement work, which cost more than the statement at saturation.
        async with driver_connection(self._sessionmaker.kw["bind"]) as driver:
            rows = await driver.fetch(_RECORD_OFFERS, tenants, ids, agents, ks, ns, holders, timeouts, utcnow())
        return {(row["tenant_id"], row["id"]): _out(row) for row in rows}


def _out(row: Any) -> InteractionOut:
    attributes = row["attributes"]
    return InteractionOut(
        id=row["id"],
        channel=row["channel"],
        queue_id=row["queue_id"],
        customer_ref=row["customer_ref"],
        priority=row["priority"],
        attributes=json.loads(attributes) if isinstance(attributes, str) else attributes,
        state=row["state"],
        agent_id=row["agent_id"],
        outcome=row["outcome"],
        created_at=row["created_at"],
        queued_at=row["queued_at"],
        connected_at=row["connected_at"],
        ended_at=row["ended_at"],
    )
