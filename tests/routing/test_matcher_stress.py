"""Stress: several processes drive the matcher at random over 100,000 operations; the invariants hold throughout.

Four processes, each with its own Redis connection, enqueue, offer (on arrival and when an agent frees up),
accept, reject, expire offers, finish (alone, or with the freed agent's next offer in the same step, as the
engine does when an agent ends an interaction), and change agents' availability across three tenants whose queues use
every strategy, ring-all included. They share one clock kept in Redis, so "first in" means the same thing
to all of them.

Every offer runs inside MULTI/EXEC together with a read-only audit script, so the audit sees the state the
offer left and nothing else in between. From it the process checks, for every agent offered to: the agent
belongs to the interaction's tenant, has the skills the queue requires at that moment, is within capacity,
and no interaction of the same priority that arrived earlier was waiting that this agent could have taken
(first in, first out). At the end the whole state is scanned: every interaction in exactly one place and
every agent's load equal to what it holds.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import uuid
from typing import Any

import pytest

from backend.lib.redis_client import make_redis
from backend.routing.matcher import (
    _COMMON,
    _FINISH_AND_OFFER,
    _OFFER_AGENT,
    _OFFER_INTERACTION,
    AgentRouting,
    Matcher,
    WaitingInteraction,
    _offers,
)

pytestmark = pytest.mark.integration

TOTAL_OPERATIONS = int(os.environ.get("CC_STRESS_OPERATIONS", "100000"))
PROCESSES = 4
NOW = 1_900_000_000_000
CLOCK_KEY = "stress:{clock}"
DETAILS_KEY = "stress:{clock}:details"
CHANNELS = ("voice", "webchat")
PRIORITIES = (0, 50, 100)
STRATEGIES = ("longest_idle", "round_robin", "fewest_interactions", "best_skill", "ring_all")
SCAN_DEPTH = 50

# Read-only: per (queue, channel, priority) the earliest waiting interaction (the most relaxed of its group,
# so if an agent cannot take it they can take none of the group), and every agent's loads and capacities.
_AUDIT = (
    _COMMON
    + r"""
local out = {{}, {}}
for _, channel in ipairs({'voice', 'webchat'}) do
  for _, queue in ipairs(redis.call('SMEMBERS', P .. 'lanes:' .. channel)) do
    local seen = {}
    for _, iid in ipairs(redis.call('ZRANGE', P .. 'qc:' .. queue .. ':' .. channel, 0, -1)) do
      local ikey = P .. 'i:' .. iid
      local prio = redis.call('HGET', ikey, 'prio')
      if not seen[prio] then
        seen[prio] = true
        table.insert(out[1], {iid, queue, channel, prio, redis.call('HGET', ikey, 'enq')})
      end
    end
  end
end
for i = 1, #ARGV do
  table.insert(out[2], {ARGV[i], redis.call('HGET', P .. 'a:' .. ARGV[i], 'load:voice') or '0',
    redis.call('HGET', P .. 'a:' .. ARGV[i], 'load:webchat') or '0'})
