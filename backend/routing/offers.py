"""Offers written durably in batches: many concurrent offers share one PostgreSQL commit (group commit).

Offering is the hot path of routing: every match the matcher makes must be on the
interaction's timeline before the agent is told. One transaction per offer would
cap routing at the database's commit rate, so offers are collected while the
previous batch commits and written together: one statement per tenant (with the
tenant context set for row-level security) and one commit for the batch. Each
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
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.db.base import utcnow
from backend.db.tenancy import set_tenant
from backend.routing.schemas import InteractionOut

log = structlog.get_logger("routing.offers")

# One row of input per (interaction, agent offered); the interaction row moves to `offered` once and its
# timeline gets one `offered` event per agent (several for a ring-all call), numbered after its last event.
_RECORD_OFFERS = text(
    """
WITH input AS (
  SELECT * FROM unnest(
    CAST(:ids AS uuid[]), CAST(:agents AS uuid[]), CAST(:ks AS int[]), CAST(:ns AS int[]),
    CAST(:holders AS uuid[]), CAST(:timeouts AS int[])
  ) AS x(id, agent, k, n, holder, timeout_ms)
),
moved AS (
  UPDATE interactions AS i
  SET state = 'offered', agent_id = x.holder, last_seq = i.last_seq + x.n
  FROM (SELECT DISTINCT id, n, holder FROM input) AS x
  WHERE i.tenant_id = CAST(:tenant AS uuid) AND i.id = x.id AND i.state IN ('queued', 'offered')
  RETURNING i.*
),
written AS (
  INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
  SELECT CAST(:tenant AS uuid), x.id, m.last_seq - x.n + x.k, 'offered', :at, x.agent,
         jsonb_build_object('timeout_ms', x.timeout_ms)
  FROM input AS x JOIN moved AS m ON m.id = x.id
)
SELECT * FROM moved
"""
)


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
        by_tenant: dict[uuid.UUID, list[_Pending]] = {}
        for pending in batch:
            by_tenant.setdefault(pending.tenant_id, []).append(pending)
        written: dict[tuple[uuid.UUID, uuid.UUID], InteractionOut] = {}
        at = utcnow()
        async with self._sessionmaker() as session, session.begin():
            for tenant_id, offers in by_tenant.items():
                await set_tenant(session, tenant_id)
                params: dict[str, Any] = {
                    "tenant": str(tenant_id),
                    "at": at,
                    "ids": [],
                    "agents": [],
                    "ks": [],
                    "ns": [],
                    "holders": [],
                    "timeouts": [],
                }
                for offer in offers:
                    holder = str(offer.agents[0]) if len(offer.agents) == 1 else None
                    for k, agent in enumerate(offer.agents, start=1):
                        params["ids"].append(str(offer.interaction_id))
                        params["agents"].append(str(agent))
                        params["ks"].append(k)
                        params["ns"].append(len(offer.agents))
                        params["holders"].append(holder)
                        params["timeouts"].append(offer.timeout_ms)
                for row in (await session.execute(_RECORD_OFFERS, params)).mappings():
                    written[(tenant_id, row["id"])] = _out(row)
        return written


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
