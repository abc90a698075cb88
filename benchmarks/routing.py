"""Routing benchmark: decisions per second and enqueue-to-offer latency, against a naive PostgreSQL baseline.

Run through benchmarks/run_routing.sh, which provides PostgreSQL and Redis. Prints its figures.

The world: `--tenants` tenants with two queues each, `--agents` agents spread over them, `--waiting`
interactions waiting (created durably in PostgreSQL, as the engine does before it queues anything).

Ours is the production path without HTTP: the Redis matcher (`backend.routing.matcher`) decides, and
`backend.routing.offers.OfferRecorder` writes the interaction's new state and its `offered` timeline event
durably, group-committing concurrent offers. Every process runs on uvloop, as the API and workers do. The baseline does the same work the way a first version
usually does: one PostgreSQL transaction per decision, `SELECT ... FOR UPDATE SKIP LOCKED` to claim the
oldest waiting interaction and the agent (available and under capacity), then the same interaction update
and timeline event; the agent is released after the decision.

Two measurements for each:

1. Saturation: every agent comes free at once and the backlog is drained as fast as it goes (each offer
   counts as one decision; the agent is freed right after so it can take the next: ours ends the interaction
   and offers the next in one matcher step, as the engine does). Decisions per second, and the CPU time per
   decision of the benchmark's processes, PostgreSQL and Redis (wall-clock rates depend on what else the
   machine runs; CPU per decision much less).
2. Steady rate: new interactions arrive open-loop at `--steady-rate` per second with agents free; for each,
   the time from enqueue to the offer decided (the matcher's answer) and to the offer durable (committed).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import uvloop
from sqlalchemy import text

from backend.config import get_settings
from backend.db.engine import make_engine, make_sessionmaker
from backend.lib.redis_client import make_redis
from backend.routing.matcher import AgentRouting, Matcher, WaitingInteraction
from backend.routing.offers import OfferRecorder

NO_ACTION = json.dumps({"type": "none"})
OFFER_TIMEOUT_MS = 20_000


@dataclass
class World:
    tenants: list[str]
    queues: dict[str, list[str]]
    agents: dict[str, list[str]]
    backlog: list[tuple[str, str, str, int]]  # tenant, interaction, queue, enqueued ms
    arrivals: list[tuple[str, str, str]]  # tenant, interaction, queue: created, not yet queued


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _baseline_id(ours: str) -> str:
    """The baseline's copy of one of our interactions (each side drains its own)."""
    return str(uuid.UUID(int=uuid.UUID(ours).int ^ 1))


def _copy_rows(rows: list[tuple[Any, ...]]) -> io.BytesIO:
    text = "".join("\t".join("\\N" if v is None else str(v) for v in row) + "\n" for row in rows)
    return io.BytesIO(text.encode())