end
return out
"""
)


def _world(seed: int) -> dict[str, Any]:
    """Tenants, queues (with fixed requirements, as the engine makes them), skills and agents from a seed."""
    rng = random.Random(seed)
    world: dict[str, Any] = {"tenants": {}}
    for _ in range(3):
        tenant = str(uuid.UUID(int=rng.getrandbits(128)))
        skills = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3)]
        queues = {
            str(uuid.UUID(int=rng.getrandbits(128))): {
                "strategy": strategy,
                "requirements": [
                    [skill, [[0, rng.randint(3, 10)], [rng.randint(5, 60), rng.randint(1, 3)]]]
                    for skill in rng.sample(skills, rng.randint(0, 2))
                ],
            }
            for strategy in STRATEGIES
        }
        agents = {
            str(uuid.UUID(int=rng.getrandbits(128))): {
                "capacity": {"voice": 1, "webchat": rng.randint(1, 3)},
                "skills": {s: rng.randint(1, 10) for s in skills if rng.random() < 0.7},
            }
            for _ in range(8)
        }
        world["tenants"][tenant] = {"skills": skills, "queues": queues, "agents": agents}
    return world


def _qualifies(requirements: list[Any], skills: dict[str, int], waited_s: float) -> bool:
    for skill, steps in requirements:
        need = 0
        for after, level in steps:
            if waited_s >= after:
                need = level
        have = skills.get(skill, 0)
        if have == 0 or have < need:
            return False
    return True


class Violation(AssertionError):
    pass


async def _drive(url: str, seed: int, worker: int, operations: int) -> dict[str, int]:
    redis = make_redis(url)
    matcher = Matcher(redis, scan_depth=SCAN_DEPTH)
    offer_interaction_script = redis.register_script(_OFFER_INTERACTION)
    offer_agent_script = redis.register_script(_OFFER_AGENT)
    finish_and_offer_script = redis.register_script(_FINISH_AND_OFFER)
    audit_script = redis.register_script(_AUDIT)
    world = _world(seed)
    rng = random.Random(seed * 100 + worker)
    tenants = list(world["tenants"])
    mine: dict[str, tuple[str, list[str]]] = {}  # interaction -> (tenant, agents) for offers this process made
    connected: dict[str, str] = {}  # interaction -> tenant, for those this process's agents accepted
    taker_of: dict[str, str] = {}  # interaction -> the agent who accepted it
    details: dict[str, dict[str, Any]] = {}  # interaction -> queue, channel, priority, enqueued
    counts = dict.fromkeys(
        (
            "enqueued",
            "offers",
            "ring_offers",
            "accepted",
            "rejected",
            "expired",
            "finished",
            "freed_and_offered",
            "fifo_checks",
        ),
        0,
    )

    async def check_offer(tenant: str, iid: str, agents: list[str], now: int, audit: list[Any]) -> None:
        spec = world["tenants"][tenant]
        if iid not in details:  # enqueued by another process, which wrote down what it enqueued
            details[iid] = json.loads(await redis.hget(DETAILS_KEY, iid))
        item = details[iid]
        waiting, load_rows = audit
        loads = {row[0]: {"voice": int(row[1]), "webchat": int(row[2])} for row in load_rows}
        queue = spec["queues"][item["queue"]]
        if len(agents) > 1 and not (queue["strategy"] == "ring_all" and item["channel"] == "voice"):
            raise Violation(f"seed {seed}: {iid} offered to {len(agents)} agents outside ring-all")
        for agent in agents:
            if agent not in spec["agents"]:
                raise Violation(f"seed {seed}: {iid} offered to an agent of another tenant")
            me = spec["agents"][agent]
            if not _qualifies(queue["requirements"], me["skills"], (now - item["enq"]) / 1000):
                raise Violation(f"seed {seed}: {iid} offered to an agent without the skills")
            for channel in CHANNELS:
                if loads[agent][channel] > me["capacity"][channel]:
                    raise Violation(f"seed {seed}: {agent} over capacity on {channel}")
            for other_iid, other_queue, channel, prio, enq in waiting:
                if int(prio) != item["priority"] or int(enq) >= item["enq"]:
                    continue
                had_room = channel == item["channel"] or loads[agent][channel] < me["capacity"][channel]
                requirements = spec["queues"][other_queue]["requirements"]
                if had_room and _qualifies(requirements, me["skills"], (now - int(enq)) / 1000):
                    raise Violation(
                        f"seed {seed}: {agent} got {iid} (arrived {item['enq']}) while {other_iid} of the same "
                        f"priority (arrived {enq}) waited for it"
                    )
            counts["fifo_checks"] += 1

    def spec_of(tenant: str) -> dict[str, Any]:
        return world["tenants"][tenant]

    async def offer_and_audit(tenant: str, script: Any, args: list[Any]) -> tuple[Any, list[Any]]:
        async with redis.pipeline(transaction=True) as pipe:
            await script(keys=[matcher.prefix(uuid.UUID(tenant))], args=args, client=pipe)
            await audit_script(
                keys=[matcher.prefix(uuid.UUID(tenant))], args=list(world["tenants"][tenant]["agents"]), client=pipe
            )
            result, audit = await pipe.execute()
        return result, audit

    for _ in range(operations):
        now = int(await redis.incrby(CLOCK_KEY, rng.randint(0, 400)))
        tenant = rng.choice(tenants)
        spec = world["tenants"][tenant]
        action = rng.random()
        if action < 0.25:
            queue_id = rng.choice(list(spec["queues"]))
            queue = spec["queues"][queue_id]
            item = WaitingInteraction(
                uuid.uuid4(),
                uuid.UUID(queue_id),
                rng.choice(CHANNELS),
                rng.choice(PRIORITIES),
                now,
                20_000,
                queue["strategy"],
                [(skill, [tuple(step) for step in steps]) for skill, steps in queue["requirements"]],
            )
            iid = str(item.interaction_id)
            details[iid] = {"queue": queue_id, "channel": item.channel, "priority": item.priority, "enq": now}
            await redis.hset(DETAILS_KEY, iid, json.dumps(details[iid]))
            await matcher.enqueue(uuid.UUID(tenant), item)
            counts["enqueued"] += 1
            flat, audit = await offer_and_audit(tenant, offer_interaction_script, [iid, now, SCAN_DEPTH])
            # Besides the newcomer, agents with older work waiting for them are offered that first.
            for offer in _offers(flat):
                offered, agents = str(offer.interaction_id), [str(a) for a in offer.agents]
                await check_offer(tenant, offered, agents, now, audit)
                mine[offered] = (tenant, agents)
                counts["offers"] += 1
                counts["ring_offers"] += len(agents) > 1
        elif action < 0.45:
            agent = rng.choice(list(spec["agents"]))
            flat, audit = await offer_and_audit(tenant, offer_agent_script, [agent, now, SCAN_DEPTH])
            for offer in _offers(flat):
                iid, agents = str(offer.interaction_id), [str(a) for a in offer.agents]
                if agent not in agents:
                    raise Violation(f"seed {seed}: the agent who asked was not offered {iid}")
                await check_offer(tenant, iid, agents, now, audit)
                mine[iid] = (tenant, agents)
                counts["offers"] += 1
                counts["ring_offers"] += len(agents) > 1
        elif action < 0.60 and mine:
            iid = rng.choice(list(mine))
            owner_tenant, agents = mine.pop(iid)
            taker = rng.choice(agents)
            acceptance = await matcher.accept(uuid.UUID(owner_tenant), uuid.UUID(iid), uuid.UUID(taker), now)
            assert acceptance.verdict in ("ok", "expired", "not_offered", "not_yours")
            if acceptance.ok:
                counts["accepted"] += 1
                # (Our record of who rings may be stale: another process may have expired and re-offered it.)
                if not {str(a) for a in acceptance.withdrawn} <= set(spec_of(owner_tenant)["agents"]) - {taker}:
                    raise Violation(f"seed {seed}: accepting {iid} withdrew it from the taker or another tenant")
                connected[iid] = owner_tenant
                taker_of[iid] = taker
        elif action < 0.68 and mine:
            iid = rng.choice(list(mine))
            owner_tenant, agents = mine.pop(iid)
            refuser = rng.choice(agents)
            verdict = await matcher.reject(uuid.UUID(owner_tenant), uuid.UUID(iid), uuid.UUID(refuser))
            counts["rejected"] += verdict in ("ok", "ringing")
            still_ringing = [a for a in agents if a != refuser]
            if verdict == "ringing" and still_ringing:  # (another process may have re-offered it meanwhile)
                mine[iid] = (owner_tenant, still_ringing)
        elif action < 0.74:
            expired = await matcher.expire_offers(uuid.UUID(tenant), now, limit=20)
            counts["expired"] += len(expired)
            for iid, _ in expired:
                mine.pop(str(iid), None)
        elif action < 0.90:
            talking = [i for i, t in connected.items() if t == tenant]
            ringing = [i for i, (t, _) in mine.items() if t == tenant]
            if talking and rng.random() < 0.4:
                # The agent ends it and comes free: their next offer is made in the same step.
                iid = rng.choice(talking)
                agent = taker_of.pop(iid)
                connected.pop(iid)
                wrap_up = rng.random() < 0.3
                flat, audit = await offer_and_audit(
                    tenant, finish_and_offer_script, [iid, agent, now, SCAN_DEPTH, 1 if wrap_up else 0]
                )
                # ('' when another process, acting on a stale record of a ringing offer, ended it already.)
                if flat[0] not in (agent, ""):
                    raise Violation(f"seed {seed}: ending {iid} freed {flat[0]!r}, not {agent} who had it")
                made = _offers(flat[2:])
                if wrap_up and flat[1] == 1 and made:
                    raise Violation(f"seed {seed}: {agent} was offered work on the way to wrap-up")
                for offer in made:
                    offered, agents = str(offer.interaction_id), [str(a) for a in offer.agents]
                    if agent not in agents:
                        raise Violation(f"seed {seed}: the agent who came free was not offered {offered}")
                    await check_offer(tenant, offered, agents, now, audit)
                    mine[offered] = (tenant, agents)
                    counts["offers"] += 1
                    counts["ring_offers"] += len(agents) > 1
                counts["finished"] += 1
                counts["freed_and_offered"] += 1
                continue
            if talking and rng.random() < 0.5:
                iid = rng.choice(talking)  # the agent ends it
            elif ringing and rng.random() < 0.2:
                iid = rng.choice(ringing)  # the caller hangs up while it rings
            else:
                queue_id = rng.choice(list(spec["queues"]))
                members = await redis.zrange(matcher.prefix(uuid.UUID(tenant)) + "q:" + queue_id, 0, 3)
                if not members:
                    continue
                iid = rng.choice(members)  # a waiting customer leaves
            mine.pop(iid, None)
            connected.pop(iid, None)
            taker_of.pop(iid, None)
            await matcher.finish(uuid.UUID(tenant), uuid.UUID(iid))
            counts["finished"] += 1
        else:
            agent = rng.choice(list(spec["agents"]))
            me = spec["agents"][agent]
            await matcher.set_agent(
                uuid.UUID(tenant), AgentRouting(uuid.UUID(agent), rng.random() < 0.8, me["capacity"], me["skills"], now)
            )
    await redis.aclose()
    return counts


def _process(url: str, seed: int, worker: int, operations: int, results: Any) -> None:
    try:
        results.put(asyncio.run(_drive(url, seed, worker, operations)))
    except BaseException as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


async def test_many_processes_many_operations_keep_every_invariant(redis):
    url = os.environ["REDIS_URL"]
    seed = int(os.environ.get("CC_STRESS_SEED", random.randrange(1_000_000)))
    world = _world(seed)
    await redis.set(CLOCK_KEY, NOW)
    await redis.delete(DETAILS_KEY)
    for tenant, spec in world["tenants"].items():
        for agent, details in spec["agents"].items():
            await Matcher(redis).set_agent(
                uuid.UUID(tenant), AgentRouting(uuid.UUID(agent), True, details["capacity"], details["skills"], NOW)
            )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    per_process = TOTAL_OPERATIONS // PROCESSES
    workers = [context.Process(target=_process, args=(url, seed, w, per_process, results)) for w in range(PROCESSES)]
    for w in workers:
        w.start()
    totals: dict[str, int] = {}
    for _ in workers:
        outcome = await asyncio.to_thread(results.get, True, 900)
        assert "error" not in outcome, f"seed {seed}: {outcome['error']}"
        for key, value in outcome.items():
            totals[key] = totals.get(key, 0) + value
    for w in workers:
        w.join(60)
        assert w.exitcode == 0, f"seed {seed}: a worker failed"
    assert totals["enqueued"] > TOTAL_OPERATIONS // 5, totals
    assert totals["offers"] > TOTAL_OPERATIONS // 10, totals
    assert totals["ring_offers"] > 0, totals
    assert totals["accepted"] > 0 and totals["rejected"] > 0 and totals["expired"] > 0, totals
    assert totals["fifo_checks"] >= totals["offers"] // 2, totals
    assert totals["freed_and_offered"] > 0, totals

    # The whole state, tenant by tenant: every interaction in exactly one place, every load exact.
    matcher = Matcher(redis)
    for tenant, spec in world["tenants"].items():
        prefix = matcher.prefix(uuid.UUID(tenant))
        queued: dict[str, str] = {}
        for queue in spec["queues"]:
            members = await redis.zrange(prefix + "q:" + queue, 0, -1)
            in_lanes = []
            for channel in CHANNELS:
                in_lanes += await redis.zrange(prefix + f"qc:{queue}:{channel}", 0, -1)
            assert sorted(members) == sorted(in_lanes), f"seed {seed}: queue and lanes disagree"
            for member in members:
                assert member not in queued, f"seed {seed}: {member} waits in two queues"
                queued[member] = queue
        offers = set(await redis.zrange(prefix + "offers", 0, -1))
        loads: dict[tuple[str, str], int] = {}
        alive = set()
        async for key in redis.scan_iter(match=prefix + "i:*"):
            iid = key.rsplit(":", 1)[1]
            alive.add(iid)
            item = await redis.hgetall(key)
            if item["state"] == "waiting":
                assert queued.get(iid) == item["q"], f"seed {seed}: waiting {iid} not in its queue"
                assert iid not in offers
                continue
            assert iid not in queued, f"seed {seed}: {item['state']} {iid} still queued"
            assert (iid in offers) == (item["state"] == "offered")
            holders = [item["agent"]] if item["agent"] else list(await redis.smembers(prefix + "ring:" + iid))
            assert holders, f"seed {seed}: {item['state']} {iid} is with nobody"
            assert item["state"] == "offered" or len(holders) == 1
            for agent in holders:
                assert agent in spec["agents"]
                loads[(agent, item["ch"])] = loads.get((agent, item["ch"]), 0) + 1
        assert set(queued) <= alive
        for agent, details in spec["agents"].items():
            load = await matcher.load(uuid.UUID(tenant), uuid.UUID(agent))
            available = await redis.sismember(prefix + "avail", agent)
            for channel, capacity in details["capacity"].items():
                assert load.get(channel, 0) == loads.get((agent, channel), 0), f"seed {seed}: load drifted"
                assert load.get(channel, 0) <= capacity, f"seed {seed}: over capacity"
                room = bool(available) and load.get(channel, 0) < capacity
                assert bool(await redis.sismember(prefix + "room:" + channel, agent)) == room, (
                    f"seed {seed}: {agent}'s room on {channel} disagrees with their load and availability"
                )
        # Finishing everything leaves nothing behind: no stray lane, ring or load.
        for iid in alive:
            await matcher.finish(uuid.UUID(tenant), uuid.UUID(iid))
        assert [k async for k in redis.scan_iter(match=prefix + "i:*")] == []
        assert [k async for k in redis.scan_iter(match=prefix + "ring:*")] == []
        assert [k async for k in redis.scan_iter(match=prefix + "q*")] == []
        assert await redis.zcard(prefix + "offers") == 0
        for agent in spec["agents"]:
            assert set((await matcher.load(uuid.UUID(tenant), uuid.UUID(agent))).values()) <= {0}
