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
from typing import Any, cast

from redis.asyncio import Redis

from backend.lib.redis_keys import global_key, tenant_key
from backend.lib.redis_scripts import ScriptRunner

STRATEGIES = ("longest_idle", "round_robin", "fewest_interactions", "best_skill", "ring_all")

# Lua helpers shared by the scripts. KEYS[1] is the tenant's routing prefix `cc:{t:<id>}:r:`; every key
# a script touches is built from it, so they all hash to the tenant's slot.
#
# An interaction hash `i:<id>` holds its queue, channel, rank, priority, enqueue time, requirements, state
# (waiting, offered, connected) and the agent it is with. A waiting interaction is in two sorted sets by rank:
# `q:<queue>` (the queue as customers see it: positions) and `qc:<queue>:<channel>`, the lane agents scan,
# so an agent with room only for chats never wades through waiting calls; `lanes:<channel>` lists the queues
# with someone waiting on that channel. `room:<channel>` holds the available agents whose load there is below
# their capacity: the ones an arrival may be offered to, so an offer reads those agents, not every available one
# (at a busy hour, nearly every agent is available and busy). A ring-all voice offer rings several agents at
# once: they are the members of `ring:<id>` and its `agent` stays empty until one of them accepts. Every
# agent an interaction is offered to (or connected with) carries one unit of load on its channel.
_COMMON = r"""
local P = KEYS[1]
-- JSON (requirements, agents' skills) decoded once per script run, however many times it is compared.
local decoded = {}
local function decode(json)
  local value = decoded[json]
  if value == nil then
    value = cjson.decode(json)
    decoded[json] = value
  end
  return value
end
local function required_ok(req_json, agent_skills_json, waited_s)
  if req_json == nil or req_json == false or req_json == '' or req_json == '[]' then return true, 0 end
  local req = decode(req_json)
  local skills = decode(agent_skills_json or '{}')
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
-- (Fields of one hash are read with one HMGET: each redis.call costs more than the Lua around it.)
-- Puts the agent in, or takes them out of, the channel's room set after their load, capacity or availability
-- changed there.
local function update_room(agent, channel)
  local f = redis.call('HMGET', P .. 'a:' .. agent, 'cap:' .. channel, 'load:' .. channel)
  if tonumber(f[2] or 0) < tonumber(f[1] or 0) and redis.call('SISMEMBER', P .. 'avail', agent) == 1 then
    redis.call('SADD', P .. 'room:' .. channel, agent)
  else
    redis.call('SREM', P .. 'room:' .. channel, agent)
  end
end
-- The same for every channel the agent has a capacity on.
local function update_rooms(agent)
  local fields = redis.call('HGETALL', P .. 'a:' .. agent)
  for f = 1, #fields, 2 do
    local channel = string.match(fields[f], '^cap:(.+)$')
    if channel then update_room(agent, channel) end
  end
end
local function add_load(agent, channel, delta)
  redis.call('HINCRBY', P .. 'a:' .. agent, 'load:' .. channel, delta)
  update_room(agent, channel)
end
local function has_room(agent, channel)
  local f = redis.call('HMGET', P .. 'a:' .. agent, 'cap:' .. channel, 'load:' .. channel)
  return tonumber(f[2] or 0) < tonumber(f[1] or 0)
end
local function rings_all(ikey)
  local f = redis.call('HMGET', ikey, 'strategy', 'ch')
  return f[1] == 'ring_all' and f[2] == 'voice'
end
-- Every available agent with room who qualifies for the waiting interaction `iid`.
local function eligible_agents(iid, now)
  local i = redis.call('HMGET', P .. 'i:' .. iid, 'ch', 'req', 'enq')
  local channel, req = i[1], i[2]
  local waited = (now - tonumber(i[3])) / 1000
  local found = {}
  for _, agent in ipairs(redis.call('SMEMBERS', P .. 'room:' .. channel)) do
    local a = redis.call('HMGET', P .. 'a:' .. agent, 'cap:' .. channel, 'load:' .. channel, 'skills')
    if tonumber(a[2] or 0) < tonumber(a[1] or 0) then
      local ok = required_ok(req, a[3], waited)
      if ok then table.insert(found, agent) end
    end
  end
  table.sort(found)
  return found
end
local function join_queue(iid)
  local i = redis.call('HMGET', P .. 'i:' .. iid, 'q', 'ch', 'rank')
  local queue, channel, rank = i[1], i[2], tonumber(i[3])
  redis.call('ZADD', P .. 'q:' .. queue, rank, iid)
  redis.call('ZADD', P .. 'qc:' .. queue .. ':' .. channel, rank, iid)
  redis.call('SADD', P .. 'lanes:' .. channel, queue)
end
local function leave_queue(iid)
  local i = redis.call('HMGET', P .. 'i:' .. iid, 'q', 'ch')
  local queue, channel = i[1], i[2]
  if not queue then return end
  redis.call('ZREM', P .. 'q:' .. queue, iid)
  local lane = P .. 'qc:' .. queue .. ':' .. channel
  redis.call('ZREM', lane, iid)
  if redis.call('ZCARD', lane) == 0 then redis.call('SREM', P .. 'lanes:' .. channel, queue) end
end
-- The most urgent (lowest-rank) waiting interaction `agent` may take now: on a channel where they have room,
-- with skills that meet its requirements at its current wait. Looks at most `depth` entries per lane.
local function most_urgent_for(agent, now, depth)
  local fields = redis.call('HGETALL', P .. 'a:' .. agent)
  local hash = {}
  for f = 1, #fields, 2 do hash[fields[f]] = fields[f + 1] end
  local skills = hash['skills']
  local best, best_rank = false, nil
  for f = 1, #fields, 2 do
    local channel = string.match(fields[f], '^cap:(.+)$')
    if channel and tonumber(hash['load:' .. channel] or 0) < tonumber(fields[f + 1]) then
      for _, queue in ipairs(redis.call('SMEMBERS', P .. 'lanes:' .. channel)) do
        -- Read the head alone, then a few entries at a time: the head usually qualifies (or ranks behind the
        -- best found so far), and every entry read costs (a reply is converted to Lua strings). Requirements
        -- only relax with waiting (queue settings refuse a rising step), so once an interaction fails, any with
        -- the same requirements that arrived later fails too and is passed over without a second look.
        local lane, from, done, chunk = P .. 'qc:' .. queue .. ':' .. channel, 0, false, 1
        local failed_req, failed_enq = nil, nil
        while not done and from < depth do
          local upto = math.min(from + chunk, depth) - 1
          chunk = 8
          local items = redis.call('ZRANGE', lane, from, upto, 'WITHSCORES')
          if #items == 0 then break end
          for i = 1, #items, 2 do
            local iid, rank = items[i], tonumber(items[i + 1])
            if best_rank ~= nil and rank >= best_rank then
              done = true
              break
            end
            local fields = redis.call('HMGET', P .. 'i:' .. iid, 'enq', 'req')
            local enq, req = tonumber(fields[1]), fields[2]
            if not (req == failed_req and enq >= failed_enq) then
              if required_ok(req, skills, (now - enq) / 1000) then
                best, best_rank, done = iid, rank, true
                break
              end
              if req ~= failed_req or enq < failed_enq then failed_req, failed_enq = req, enq end
            end
          end
          from = upto + 1
        end
      end
    end
  end
  return best
end
-- The agents who may be offered `iid` now: eligible, and with nothing more urgent waiting for them (an agent
-- for whom something that arrived earlier is waiting is left to take that: first in, first out).
local function ringable_agents(iid, now, depth)
  local found = {}
  for _, agent in ipairs(eligible_agents(iid, now)) do
    if most_urgent_for(agent, now, depth) == iid then table.insert(found, agent) end
  end
  return found
end
-- Offers `iid` to the agents in `agents` (one, or several for ring-all) until now + timeout.
local function make_offer(iid, agents, now, timeout_ms)
  local ikey = P .. 'i:' .. iid
  local channel = redis.call('HGET', ikey, 'ch')
  leave_queue(iid)
  if #agents == 1 and not rings_all(ikey) then
    redis.call('HSET', ikey, 'state', 'offered', 'agent', agents[1])
  else
    redis.call('HSET', ikey, 'state', 'offered', 'agent', '')
    redis.call('SADD', P .. 'ring:' .. iid, unpack(agents))
  end
  for _, agent in ipairs(agents) do
    add_load(agent, channel, 1)
    redis.call('HSET', P .. 'a:' .. agent, 'lastoffer', now)
  end
  redis.call('ZADD', P .. 'offers', now + timeout_ms, iid)
end
-- `candidates` in the order the queue's strategy prefers them for `iid` (ties: lowest id first).
local function by_strategy(iid, candidates, now)
  local i = redis.call('HMGET', P .. 'i:' .. iid, 'strategy', 'req', 'enq')
  local strategy, req = i[1], i[2]
  local waited = (now - tonumber(i[3])) / 1000
  local keys = {}
  for _, agent in ipairs(candidates) do
    local akey = P .. 'a:' .. agent
    if strategy == 'round_robin' then
      keys[agent] = tonumber(redis.call('HGET', akey, 'lastoffer') or 0)
    elseif strategy == 'fewest_interactions' then
      keys[agent] = tonumber(redis.call('HGET', akey, 'handled') or 0)
    elseif strategy == 'best_skill' then
      local _, skill_total = required_ok(req, redis.call('HGET', akey, 'skills'), waited)
      keys[agent] = -skill_total
    else
      keys[agent] = tonumber(redis.call('HGET', akey, 'idle') or 0)
    end
  end
  local ordered = {}
  for _, agent in ipairs(candidates) do table.insert(ordered, agent) end
  table.sort(ordered, function(a, b)
    if keys[a] ~= keys[b] then return keys[a] < keys[b] end
    return a < b
  end)
  return ordered
end
-- Offers the waiting `iid` to the agents it may go to now and appends {iid, timeout_ms, n, agents...} to
-- `out`: every agent it may go to for a ring-all call, else `preferred` (an agent it is known to be the most
-- urgent work for) or the first agent in the strategy's order for whom nothing older is waiting. False when
-- nobody may take it.
local function offer_now(iid, now, depth, out, preferred)
  local ikey = P .. 'i:' .. iid
  local agents
  if rings_all(ikey) then
    agents = ringable_agents(iid, now, depth)
  elseif preferred then
    agents = {preferred}
  else
    agents = {}
    for _, agent in ipairs(by_strategy(iid, eligible_agents(iid, now), now)) do
      if most_urgent_for(agent, now, depth) == iid then
        agents = {agent}
        break
      end
    end
  end
  if #agents == 0 then return false end
  local timeout_ms = tonumber(redis.call('HGET', ikey, 'timeout') or 20000)
  make_offer(iid, agents, now, timeout_ms)
  table.insert(out, iid)
  table.insert(out, timeout_ms)
  table.insert(out, #agents)
  for _, agent in ipairs(agents) do table.insert(out, agent) end
  return true
end
-- The agents an offered interaction is with: its one agent, or everyone still ringing.
local function offered_to(iid)
  local agent = redis.call('HGET', P .. 'i:' .. iid, 'agent')
  if agent and agent ~= '' then return {agent} end
  return redis.call('SMEMBERS', P .. 'ring:' .. iid)
end
local function release(agents, channel)
  for _, agent in ipairs(agents) do add_load(agent, channel, -1) end
end
-- Withdraws the offer from everyone it is with and puts the interaction back at its old rank.
local function back_to_queue(iid)
  local ikey = P .. 'i:' .. iid
  local agents = offered_to(iid)
  release(agents, redis.call('HGET', ikey, 'ch'))
  redis.call('DEL', P .. 'ring:' .. iid)
  redis.call('HSET', ikey, 'state', 'waiting', 'agent', '')
  join_queue(iid)
  redis.call('ZREM', P .. 'offers', iid)
  return agents
end
-- Ends an interaction wherever it is: waiting (leaves its queue), offered (every agent it rings is freed) or
-- connected (its agent is freed). Returns the agent it was with, or ''.
local function finish(iid)
  local ikey = P .. 'i:' .. iid
  local i = redis.call('HMGET', ikey, 'state', 'agent', 'ch')
  local state = i[1]
  if not state then return '' end
  local agent = i[2] or ''
  leave_queue(iid)
  redis.call('ZREM', P .. 'offers', iid)
  if state == 'offered' or state == 'connected' then release(offered_to(iid), i[3]) end
  redis.call('DEL', ikey, P .. 'ring:' .. iid)
  return agent
end
-- Offers an available agent the most urgent waiting interaction they may take, appending it to `out` as
-- offer_now does (a ring-all call rings every other agent it may go to as well).
local function offer_agent(agent, now, depth, out)
  if redis.call('SISMEMBER', P .. 'avail', agent) == 0 then return end
  local best = most_urgent_for(agent, now, depth)
  if best then offer_now(best, now, depth, out, agent) end
end
"""