async def seed(args: argparse.Namespace) -> World:
    """Tenants, queues and interactions written as the superuser (COPY), fast and bypassing RLS."""
    conn = await asyncpg.connect(os.environ["CC_BENCH_SUPERUSER_DSN"])
    await conn.execute("TRUNCATE tenants CASCADE")
    await conn.execute("DROP TABLE IF EXISTS bench_waiting, bench_agents")
    plan = await conn.fetchval("SELECT id FROM plans ORDER BY seat_cap DESC LIMIT 1")
    now = datetime.now(UTC)
    rng = random.Random(1)
    tenants = [str(uuid.uuid4()) for _ in range(args.tenants)]
    queues = {t: [str(uuid.uuid4()), str(uuid.uuid4())] for t in tenants}
    per_tenant = args.agents // args.tenants
    agents = {t: [str(uuid.uuid4()) for _ in range(per_tenant)] for t in tenants}
    await conn.copy_to_table(
        "tenants",
        source=_copy_rows(
            [
                (t, f"rb{i}", f"Routing bench {i}", "active", plan, "UTC", f"rb{i}.sip.test", "f", now)
                for i, t in enumerate(tenants)
            ]
        ),
        columns=["id", "slug", "name", "status", "plan_id", "time_zone", "sip_domain", "require_mfa", "created_at"],
    )
    await conn.copy_to_table(
        "queues",
        source=_copy_rows(
            [
                (
                    t,
                    q,
                    f"queue {n}",
                    "longest_idle",
                    50,
                    3600,
                    20,
                    0,
                    80,
                    20,
                    NO_ACTION,
                    NO_ACTION,
                    NO_ACTION,
                    "{}",
                    now,
                )
                for t in tenants
                for n, q in enumerate(queues[t])
            ]
        ),
        columns=[
            "tenant_id",
            "id",
            "name",
            "strategy",
            "priority",
            "max_wait_seconds",
            "offer_timeout_seconds",
            "wrap_up_seconds",
            "service_level_percent",
            "service_level_seconds",
            "overflow_action",
            "closed_action",
            "no_agents_action",
            "announcements",
            "created_at",
        ],
    )
    start_ms = int(time.time() * 1000) - 60_000
    backlog = []
    for i in range(args.waiting):
        t = tenants[i % len(tenants)]
        backlog.append((t, str(uuid.uuid4()), rng.choice(queues[t]), start_ms + i))
    steady_total = int(args.steady_rate * args.steady_seconds * 1.05)
    arrivals = []
    for _ in range(steady_total):
        t = rng.choice(tenants)
        arrivals.append((t, str(uuid.uuid4()), rng.choice(queues[t])))
    # The backlog twice (ours, then the baseline's copy), and the arrivals twice.
    rows, events = [], []
    for copy in ("ours", "base"):
        for t, original, q, enq in backlog:
            iid = original if copy == "ours" else _baseline_id(original)
            at = datetime.fromtimestamp(enq / 1000, UTC)
            rows.append((t, iid, "voice", q, 50, "{}", "queued", at, at, 2))
            events += [(t, iid, 1, "created", at, "{}"), (t, iid, 2, "queued", at, "{}")]
        for t, original, q in arrivals:
            iid = original if copy == "ours" else _baseline_id(original)
            rows.append((t, iid, "voice", q, 50, "{}", "queued", now, now, 2))
            events += [(t, iid, 1, "created", now, "{}"), (t, iid, 2, "queued", now, "{}")]
    await conn.copy_to_table(
        "interactions",
        source=_copy_rows(rows),
        columns=[
            "tenant_id",
            "id",
            "channel",
            "queue_id",
            "priority",
            "attributes",
            "state",
            "queued_at",
            "created_at",
            "last_seq",
        ],
    )
    await conn.copy_to_table(
        "interaction_events",
        source=_copy_rows(events),
        columns=["tenant_id", "interaction_id", "seq", "name", "at", "data"],
    )
    # The baseline's own routing state: waiting interactions and agents' availability, in PostgreSQL.
    await conn.execute(
        """
        CREATE TABLE bench_waiting (tenant_id uuid, interaction_id uuid, queue_id uuid, rank bigint,
          PRIMARY KEY (tenant_id, interaction_id));
        CREATE INDEX ON bench_waiting (tenant_id, rank);
        CREATE TABLE bench_agents (tenant_id uuid, agent_id uuid, available boolean, load int, capacity int,
          idle_since bigint, PRIMARY KEY (tenant_id, agent_id));
        GRANT SELECT, INSERT, UPDATE, DELETE ON bench_waiting, bench_agents TO cc_app;
        """
    )
    await conn.copy_to_table(
        "bench_waiting",
        source=_copy_rows([(t, _baseline_id(i), q, enq) for t, i, q, enq in backlog]),
        columns=["tenant_id", "interaction_id", "queue_id", "rank"],
    )
    await conn.copy_to_table(
        "bench_agents",
        source=_copy_rows([(t, a, "f", 0, 1, 0) for t in tenants for a in agents[t]]),
        columns=["tenant_id", "agent_id", "available", "load", "capacity", "idle_since"],
    )
    await conn.execute("VACUUM ANALYZE")
    await conn.close()
    return World(tenants, queues, agents, backlog, arrivals)


def _waiting(tenant_queue: str, iid: str, enq: int) -> WaitingInteraction:
    return WaitingInteraction(
        uuid.UUID(iid), uuid.UUID(tenant_queue), "voice", 50, enq, OFFER_TIMEOUT_MS, "longest_idle"
    )


# --- ours -------------------------------------------------------------------------------------------


async def ours_load(world: World) -> None:
    redis = make_redis(os.environ["REDIS_URL"])
    await redis.flushdb()
    matcher = Matcher(redis)
    for t, iid, q, enq in world.backlog:
        await matcher.enqueue(uuid.UUID(t), _waiting(q, iid, enq))
    for t in world.tenants:
        for a in world.agents[t]:
            await matcher.set_agent(uuid.UUID(t), AgentRouting(uuid.UUID(a), False, {"voice": 1}, {}, 0))
    await redis.aclose()


