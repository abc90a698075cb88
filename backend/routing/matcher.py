"""The matcher: waiting interactions and available agents in Redis, matched by atomic Lua scripts.

Every step that reads and changes routing state (offer, accept, reject, expire)
is one Lua script, so any number of API and worker processes can run the
matcher at once without offering one interaction twice or an agent over
capacity. All of a tenant's keys share the hash tag `{t:<tenant>}`: one
tenant's scripts run on one Redis Cluster node, and a tenant with a long queue
only walks its own keys.

Ranks give priority with aging: rank = enqueued_ms - priority x priority_step_ms.
Lower ranks go first, so equal priorities are first-in first-out, a higher
priority starts ahead by `priority_step_ms` per point, and anything that waits
long enough reaches the head whatever its priority. A rejected or expired
offer puts the interaction back with its old rank: its old place.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio import Redis

from backend.lib.redis_keys import global_key, tenant_key

STRATEGIES = ("longest_idle", "round_robin", "fewest_interactions", "best_skill", "ring_all")

# Lua helpers shared by the scripts. KEYS[1] is the tenant's routing prefix `cc:{t:<id>}:r:`; every key
# a script touches is built from it, so they all hash to the tenant's slot.
_COMMON = r"""
local P = KEYS[1]
local function required_ok(req_json, agent_skills_json, waited_s)
  if req_json == nil or req_json == false or req_json == '' or req_json == '[]' then return true, 0 end
  local req = cjson.decode(req_json)
  local skills = cjson.decode(agent_skills_json or '{}')
  local total = 0
  for _, r in ipairs(req) do
    local level = tonumber(skills[r[1]] or 0)
    local need = 0
    for _, step in ipairs(r[2]) do
      if waited_s >= step[1] then need = step[2] end
    end
    if level < need or level == 0 then return false, 0 end
    total = total + level
  end
  return true, total
end
local function has_room(agent, channel)
  local cap = tonumber(redis.call('HGET', P .. 'a:' .. agent, 'cap:' .. channel) or 0)
  local load = tonumber(redis.call('HGET', P .. 'a:' .. agent, 'load:' .. channel) or 0)
  return load < cap
end
local function make_offer(iid, agent, channel, now, timeout_ms)
  local ikey = P .. 'i:' .. iid
  local queue = redis.call('HGET', ikey, 'q')
  redis.call('ZREM', P .. 'q:' .. queue, iid)
  if redis.call('ZCARD', P .. 'q:' .. queue) == 0 then redis.call('SREM', P .. 'queues', queue) end
  redis.call('HSET', ikey, 'state', 'offered', 'agent', agent)
  redis.call('HINCRBY', P .. 'a:' .. agent, 'load:' .. channel, 1)
  redis.call('HSET', P .. 'a:' .. agent, 'lastoffer', now)
  redis.call('ZADD', P .. 'offers', now + timeout_ms, iid)
end
local function back_to_queue(iid)
  local ikey = P .. 'i:' .. iid
  local agent = redis.call('HGET', ikey, 'agent')
  local channel = redis.call('HGET', ikey, 'ch')
  local queue = redis.call('HGET', ikey, 'q')
  redis.call('HINCRBY', P .. 'a:' .. agent, 'load:' .. channel, -1)
  redis.call('HSET', ikey, 'state', 'waiting', 'agent', '')
  redis.call('ZADD', P .. 'q:' .. queue, tonumber(redis.call('HGET', ikey, 'rank')), iid)
  redis.call('SADD', P .. 'queues', queue)
  redis.call('ZREM', P .. 'offers', iid)
  return agent
end
"""

# ARGV: iid, now_ms, offer_timeout_ms, strategy. Returns the agent offered to, or false.
_OFFER_INTERACTION = (
    _COMMON
    + r"""