# ARGV: iid, then field/value pairs of the interaction hash. Puts it in its queue's lanes at its rank; an
# interaction already with an agent is left alone (returns 0), one waiting elsewhere moves.
_ENQUEUE = (
    _COMMON
    + r"""
local iid = ARGV[1]
local ikey = P .. 'i:' .. iid
local state = redis.call('HGET', ikey, 'state')
if state == 'offered' or state == 'connected' then return 0 end
leave_queue(iid)
redis.call('HSET', ikey, unpack(ARGV, 2))
redis.call('HSET', ikey, 'state', 'waiting', 'agent', '')
join_queue(iid)
return 1
"""
)

# ARGV: iid, now_ms, scan_depth. Offers the interaction to whom it may go now: the best eligible agent by its
# queue's strategy, or every eligible agent for a ring-all voice queue. An eligible agent for whom something
# older is waiting is offered that first (first in, first out), and the search goes on. Returns the offers
# made as {iid, timeout_ms, number of agents, agents...} repeated.
_OFFER_INTERACTION = (
    _COMMON
    + r"""
local iid, now, depth = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ikey = P .. 'i:' .. iid
local out = {}
for _ = 1, 10 do
  if redis.call('HGET', ikey, 'state') ~= 'waiting' then break end
  local eligible = eligible_agents(iid, now)
  if #eligible == 0 or offer_now(iid, now, depth, out, nil) then break end
  local agent = by_strategy(iid, eligible, now)[1]
  local older = most_urgent_for(agent, now, depth)
  if not older or not offer_now(older, now, depth, out, agent) then break end
end
return out
"""
)