def _ours_drain_process(world: World, share: int, shares: int, concurrency: int, out: Any, go: Any) -> None:
    out.put(uvloop.run(_ours_drain(world, share, shares, concurrency, go)))


async def _ours_drain(world: World, share: int, shares: int, concurrency: int, go: Any) -> dict[str, float]:
    settings = get_settings()
    engine = make_engine(settings)
    recorder = OfferRecorder(make_sessionmaker(engine))
    redis = make_redis(os.environ["REDIS_URL"])
    matcher = Matcher(redis)
    mine = [(t, a) for i, t in enumerate(world.tenants) if i % shares == share for a in world.agents[t]]
    decided = 0
    lanes: list[list[tuple[str, str]]] = [mine[i::concurrency] for i in range(concurrency)]

    async def lane(agents: list[tuple[str, str]]) -> None:
        nonlocal decided
        active = list(agents)
        for t, a in active:  # every agent comes free at once
            await matcher.set_agent(uuid.UUID(t), AgentRouting(uuid.UUID(a), True, {"voice": 1}, {}, 0))
        handling: dict[tuple[str, str], uuid.UUID] = {}
        while active:
            for t, a in list(active):
                tenant, agent = uuid.UUID(t), uuid.UUID(a)
                previous = handling.pop((t, a), None)
                if previous is None:
                    offer = await matcher.offer_agent(tenant, agent, int(time.time() * 1000))
                else:
                    # The previous one was handled at once: the agent comes free and is offered the next one, as
                    # the engine does when an interaction ends (`RoutingEngine._released`).
                    freed = await matcher.finish_and_offer(tenant, previous, agent, int(time.time() * 1000))
                    offer = freed.offer
                if offer is None:
                    active.remove((t, a))
                    continue
                await recorder.record(tenant, offer.interaction_id, offer.agents, offer.timeout_ms)
                decided += 1
                handling[(t, a)] = offer.interaction_id

    await redis.ping()
    async with engine.connect() as warm:
        await warm.execute(text("SELECT 1"))
    await asyncio.to_thread(go.wait)
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(agents) for agents in lanes))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await redis.aclose()
    await engine.dispose()
    return {"decided": decided, "seconds": elapsed, "cpu": cpu, "batches": recorder.batches_written}


async def ours_steady(world: World, rate: float, seconds: float) -> dict[str, Any]:
    settings = get_settings()
    engine = make_engine(settings)
    recorder = OfferRecorder(make_sessionmaker(engine))
    redis = make_redis(os.environ["REDIS_URL"])
    matcher = Matcher(redis)
    decided_ms: list[float] = []
    durable_ms: list[float] = []
    unmatched = 0
    tasks = set()

    async def arrive(t: str, iid: str, q: str) -> None:
        nonlocal unmatched
        tenant = uuid.UUID(t)
        start = time.perf_counter()
        item = _waiting(q, iid, int(time.time() * 1000))
        await matcher.enqueue(tenant, item)
        offers = await matcher.offer_interaction(tenant, item, int(time.time() * 1000))
        decided_ms.append((time.perf_counter() - start) * 1000)
        if not offers:
            unmatched += 1
            return
        for offer in offers:
            await recorder.record(tenant, offer.interaction_id, offer.agents, offer.timeout_ms)
        durable_ms.append((time.perf_counter() - start) * 1000)
        await asyncio.sleep(random.uniform(0.2, 1.0))  # talk time, then the agent is free again
        for offer in offers:
            await matcher.finish(tenant, offer.interaction_id)

    total = int(rate * seconds)
    started = time.perf_counter()
    for n, (t, iid, q) in enumerate(world.arrivals[:total]):
        due = started + n / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(arrive(t, iid, q))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    await redis.aclose()
    await engine.dispose()
    return {
        "offered": len(durable_ms),
        "unmatched": unmatched,
        "achieved_rate": total / elapsed,
        "decided_p50": percentile(decided_ms, 0.50),
        "decided_p99": percentile(decided_ms, 0.99),
        "durable_p50": percentile(durable_ms, 0.50),
        "durable_p99": percentile(durable_ms, 0.99),
        "batches": recorder.batches_written,
    }


# --- the baseline: PostgreSQL, SELECT ... FOR UPDATE SKIP LOCKED --------------------------------------