local iid, now, timeout_ms, strategy = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') ~= 'waiting' then return false end
local channel = redis.call('HGET', ikey, 'ch')
local req = redis.call('HGET', ikey, 'req')
local waited = (now - tonumber(redis.call('HGET', ikey, 'enq'))) / 1000
local best, best_key = false, nil
for _, agent in ipairs(redis.call('SMEMBERS', P .. 'avail')) do
  if has_room(agent, channel) then
    local ok, skill_total = required_ok(req, redis.call('HGET', P .. 'a:' .. agent, 'skills'), waited)
    if ok then
      local key
      if strategy == 'round_robin' then
        key = tonumber(redis.call('HGET', P .. 'a:' .. agent, 'lastoffer') or 0)
      elseif strategy == 'fewest_interactions' then
        key = tonumber(redis.call('HGET', P .. 'a:' .. agent, 'handled') or 0)
      elseif strategy == 'best_skill' then
        key = -skill_total
      else
        key = tonumber(redis.call('HGET', P .. 'a:' .. agent, 'idle') or 0)
      end
      if best_key == nil or key < best_key or (key == best_key and agent < best) then
        best, best_key = agent, key
      end
    end
  end
end
if best then make_offer(iid, best, channel, now, timeout_ms) end
return best
"""
)

# ARGV: agent, now_ms, scan_depth. Finds the most urgent waiting interaction this agent may take, offers it.
# Returns {iid, queue} or false. The offer timeout is the queue's, read from its cached settings.
_OFFER_AGENT = (
    _COMMON
    + r"""
local agent, now, depth = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('SISMEMBER', P .. 'avail', agent) == 0 then return false end
local skills = redis.call('HGET', P .. 'a:' .. agent, 'skills')
local best, best_rank = false, nil
for _, queue in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  local items = redis.call('ZRANGE', P .. 'q:' .. queue, 0, depth - 1, 'WITHSCORES')
  for i = 1, #items, 2 do
    local iid, rank = items[i], tonumber(items[i + 1])
    if best_rank ~= nil and rank >= best_rank then break end
    local ikey = P .. 'i:' .. iid
    local channel = redis.call('HGET', ikey, 'ch')
    if has_room(agent, channel) then
      local waited = (now - tonumber(redis.call('HGET', ikey, 'enq'))) / 1000
      if required_ok(redis.call('HGET', ikey, 'req'), skills, waited) then
        best, best_rank = iid, rank
        break
      end
    end
  end
end
if not best then return false end
local ikey = P .. 'i:' .. best
local timeout_ms = tonumber(redis.call('HGET', ikey, 'timeout') or 20000)
make_offer(best, agent, redis.call('HGET', ikey, 'ch'), now, timeout_ms)
return {best, redis.call('HGET', ikey, 'q')}
"""
)

# ARGV: iid, agent, now_ms. Returns 'ok', or why not: 'not_offered', 'not_yours', 'expired'.
_ACCEPT = (
    _COMMON
    + r"""
local iid, agent, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') ~= 'offered' then return 'not_offered' end
if redis.call('HGET', ikey, 'agent') ~= agent then return 'not_yours' end
local expiry = tonumber(redis.call('ZSCORE', P .. 'offers', iid) or 0)
if expiry <= now then return 'expired' end
redis.call('ZREM', P .. 'offers', iid)
redis.call('HSET', ikey, 'state', 'connected')
redis.call('HINCRBY', P .. 'a:' .. agent, 'handled', 1)
return 'ok'
"""
)

# ARGV: iid, agent. Puts an offered interaction back at its old place. Returns 'ok' or why not.
_REJECT = (
    _COMMON
    + r"""
local iid, agent = ARGV[1], ARGV[2]
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') ~= 'offered' then return 'not_offered' end
if redis.call('HGET', ikey, 'agent') ~= agent then return 'not_yours' end
back_to_queue(iid)
return 'ok'
"""
)

# ARGV: now_ms, limit. Returns expired offers as a flat list iid, agent, ... (each put back at its place).
_EXPIRE = (
    _COMMON
    + r"""
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for _, iid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'offers', '-inf', now, 'LIMIT', 0, limit)) do
  local agent = back_to_queue(iid)
  table.insert(out, iid)
  table.insert(out, agent)
end
return out
"""
)

# ARGV: iid. Ends an interaction wherever it is: waiting (leaves its queue) or with an agent (frees capacity).
# Returns the agent it was with, or ''.
_FINISH = (
    _COMMON
    + r"""