# ARGV: agent, now_ms, scan_depth. Offers this agent the most urgent waiting interaction they may take (a
# ring-all call rings every other agent it may go to as well). Returns the offer as above, or {}.
_OFFER_AGENT = (
    _COMMON
    + r"""
local out = {}
offer_agent(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), out)
return out
"""
)

# ARGV: iid, agent, now_ms. Returns {'ok', agents whose ringing stopped...}, or {why not}: 'not_offered',
# 'not_yours', 'expired'.
_ACCEPT = (
    _COMMON
    + r"""
local iid, agent, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') ~= 'offered' then return {'not_offered'} end
local ringing = offered_to(iid)
local mine = false
for _, a in ipairs(ringing) do if a == agent then mine = true end end
if not mine then return {'not_yours'} end
local expiry = tonumber(redis.call('ZSCORE', P .. 'offers', iid) or 0)
if expiry <= now then return {'expired'} end
local out = {'ok'}
for _, a in ipairs(ringing) do
  if a ~= agent then
    add_load(a, redis.call('HGET', ikey, 'ch'), -1)
    table.insert(out, a)
  end
end
redis.call('DEL', P .. 'ring:' .. iid)
redis.call('ZREM', P .. 'offers', iid)
redis.call('HSET', ikey, 'state', 'connected', 'agent', agent)
redis.call('HINCRBY', P .. 'a:' .. agent, 'handled', 1)
return out
"""
)