_BASE_OFFER_WAITING = """
WITH picked AS (
  SELECT interaction_id FROM bench_waiting WHERE tenant_id = $1 ORDER BY rank LIMIT 1 FOR UPDATE SKIP LOCKED
), gone AS (
  DELETE FROM bench_waiting w USING picked WHERE w.tenant_id = $1 AND w.interaction_id = picked.interaction_id
  RETURNING w.interaction_id
)
SELECT interaction_id FROM gone
"""
_BASE_CLAIM_AGENT = """
UPDATE bench_agents SET load = load + 1 WHERE (tenant_id, agent_id) = (
  SELECT tenant_id, agent_id FROM bench_agents WHERE tenant_id = $1 AND available AND load < capacity
  ORDER BY idle_since LIMIT 1 FOR UPDATE SKIP LOCKED
) RETURNING agent_id
"""
_BASE_RECORD = """
WITH moved AS (
  UPDATE interactions SET state = 'offered', agent_id = $3, last_seq = last_seq + 1
  WHERE tenant_id = $1 AND id = $2 RETURNING last_seq
)
INSERT INTO interaction_events (tenant_id, interaction_id, seq, name, at, agent_id, data)
SELECT $1, $2, moved.last_seq, 'offered', now(), $3, '{"timeout_ms": 20000}'::jsonb FROM moved
"""


def _base_dsn() -> str:
    return os.environ["DATABASE_URL"].replace("postgresql+asyncpg", "postgresql")


_BASE_CLAIM_THIS_AGENT = """
UPDATE bench_agents SET load = load + 1 WHERE (tenant_id, agent_id) = (
  SELECT tenant_id, agent_id FROM bench_agents WHERE tenant_id = $1 AND agent_id = $2 AND available AND load < capacity
  FOR UPDATE SKIP LOCKED
) RETURNING agent_id
"""
_BASE_RELEASE_AGENT = "UPDATE bench_agents SET load = load - 1 WHERE tenant_id = $1 AND agent_id = $2"


async def _refill_baseline(world: World) -> None:
    """Puts the baseline's backlog back as seeded (after the old drain), so the next drain starts alike."""
    conn = await asyncpg.connect(os.environ["CC_BENCH_SUPERUSER_DSN"])
    ids = [uuid.UUID(_baseline_id(i)) for _, i, _, _ in world.backlog]
    await conn.execute("DELETE FROM interaction_events WHERE interaction_id = ANY($1) AND seq > 2", ids)
    await conn.execute(
        "UPDATE interactions SET state = 'queued', agent_id = NULL, last_seq = 2 WHERE id = ANY($1)", ids
    )
    await conn.execute("TRUNCATE bench_waiting")
    await conn.copy_to_table(
        "bench_waiting",
        source=_copy_rows([(t, _baseline_id(i), q, enq) for t, i, q, enq in world.backlog]),
        columns=["tenant_id", "interaction_id", "queue_id", "rank"],
    )
    await conn.execute("UPDATE bench_agents SET available = false, load = 0")
    await conn.execute("VACUUM ANALYZE")
    await conn.close()


def _base_drain_process(world: World, share: int, shares: int, concurrency: int, out: Any, go: Any) -> None:
    out.put(uvloop.run(_base_drain(world, share, shares, concurrency, go, claim_agents=True)))


def _old_base_drain_process(world: World, share: int, shares: int, concurrency: int, out: Any, go: Any) -> None:
    out.put(uvloop.run(_base_drain(world, share, shares, concurrency, go, claim_agents=False)))