local iid = ARGV[1]
local ikey = P .. 'i:' .. iid
local state = redis.call('HGET', ikey, 'state')
if not state then return '' end
local agent = redis.call('HGET', ikey, 'agent') or ''
local channel = redis.call('HGET', ikey, 'ch')
local queue = redis.call('HGET', ikey, 'q')
redis.call('ZREM', P .. 'q:' .. queue, iid)
if redis.call('ZCARD', P .. 'q:' .. queue) == 0 then redis.call('SREM', P .. 'queues', queue) end
redis.call('ZREM', P .. 'offers', iid)
if agent ~= '' and (state == 'offered' or state == 'connected') then
  redis.call('HINCRBY', P .. 'a:' .. agent, 'load:' .. channel, -1)
end
redis.call('DEL', ikey)
return agent
"""
)


# ARGV: iid, queue, channel, rank, enq, agent. Records an interaction already with an agent (recovery); idempotent.
_RESTORE_CONNECTED = (
    _COMMON
    + r"""
local iid, queue, channel, rank, enq, agent = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') == 'connected' then return 0 end
redis.call('ZREM', P .. 'q:' .. queue, iid)
redis.call('HSET', ikey, 'q', queue, 'ch', channel, 'rank', rank, 'enq', enq, 'state', 'connected', 'agent', agent)
redis.call('HINCRBY', P .. 'a:' .. agent, 'load:' .. channel, 1)
return 1
"""
)


# KEYS[1]: a sorted set of timers. ARGV: now_ms, limit. Pops the due members atomically.
_POP_DUE = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

STATE_MARKER = global_key("routing", "state")
"""Present while Redis holds routing state built from PostgreSQL; gone after a restart without data or a flush."""
REBUILD_LOCK = global_key("routing", "rebuilding")
TIMER_INDEX = global_key("routing", "timers")
"""Tenants with pending routing timers, scored by their earliest due time (one small global index)."""


@dataclass(frozen=True, slots=True)
class WaitingInteraction:
    """What the matcher needs to know about an interaction to queue it."""

    interaction_id: uuid.UUID
    queue_id: uuid.UUID
    channel: str
    priority: int
    enqueued_ms: int
    offer_timeout_ms: int
    strategy: str
    requirements: Sequence[tuple[str, Sequence[tuple[int, int]]]] = ()
    """(skill id, [(after seconds, minimum level), ...]) for each required skill."""


@dataclass(frozen=True, slots=True)
class AgentRouting:
    """What the matcher needs to know about an agent."""

    user_id: uuid.UUID
    available: bool
    capacity: dict[str, int]
    skills: dict[str, int]
    idle_since_ms: int


class Matcher:
    """Atomic routing steps on Redis for one deployment; every method names its tenant."""

    def __init__(self, redis: Redis, priority_step_ms: int = 10_000, scan_depth: int = 50) -> None:
        self._redis = redis
        self._priority_step_ms = priority_step_ms
        self._scan_depth = scan_depth
        self._offer_interaction = redis.register_script(_OFFER_INTERACTION)
        self._offer_agent = redis.register_script(_OFFER_AGENT)
        self._accept = redis.register_script(_ACCEPT)
        self._reject = redis.register_script(_REJECT)
        self._expire = redis.register_script(_EXPIRE)
        self._finish = redis.register_script(_FINISH)
        self._restore_connected = redis.register_script(_RESTORE_CONNECTED)
        self._pop_due = redis.register_script(_POP_DUE)

    @staticmethod
    def prefix(tenant_id: uuid.UUID) -> str:
        """The tenant's routing key prefix (hash-tagged)."""
        return tenant_key(tenant_id, "r") + ":"

    def rank(self, enqueued_ms: int, priority: int) -> int:
        """Lower goes first: arrival time, moved ahead by priority."""
        return enqueued_ms - priority * self._priority_step_ms

    async def enqueue(self, tenant_id: uuid.UUID, item: WaitingInteraction, *, rank: int | None = None) -> None:
        """Put an interaction in its queue (at `rank` when restoring an old place)."""
        p = self.prefix(tenant_id)
        iid, queue = str(item.interaction_id), str(item.queue_id)
        requirements = json.dumps([[skill, [list(step) for step in steps]] for skill, steps in item.requirements])
        score = rank if rank is not None else self.rank(item.enqueued_ms, item.priority)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                p + "i:" + iid,
                mapping={
                    "q": queue,
                    "ch": item.channel,
                    "rank": score,
                    "enq": item.enqueued_ms,
                    "req": requirements,
                    "state": "waiting",
                    "agent": "",
                    "timeout": item.offer_timeout_ms,
                    "strategy": item.strategy,
                },
            )
            pipe.zadd(p + "q:" + queue, {iid: score})
            pipe.sadd(p + "queues", queue)
            await pipe.execute()

    async def set_agent(self, tenant_id: uuid.UUID, agent: AgentRouting) -> None:
        """Record an agent's availability, capacity and skills (load is kept as it is)."""
        p = self.prefix(tenant_id)
        uid = str(agent.user_id)
        mapping: dict[str | bytes, str | int] = {"skills": json.dumps(agent.skills), "idle": agent.idle_since_ms}
        for channel, capacity in agent.capacity.items():
            mapping["cap:" + channel] = capacity
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(p + "a:" + uid, mapping=mapping)  # type: ignore[arg-type]
            if agent.available:
                pipe.sadd(p + "avail", uid)
            else:
                pipe.srem(p + "avail", uid)
            await pipe.execute()

    async def offer_interaction(self, tenant_id: uuid.UUID, item: WaitingInteraction, now_ms: int) -> uuid.UUID | None:
        """Offer a waiting interaction to the best eligible agent by its queue's strategy, if any."""
        agent = await self._offer_interaction(
            keys=[self.prefix(tenant_id)],
            args=[str(item.interaction_id), now_ms, item.offer_timeout_ms, item.strategy],
        )
        return uuid.UUID(agent) if agent else None

    async def offer_agent(self, tenant_id: uuid.UUID, agent_id: uuid.UUID, now_ms: int) -> uuid.UUID | None:
        """Offer the most urgent waiting interaction this agent may take, if any."""
        found = await self._offer_agent(keys=[self.prefix(tenant_id)], args=[str(agent_id), now_ms, self._scan_depth])
        return uuid.UUID(found[0]) if found else None

    async def accept(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID, now_ms: int) -> str:
        """`ok`, or why the offer cannot be accepted: `not_offered`, `not_yours`, `expired`."""
        result = await self._accept(keys=[self.prefix(tenant_id)], args=[str(interaction_id), str(agent_id), now_ms])
        return str(result)

    async def reject(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID) -> str:
        """`ok` (back at its old place), or why not."""
        return str(await self._reject(keys=[self.prefix(tenant_id)], args=[str(interaction_id), str(agent_id)]))

    async def expire_offers(
        self, tenant_id: uuid.UUID, now_ms: int, limit: int = 100
    ) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Offers past their time, each put back at its old place: [(interaction, agent)]."""
        flat = await self._expire(keys=[self.prefix(tenant_id)], args=[now_ms, limit])
        return [(uuid.UUID(flat[i]), uuid.UUID(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def finish(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> uuid.UUID | None:
        """Take an interaction out of routing (ended or abandoned); returns the agent it freed, if any."""
        agent = await self._finish(keys=[self.prefix(tenant_id)], args=[str(interaction_id)])
        return uuid.UUID(agent) if agent else None

    async def finish_keep_rank(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> int | None:
        """Take a waiting interaction out of its queue and return its rank, to put it back in the same place."""
        rank = await self._redis.hget(self.prefix(tenant_id) + "i:" + str(interaction_id), "rank")
        await self.finish(tenant_id, interaction_id)
        return int(rank) if rank is not None else None

    async def restore_connected(self, tenant_id: uuid.UUID, item: WaitingInteraction, agent_id: uuid.UUID) -> None:
        """Record (after a Redis loss) that an interaction is with an agent, using their capacity."""
        await self._restore_connected(
            keys=[self.prefix(tenant_id)],
            args=[
                str(item.interaction_id),
                str(item.queue_id),
                item.channel,
                self.rank(item.enqueued_ms, item.priority),
                item.enqueued_ms,
                str(agent_id),
            ],
        )

    async def schedule(self, tenant_id: uuid.UUID, timer: str, due_ms: int) -> None:
        """Ask for `tick` at `due_ms` for this timer (`wait:<interaction>` or `wrapup:<agent>`)."""
        await self._redis.zadd(self.prefix(tenant_id) + "due", {timer: due_ms})
        await self.wake(tenant_id, due_ms)

    async def clear(self, tenant_id: uuid.UUID) -> None:
        """Forget all of a tenant's routing state (before rebuilding it from PostgreSQL)."""
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=self.prefix(tenant_id) + "*", count=500):
            batch.append(key)
            if len(batch) >= 500:
                await self._redis.delete(*batch)
                batch = []
        if batch:
            await self._redis.delete(*batch)

    async def state_marker_present(self) -> bool:
        """Whether Redis still holds the routing state written since the last rebuild."""
        return bool(await self._redis.exists(STATE_MARKER))

    async def set_state_marker(self) -> None:
        """Record that Redis holds complete routing state."""
        await self._redis.set(STATE_MARKER, str(int(time.time())))

    async def take_rebuild_lock(self) -> bool:
        """One process rebuilds at a time."""
        return bool(await self._redis.set(REBUILD_LOCK, "1", nx=True, ex=120))

    async def release_rebuild_lock(self) -> None:
        """Let another process rebuild if needed."""
        await self._redis.delete(REBUILD_LOCK)

    async def schedule_once(self, tenant_id: uuid.UUID, timer: str, due_ms: int) -> None:
        """Like `schedule`, but an already pending timer of that name keeps its earlier time."""
        if await self._redis.zadd(self.prefix(tenant_id) + "due", {timer: due_ms}, nx=True):
            await self.wake(tenant_id, due_ms)

    async def wake(self, tenant_id: uuid.UUID, due_ms: int) -> None:
        """Note in the global timer index that the tenant needs a tick by `due_ms` (keeps the earliest)."""
        await self._redis.zadd(TIMER_INDEX, {str(tenant_id): due_ms}, lt=True)

    async def due_timers(self, tenant_id: uuid.UUID, now_ms: int, limit: int = 500) -> list[str]:
        """Timers of the tenant that are due, removed from the schedule (each returned to one caller only)."""
        key = self.prefix(tenant_id) + "due"
        popped = await self._pop_due(keys=[key], args=[now_ms, limit])
        return [str(t) for t in popped]

    async def next_due(self, tenant_id: uuid.UUID) -> int | None:
        """The earliest pending offer expiry or timer of the tenant."""
        p = self.prefix(tenant_id)
        firsts = [await self._redis.zrange(p + key, 0, 0, withscores=True) for key in ("offers", "due")]
        scores = [int(f[0][1]) for f in firsts if f]
        return min(scores) if scores else None

    async def due_tenants(self, now_ms: int, limit: int = 100) -> list[uuid.UUID]:
        """Tenants whose earliest timer has come, removed from the index (their tick re-adds what remains)."""
        popped = await self._pop_due(keys=[TIMER_INDEX], args=[now_ms, limit])
        return [uuid.UUID(t) for t in popped]

    async def earliest_timer(self) -> int | None:
        """When the next tick of any tenant is due."""
        first = await self._redis.zrange(TIMER_INDEX, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def waiting(self, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> list[uuid.UUID]:
        """The queue's waiting interactions, first first."""
        members = cast(list[str], await self._redis.zrange(self.prefix(tenant_id) + "q:" + str(queue_id), 0, -1))
        return [uuid.UUID(m) for m in members]

    async def position(self, tenant_id: uuid.UUID, queue_id: uuid.UUID, interaction_id: uuid.UUID) -> int | None:
        """1-based place in the queue, or None when not waiting there."""
        key = self.prefix(tenant_id) + "q:" + str(queue_id)
        rank = cast(int | None, await self._redis.zrank(key, str(interaction_id)))
        return None if rank is None else rank + 1

    async def load(self, tenant_id: uuid.UUID, agent_id: uuid.UUID) -> dict[str, int]:
        """The agent's current load per channel."""
        raw = cast(dict[str, str], await self._redis.hgetall(self.prefix(tenant_id) + "a:" + str(agent_id)))
        return {k.removeprefix("load:"): int(v) for k, v in raw.items() if k.startswith("load:")}