# ARGV: iid, agent. The agent declines. Returns 'ok' (back at its old place), 'ringing' (a ring-all offer
# still rings others), or why not.
_REJECT = (
    _COMMON
    + r"""
local iid, agent = ARGV[1], ARGV[2]
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') ~= 'offered' then return 'not_offered' end
local ring = P .. 'ring:' .. iid
if redis.call('HGET', ikey, 'agent') == '' then
  if redis.call('SISMEMBER', ring, agent) == 0 then return 'not_yours' end
  if redis.call('SCARD', ring) > 1 then
    redis.call('SREM', ring, agent)
    release({agent}, redis.call('HGET', ikey, 'ch'))
    return 'ringing'
  end
elseif redis.call('HGET', ikey, 'agent') ~= agent then
  return 'not_yours'
end
back_to_queue(iid)
return 'ok'
"""
)

# ARGV: now_ms, limit. Returns expired offers as a flat list iid, agent, ... (a ring-all offer once per agent
# it rang); each interaction is back at its old place.
_EXPIRE = (
    _COMMON
    + r"""
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for _, iid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'offers', '-inf', now, 'LIMIT', 0, limit)) do
  for _, agent in ipairs(back_to_queue(iid)) do
    table.insert(out, iid)
    table.insert(out, agent)
  end
end
return out
"""
)