async def _base_drain(
    world: World, share: int, shares: int, concurrency: int, go: Any, *, claim_agents: bool
) -> dict[str, float]:
    """With `claim_agents`, each decision claims its agent (state and capacity checked, the row locked) and
    releases it after, as ours does (the offer checks the agent, `finish` frees them). Without, the drain of
    this benchmark before 2026-11-25 15:00, which never touched the agents' rows: kept to compare figures."""
    pool = await asyncpg.create_pool(_base_dsn(), min_size=concurrency, max_size=concurrency)
    if claim_agents:
        async with pool.acquire() as conn:  # the old drain may have run first; its waiting rows are gone anyway
            await conn.execute("UPDATE bench_agents SET load = 0")
    mine = [(t, a) for i, t in enumerate(world.tenants) if i % shares == share for a in world.agents[t]]
    decided = 0

    async def lane(agents: list[tuple[str, str]]) -> None:
        nonlocal decided
        active = list(agents)
        async with pool.acquire() as conn:  # every agent comes free at once
            for t, a in active:
                await conn.execute(
                    "UPDATE bench_agents SET available = true WHERE tenant_id = $1 AND agent_id = $2",
                    uuid.UUID(t),
                    uuid.UUID(a),
                )
        while active:
            for t, a in list(active):
                tenant, agent = uuid.UUID(t), uuid.UUID(a)
                async with pool.acquire() as conn:
                    transaction = conn.transaction()
                    await transaction.start()
                    await conn.execute("SELECT set_config('app.tenant_id', $1, true)", t)
                    claimed = not claim_agents or await conn.fetchval(_BASE_CLAIM_THIS_AGENT, tenant, agent)
                    iid = await conn.fetchval(_BASE_OFFER_WAITING, tenant) if claimed else None
                    if iid is None:
                        await transaction.rollback()  # the claim too
                        active.remove((t, a))  # nothing left for them (a claim never fails: one lane per agent)
                        continue
                    await conn.execute(_BASE_RECORD, tenant, iid, agent)
                    await transaction.commit()
                    if claim_agents:
                        await conn.execute(_BASE_RELEASE_AGENT, tenant, agent)  # handled at once: free again
                decided += 1

    await asyncio.to_thread(go.wait)
    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(lane(mine[i::concurrency]) for i in range(concurrency)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    await pool.close()
    return {"decided": decided, "seconds": elapsed, "cpu": cpu, "batches": decided}


async def base_steady(world: World, rate: float, seconds: float) -> dict[str, Any]:
    pool = await asyncpg.create_pool(_base_dsn(), min_size=20, max_size=40)
    async with pool.acquire() as conn:
        await conn.execute("UPDATE bench_agents SET available = true, load = 0")
    decided_ms: list[float] = []
    unmatched = 0
    tasks = set()

    async def arrive(t: str, iid_text: str, q: str) -> None:
        nonlocal unmatched
        tenant, iid = uuid.UUID(t), uuid.UUID(_baseline_id(iid_text))
        start = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('app.tenant_id', $1, true)", t)
            agent = await conn.fetchval(_BASE_CLAIM_AGENT, tenant)
            if agent is None:
                await conn.execute(
                    "INSERT INTO bench_waiting VALUES ($1, $2, $3, $4)",
                    tenant,
                    iid,
                    uuid.UUID(q),
                    int(time.time() * 1000),
                )
            else:
                await conn.execute(_BASE_RECORD, tenant, iid, agent)
        decided_ms.append((time.perf_counter() - start) * 1000)  # decided and durable at once: one transaction
        if agent is None:
            unmatched += 1
            return
        await asyncio.sleep(random.uniform(0.2, 1.0))
        async with pool.acquire() as conn:
            await conn.execute(
                "UPDATE bench_agents SET load = load - 1 WHERE tenant_id = $1 AND agent_id = $2", tenant, agent
            )

    total = int(rate * seconds)
    started = time.perf_counter()
    for n, (t, iid, q) in enumerate(world.arrivals[:total]):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(arrive(t, iid, q))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    await pool.close()
    return {
        "offered": total - unmatched,
        "unmatched": unmatched,
        "achieved_rate": total / elapsed,
        "decided_p50": percentile(decided_ms, 0.50),
        "decided_p99": percentile(decided_ms, 0.99),
        "durable_p50": percentile(decided_ms, 0.50),
        "durable_p99": percentile(decided_ms, 0.99),
        "batches": total,
    }


def _hammer_process(noisy: str, agents: list[str], rate: float, stop: Any, out: Any) -> None:
    out.put(uvloop.run(_hammer(uuid.UUID(noisy), [uuid.UUID(a) for a in agents], rate, stop)))


async def _hammer(noisy: uuid.UUID, agents: list[uuid.UUID], rate: float, stop: Any) -> float:
    """The noisy tenant's agents ask for work at `rate` per second, open loop, until told to stop."""
    redis = make_redis(os.environ["REDIS_URL"])
    matcher = Matcher(redis)
    polls, started = 0, time.perf_counter()
    while not stop.is_set():
        delay = started + polls / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await matcher.offer_agent(noisy, agents[polls % len(agents)], int(time.time() * 1000))
        polls += 1
    await redis.aclose()
    return polls / (time.perf_counter() - started)


async def neighbours(rate: float, seconds: float, noisy_waiting: int, poll_rate: float) -> dict[str, Any]:
    """A quiet tenant's decision latency while another tenant's agents poll for work from another process,
    with a few and with `noisy_waiting` interactions waiting there (needing a skill nobody has)."""
    redis = make_redis(os.environ["REDIS_URL"])
    matcher = Matcher(redis)
    quiet, noisy = uuid.uuid4(), uuid.uuid4()
    quiet_queue, noisy_queue = uuid.uuid4(), uuid.uuid4()
    for _ in range(20):
        await matcher.set_agent(quiet, AgentRouting(uuid.uuid4(), True, {"voice": 1}, {}, 0))
    noisy_agents = [uuid.uuid4() for _ in range(20)]
    for agent in noisy_agents:
        await matcher.set_agent(noisy, AgentRouting(agent, True, {"voice": 1}, {"basic": 5}, 0))
    rare = [("rare-skill", [(0, 1)])]

    async def fill(count: int) -> None:
        base_ms = int(time.time() * 1000)
        for n in range(count):
            item = WaitingInteraction(
                uuid.uuid4(), noisy_queue, "voice", 50, base_ms + n, OFFER_TIMEOUT_MS, "longest_idle", rare
            )
            await matcher.enqueue(noisy, item)

    async def quiet_run() -> tuple[float, float]:
        latencies: list[float] = []
        started = time.perf_counter()
        for n in range(int(rate * seconds)):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            item = _waiting(str(quiet_queue), str(uuid.uuid4()), int(time.time() * 1000))
            begin = time.perf_counter()
            await matcher.enqueue(quiet, item)
            offers = await matcher.offer_interaction(quiet, item, int(time.time() * 1000))
            latencies.append((time.perf_counter() - begin) * 1000)
            for offer in offers:
                await matcher.finish(quiet, offer.interaction_id)
        return percentile(latencies, 0.5), percentile(latencies, 0.99)

    results: dict[str, Any] = {}
    context = multiprocessing.get_context("spawn")
    filled = 0
    for waiting in (10, noisy_waiting):
        await fill(waiting - filled)
        filled = waiting
        stop, out = context.Event(), context.Queue()
        hammer = context.Process(
            target=_hammer_process, args=(str(noisy), [str(a) for a in noisy_agents], poll_rate, stop, out)
        )
        hammer.start()
        await asyncio.sleep(3)  # the hammer is up and polling
        results[waiting] = await quiet_run()
        stop.set()
        results[f"{waiting}_polls"] = out.get(timeout=60)
        hammer.join()
    await matcher.clear(quiet)
    await matcher.clear(noisy)
    await redis.aclose()
    return results


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int, children_too: bool = False) -> float:
    """CPU seconds of a process (and of its reaped children: backends that exited), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12])  # utime, stime
    if children_too:
        used += int(fields[13]) + int(fields[14])  # cutime, cstime
    return used / _TICK


def _postgres_cpu(postmaster: int) -> float:
    """CPU seconds of the whole PostgreSQL instance: the postmaster, its live children and those it reaped."""
    total = _proc_cpu(postmaster, children_too=True)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / _TICK
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _redis_cpu() -> float:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(os.environ["REDIS_URL"])
    info = client.info("cpu")
    client.close()
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _data_directory() -> str:
    conn = await asyncpg.connect(os.environ["CC_BENCH_SUPERUSER_DSN"])
    data = await conn.fetchval("SHOW data_directory")
    await conn.close()
    return str(data)


def _postmaster_pid() -> int:
    with open(os.path.join(uvloop.run(_data_directory()), "postmaster.pid")) as f:
        return int(f.readline())


def drain(target: Any, world: World, processes: int, concurrency: int, postmaster: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    out, go = context.Queue(), context.Event()
    workers = [
        context.Process(target=target, args=(world, i, processes, concurrency, out, go)) for i in range(processes)
    ]
    for w in workers:
        w.start()
    time.sleep(8)  # let every process start, import and connect before the clock starts
    load = os.getloadavg()[0]
    pg_cpu, redis_cpu = _postgres_cpu(postmaster), _redis_cpu()
    go.set()
    results = [out.get(timeout=1800) for _ in workers]
    # Whatever the processes did after their clocks stopped (closing pools) is counted here too: a little high.
    pg_cpu, redis_cpu = _postgres_cpu(postmaster) - pg_cpu, _redis_cpu() - redis_cpu
    for w in workers:
        w.join()
    elapsed = max(r["seconds"] for r in results)
    decided = sum(r["decided"] for r in results)
    return {
        "decided": decided,
        "seconds": elapsed,
        "rate": decided / elapsed,
        "batches": sum(r["batches"] for r in results),
        "load": load,
        # CPU per decision is what to compare on a shared machine: wall-clock rates move with the neighbours.
        "cpu_us_client": sum(r["cpu"] for r in results) / max(1, decided) * 1e6,
        "cpu_us_postgres": pg_cpu / max(1, decided) * 1e6,
        "cpu_us_redis": redis_cpu / max(1, decided) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--waiting", type=int, default=20000)
    parser.add_argument("--steady-rate", type=float, default=500)
    parser.add_argument("--steady-seconds", type=float, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent decision loops per process")
    parser.add_argument(
        "--old-baseline",
        action="store_true",
        help="also drain with the baseline as it was before it claimed agents (its figures before the fix)",
    )
    parser.add_argument(
        "--parts", default="saturation,steady,neighbours", help="which measurements to run (comma-separated)"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(f"seeding {args.tenants} tenants, {args.agents} agents, {args.waiting} waiting interactions ...", flush=True)
    world = uvloop.run(seed(args))
    uvloop.run(ours_load(world))
    postmaster = _postmaster_pid()
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)

    def cpu(r: dict[str, float]) -> str:
        total = r["cpu_us_client"] + r["cpu_us_postgres"] + r["cpu_us_redis"]
        return (
            f"CPU per decision {total:.0f} us (Python {r['cpu_us_client']:.0f}, PostgreSQL {r['cpu_us_postgres']:.0f}, "
            f"Redis {r['cpu_us_redis']:.0f}); load average {r['load']:.2f} at the start"
        )

    if "saturation" in parts:
        ours = drain(_ours_drain_process, world, args.processes, args.concurrency, postmaster)
        print(
            f"ours      saturation: {ours['decided']:,} decisions in {ours['seconds']:.1f} s = {ours['rate']:,.0f}/s "
            f"({ours['batches']:,} commits, {ours['decided'] / max(1, ours['batches']):.1f} offers per commit); "
            f"{cpu(ours)}",
            flush=True,
        )
        if args.old_baseline:
            old = drain(_old_base_drain_process, world, args.processes, args.concurrency, postmaster)
            print(
                f"old baseline (agents never claimed) saturation: {old['decided']:,} decisions in "
                f"{old['seconds']:.1f} s = {old['rate']:,.0f}/s -> ours is {ours['rate'] / old['rate']:.1f}x; {cpu(old)}",
                flush=True,
            )
            uvloop.run(_refill_baseline(world))
        base = drain(_base_drain_process, world, args.processes, args.concurrency, postmaster)
        print(
            f"baseline  saturation: {base['decided']:,} decisions in {base['seconds']:.1f} s = {base['rate']:,.0f}/s "
            f"-> ours is {ours['rate'] / base['rate']:.1f}x; {cpu(base)}",
            flush=True,
        )
    if "steady" not in parts:
        return
    for name, steady in (
        ("ours", ours_steady(world, args.steady_rate, args.steady_seconds)),
        ("baseline", base_steady(world, args.steady_rate, args.steady_seconds)),
    ):
        r = uvloop.run(steady)
        print(
            f"{name:9} steady {args.steady_rate:.0f}/s for {args.steady_seconds:.0f} s (achieved {r['achieved_rate']:.0f}/s): "
            f"offered {r['offered']:,}, unmatched {r['unmatched']}; enqueue-to-offer decided p50 {r['decided_p50']:.2f} ms "
            f"p99 {r['decided_p99']:.2f} ms; durable p50 {r['durable_p50']:.2f} ms p99 {r['durable_p99']:.2f} ms "
            f"({r['batches']:,} commits)",
            flush=True,
        )
    if "neighbours" not in parts:
        return
    n = uvloop.run(neighbours(200, 10, 10_000, 1_000))
    for waiting in (10, 10_000):
        p50, p99 = n[waiting]
        print(
            f"neighbours: a quiet tenant's enqueue-to-offer decided at 200/s while another tenant with "
            f"{waiting:,} waiting polls for work ({n[f'{waiting}_polls']:,.0f} scans/s): p50 {p50:.2f} ms p99 {p99:.2f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