# ARGV: iid. Ends an interaction wherever it is: waiting (leaves its queue), offered (every agent it rings is
# freed) or connected (its agent is freed). Returns the agent it was with, or ''.
_FINISH = (
    _COMMON
    + r"""
return finish(ARGV[1])
"""
)

# ARGV: iid, agent, now_ms, scan_depth, wrap_up ('1' when the agent goes to wrap-up once they hold nothing).
# An agent comes free: ends `iid` as _FINISH does, then offers `agent` their next interaction as _OFFER_AGENT
# does, in one step instead of two round trips. An agent who then holds nothing and goes to wrap-up is offered
# nothing and leaves the available set at once, so no other process offers them work before the engine records
# the wrap-up. Returns {agent the interaction was with or '', 1 if `agent` held nothing once it ended else 0,
# then the offers made as _OFFER_AGENT returns them}.
_FINISH_AND_OFFER = (
    _COMMON
    + r"""
local agent, now, depth = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {finish(ARGV[1]), 1}
local fields = redis.call('HGETALL', P .. 'a:' .. agent)
for f = 1, #fields, 2 do
  if string.sub(fields[f], 1, 5) == 'load:' and tonumber(fields[f + 1]) > 0 then out[2] = 0 end
end
if ARGV[5] == '1' and out[2] == 1 then
  redis.call('SREM', P .. 'avail', agent)
  update_rooms(agent)
else
  offer_agent(agent, now, depth, out)
end
return out
"""
)


# ARGV: iid, queue, channel, rank, enq, agent. Records an interaction already with an agent (recovery); idempotent.
_RESTORE_CONNECTED = (
    _COMMON
    + r"""
local iid, queue, channel, rank, enq, agent = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local ikey = P .. 'i:' .. iid
if redis.call('HGET', ikey, 'state') == 'connected' then return 0 end
leave_queue(iid)
redis.call('HSET', ikey, 'q', queue, 'ch', channel, 'rank', rank, 'enq', enq, 'state', 'connected', 'agent', agent)
add_load(agent, channel, 1)
return 1
"""
)


# ARGV: agent, '1' if available else '0', then field/value pairs of the agent's hash (load fields are left as
# they are). A script rather than a MULTI/EXEC pipeline so that it shares round trips with other calls.
_SET_AGENT = (
    _COMMON
    + r"""
local agent = ARGV[1]
redis.call('HSET', P .. 'a:' .. agent, unpack(ARGV, 3))
if ARGV[2] == '1' then
  redis.call('SADD', P .. 'avail', agent)
else
  redis.call('SREM', P .. 'avail', agent)
end
update_rooms(agent)
return 1
"""
)

# KEYS[1]: a sorted set of timers. ARGV: now_ms, limit. Pops the due members atomically.
_POP_DUE = r"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due > 0 then redis.call('ZREM', KEYS[1], unpack(due)) end
return due
"""

STATE_MARKER = global_key("routing", "state", "2")
"""Present while Redis holds routing state built from PostgreSQL; gone after a restart without data or a flush.
Its version changes with the layout of that state (2: agents' room sets), so a deployment rebuilds it once."""
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


@dataclass(frozen=True, slots=True)
class Offer:
    """An interaction offered to one agent, or rung at several at once (ring-all)."""

    interaction_id: uuid.UUID
    agents: tuple[uuid.UUID, ...]
    timeout_ms: int


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The outcome of an agent accepting an offer."""

    verdict: str
    """`ok`, or why not: `not_offered`, `not_yours`, `expired`."""
    withdrawn: tuple[uuid.UUID, ...] = ()
    """Agents a ring-all offer stopped ringing because this one took it."""

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


@dataclass(frozen=True, slots=True)
class Freed:
    """The outcome of an agent coming free (`Matcher.finish_and_offer`)."""

    was_with: uuid.UUID | None
    """The agent the finished interaction was with, if any."""
    held_nothing: bool
    """Whether the agent held nothing (no load on any channel) once the interaction ended, before any offer."""
    offer: Offer | None
    """The agent's next interaction, offered in the same step (None when nothing fits or they go to wrap-up)."""


class Matcher:
    """Atomic routing steps on Redis for one deployment; every method names its tenant."""

    def __init__(self, redis: Redis, priority_step_ms: int = 10_000, scan_depth: int = 50) -> None:
        self._redis = redis
        self._priority_step_ms = priority_step_ms
        self._scan_depth = scan_depth
        self._enqueue = redis.register_script(_ENQUEUE)
        self._offer_interaction = redis.register_script(_OFFER_INTERACTION)
        self._offer_agent = redis.register_script(_OFFER_AGENT)
        self._accept = redis.register_script(_ACCEPT)
        self._reject = redis.register_script(_REJECT)
        self._expire = redis.register_script(_EXPIRE)
        self._finish = redis.register_script(_FINISH)
        self._finish_and_offer = redis.register_script(_FINISH_AND_OFFER)
        self._restore_connected = redis.register_script(_RESTORE_CONNECTED)
        self._set_agent = redis.register_script(_SET_AGENT)
        self._pop_due = redis.register_script(_POP_DUE)
        self._run = ScriptRunner(redis)

    @property
    def redis(self) -> Redis:
        """The Redis client the matcher works on (routing signals are published on it too)."""
        return self._redis

    @staticmethod
    def prefix(tenant_id: uuid.UUID) -> str:
        """The tenant's routing key prefix (hash-tagged)."""
        return tenant_key(tenant_id, "r") + ":"

    def rank(self, enqueued_ms: int, priority: int) -> int:
        """Lower goes first: arrival time, moved ahead by priority."""
        return enqueued_ms - priority * self._priority_step_ms

    async def enqueue(self, tenant_id: uuid.UUID, item: WaitingInteraction, *, rank: int | None = None) -> None:
        """Put an interaction in its queue (at `rank` when restoring an old place)."""
        requirements = json.dumps([[skill, [list(step) for step in steps]] for skill, steps in item.requirements])
        fields: dict[str, str | int] = {
            "q": str(item.queue_id),
            "ch": item.channel,
            "rank": rank if rank is not None else self.rank(item.enqueued_ms, item.priority),
            "prio": item.priority,
            "enq": item.enqueued_ms,
            "req": requirements,
            "timeout": item.offer_timeout_ms,
            "strategy": item.strategy,
        }
        flat = [part for pair in fields.items() for part in pair]
        await self._run(self._enqueue, [self.prefix(tenant_id)], [str(item.interaction_id), *flat])

    async def set_agent(self, tenant_id: uuid.UUID, agent: AgentRouting) -> None:
        """Record an agent's availability, capacity and skills (load is kept as it is)."""
        args: list[str | int] = [
            str(agent.user_id),
            1 if agent.available else 0,
            "skills",
            json.dumps(agent.skills),
            "idle",
            agent.idle_since_ms,
        ]
        for channel, capacity in agent.capacity.items():
            args += ["cap:" + channel, capacity]
        await self._run(self._set_agent, [self.prefix(tenant_id)], args)

    async def offer_interaction(self, tenant_id: uuid.UUID, item: WaitingInteraction, now_ms: int) -> list[Offer]:
        """Offer a waiting interaction by its queue's strategy (a ring-all voice queue rings every eligible
        agent). Agents it could go to who have older work waiting are offered that first, so the offers made
        may include other interactions; empty when nobody may take anything now."""
        flat = await self._run(
            self._offer_interaction, [self.prefix(tenant_id)], [str(item.interaction_id), now_ms, self._scan_depth]
        )
        return _offers(flat)

    async def offer_agent(self, tenant_id: uuid.UUID, agent_id: uuid.UUID, now_ms: int) -> Offer | None:
        """Offer the most urgent waiting interaction this agent may take, if any (a ring-all call rings the
        other agents it may go to as well)."""
        flat = await self._run(self._offer_agent, [self.prefix(tenant_id)], [str(agent_id), now_ms, self._scan_depth])
        offers = _offers(flat)
        return offers[0] if offers else None

    async def accept(
        self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID, now_ms: int
    ) -> Acceptance:
        """Connect the agent; a ring-all offer stops ringing everyone else. Refused as `not_offered`,
        `not_yours` or `expired`."""
        result = await self._run(self._accept, [self.prefix(tenant_id)], [str(interaction_id), str(agent_id), now_ms])
        return Acceptance(str(result[0]), tuple(uuid.UUID(a) for a in result[1:]))

    async def reject(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID, agent_id: uuid.UUID) -> str:
        """`ok` (back at its old place), `ringing` (a ring-all offer goes on ringing others), or why not."""
        return str(await self._run(self._reject, [self.prefix(tenant_id)], [str(interaction_id), str(agent_id)]))

    async def expire_offers(
        self, tenant_id: uuid.UUID, now_ms: int, limit: int = 100
    ) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Offers past their time, each put back at its old place: [(interaction, agent)], a ring-all offer
        once per agent it rang."""
        flat = await self._run(self._expire, [self.prefix(tenant_id)], [now_ms, limit])
        return [(uuid.UUID(flat[i]), uuid.UUID(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def finish(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> uuid.UUID | None:
        """Take an interaction out of routing (ended or abandoned); returns the agent it freed, if any."""
        agent = await self._run(self._finish, [self.prefix(tenant_id)], [str(interaction_id)])
        return uuid.UUID(agent) if agent else None

    async def finish_and_offer(
        self,
        tenant_id: uuid.UUID,
        interaction_id: uuid.UUID,
        agent_id: uuid.UUID,
        now_ms: int,
        *,
        wrap_up: bool = False,
    ) -> Freed:
        """An agent comes free: `finish` the interaction, then `offer_agent` them their next one, atomically and
        in one round trip. With `wrap_up`, an agent left holding nothing is offered nothing and leaves the
        available set (they are going to wrap-up); one still holding other work is offered more as usual."""
        flat = await self._run(
            self._finish_and_offer,
            [self.prefix(tenant_id)],
            [str(interaction_id), str(agent_id), now_ms, self._scan_depth, 1 if wrap_up else 0],
        )
        offers = _offers(flat[2:])
        return Freed(uuid.UUID(flat[0]) if flat[0] else None, flat[1] == 1, offers[0] if offers else None)

    async def finish_keep_rank(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> int | None:
        """Take a waiting interaction out of its queue and return its rank, to put it back in the same place."""
        rank = await self._redis.hget(self.prefix(tenant_id) + "i:" + str(interaction_id), "rank")
        await self.finish(tenant_id, interaction_id)
        return int(rank) if rank is not None else None

    async def restore_connected(self, tenant_id: uuid.UUID, item: WaitingInteraction, agent_id: uuid.UUID) -> None:
        """Record (after a Redis loss) that an interaction is with an agent, using their capacity."""
        await self._run(
            self._restore_connected,
            [self.prefix(tenant_id)],
            [
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
        popped = await self._run(self._pop_due, [key], [now_ms, limit])
        return [str(t) for t in popped]

    async def next_due(self, tenant_id: uuid.UUID) -> int | None:
        """The earliest pending offer expiry or timer of the tenant."""
        p = self.prefix(tenant_id)
        firsts = [await self._redis.zrange(p + key, 0, 0, withscores=True) for key in ("offers", "due")]
        scores = [int(f[0][1]) for f in firsts if f]
        return min(scores) if scores else None

    async def due_tenants(self, now_ms: int, limit: int = 100) -> list[uuid.UUID]:
        """Tenants whose earliest timer has come, removed from the index (their tick re-adds what remains)."""
        popped = await self._run(self._pop_due, [TIMER_INDEX], [now_ms, limit])
        return [uuid.UUID(t) for t in popped]

    async def earliest_timer(self) -> int | None:
        """When the next tick of any tenant is due."""
        first = await self._redis.zrange(TIMER_INDEX, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    async def waiting(self, tenant_id: uuid.UUID, queue_id: uuid.UUID) -> list[uuid.UUID]:
        """The queue's waiting interactions, first first."""
        members = cast(list[str], await self._redis.zrange(self.prefix(tenant_id) + "q:" + str(queue_id), 0, -1))
        return [uuid.UUID(m) for m in members]

    async def state(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> str | None:
        """`waiting`, `offered` or `connected`; None when routing does not hold it."""
        found = await self._redis.hget(self.prefix(tenant_id) + "i:" + str(interaction_id), "state")
        return cast(str | None, found)

    async def current_offer(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> Offer | None:
        """The open offer of an interaction: the agent (or every agent a ring-all call rings) and the time left."""
        p = self.prefix(tenant_id)
        iid = str(interaction_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(p + "i:" + iid, "state", "agent")
            pipe.smembers(p + "ring:" + iid)
            pipe.zscore(p + "offers", iid)
            (state, agent), ringing, expiry = await pipe.execute()
        if state != "offered" or expiry is None:
            return None
        agents = (agent,) if agent else tuple(sorted(ringing))
        remaining = int(float(expiry)) - int(time.time() * 1000)
        return Offer(interaction_id, tuple(uuid.UUID(a) for a in agents), max(0, remaining))

    async def position(self, tenant_id: uuid.UUID, queue_id: uuid.UUID, interaction_id: uuid.UUID) -> int | None:
        """1-based place in the queue, or None when not waiting there."""
        key = self.prefix(tenant_id) + "q:" + str(queue_id)
        rank = cast(int | None, await self._redis.zrank(key, str(interaction_id)))
        return None if rank is None else rank + 1

    async def load(self, tenant_id: uuid.UUID, agent_id: uuid.UUID) -> dict[str, int]:
        """The agent's current load per channel."""
        raw = cast(dict[str, str], await self._redis.hgetall(self.prefix(tenant_id) + "a:" + str(agent_id)))
        return {k.removeprefix("load:"): int(v) for k, v in raw.items() if k.startswith("load:")}


def _offers(flat: list[Any]) -> list[Offer]:
    """Offers from a script's flat reply: iid, timeout, number of agents, agents..., repeated."""
    offers, at = [], 0
    while at < len(flat):
        count = int(flat[at + 2])
        agents = tuple(uuid.UUID(a) for a in flat[at + 3 : at + 3 + count])
        offers.append(Offer(uuid.UUID(flat[at]), agents, int(flat[at + 1])))
        at += 3 + count
    return offers
