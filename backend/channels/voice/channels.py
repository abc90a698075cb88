"""The legs up on each switch node, from its CHANNEL_* events, kept in Redis.

When a node is lost these are the calls that were live on it: each gets a
closed CDR (`node_failure`) and its interaction is ended. One Redis hash per
leg (fields only ever added or overwritten, so events may be applied by
several consumers in any order) and one set of leg ids per node. After a
reconnect the node's inbound link (`links.py`) hands `reconcile` the node's own list
(`show channels as json`) to drop legs whose hangup was missed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import structlog
from redis.asyncio import Redis

from backend.channels.voice.legs import Event, LegError, LegFacts, as_uuid, header, leg_from_live, live_fields
from backend.lib.redis_keys import global_key

log = structlog.get_logger("voice.channels")

LEG_TTL_SECONDS = 24 * 3600
"""A leg whose end was never seen is forgotten after a day (a call longer than that is not a call)."""
# KEYS: the node's set of legs, the leg's hash (one hash tag: one Cluster slot).
# ARGV: leg, ttl, the fields as one JSON array [name, value, ...] (one argument to pack, not dozens).
_UPDATE = """
redis.call('SADD', KEYS[1], ARGV[1])
local fields = cjson.decode(ARGV[3])
if #fields > 0 then
  redis.call('HSET', KEYS[2], unpack(fields))
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
_JSON = msgspec.json.Encoder()
_FORGET = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""
TRACKED_EVENTS = frozenset(
    {
        "CHANNEL_CREATE",
        "CHANNEL_PROGRESS",
        "CHANNEL_PROGRESS_MEDIA",
        "CHANNEL_ANSWER",
        "CHANNEL_BRIDGE",
        "CHANNEL_UNBRIDGE",
        "CHANNEL_HANGUP",
    }
)


def _node_key(node_id: uuid.UUID) -> str:
    # One hash tag per node: a node's set and its legs' hashes share a Redis Cluster slot (MULTI works).
    return global_key(f"{{sw:{node_id}}}", "legs")


def _leg_key(node_id: uuid.UUID, leg_uuid: uuid.UUID | str) -> str:
    return global_key(f"{{sw:{node_id}}}", "leg", str(leg_uuid))


@dataclass(frozen=True, slots=True)
class LiveLeg:
    """A leg up on a node, as its events described it."""

    leg_uuid: str
    fields: dict[str, str]

    def facts(self) -> LegFacts:
        """The leg's facts so far (no end time)."""
        return leg_from_live(self.leg_uuid, self.fields)


class LiveChannels:
    """Which legs are live on which node."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        # One script call per event rather than a MULTI of three commands: the client's work per event
        # (packing and parsing five commands) was most of the cost of applying a channel event.
        self._update = redis.register_script(_UPDATE)
        self._forget = redis.register_script(_FORGET)

    async def update(self, node_id: uuid.UUID, event: Event) -> bool:
        """Apply a channel event (create, progress, answer, bridge, unbridge, hangup); False if it is not one."""
        if header(event, "Event-Name") not in TRACKED_EVENTS:
            return False
        leg = as_uuid(header(event, "Unique-ID"))
        if leg is None:
            log.warning("channel_event_without_leg", node_id=str(node_id), event_name=header(event, "Event-Name"))
            return False
        fields = live_fields(event)
        if header(event, "Event-Name") == "CHANNEL_HANGUP":
            fields["hangup"] = header(event, "Hangup-Cause") or "UNKNOWN"
        flat = [item for pair in fields.items() for item in pair]
        arguments: list[str | int] = [str(leg), LEG_TTL_SECONDS, _JSON.encode(flat).decode()]
        await self._update(keys=[_node_key(node_id), _leg_key(node_id, leg)], args=arguments)
        return True

    async def forget(self, node_id: uuid.UUID, leg_uuid: uuid.UUID | str) -> None:
        """The leg is over and its CDR stored."""
        await self._forget(keys=[_node_key(node_id), _leg_key(node_id, leg_uuid)], args=[str(leg_uuid)])

    async def legs(self, node_id: uuid.UUID) -> list[LiveLeg]:
        """Every leg live on the node."""
        ids = sorted(str(leg) for leg in await self.redis.smembers(_node_key(node_id)))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for leg in ids:
                pipe.hgetall(_leg_key(node_id, leg))
            found = await pipe.execute()
        return [LiveLeg(leg, dict(fields)) for leg, fields in zip(ids, found, strict=True)]

    async def count(self, node_id: uuid.UUID) -> int:
        """How many legs are live on the node."""
        return int(await self.redis.scard(_node_key(node_id)))

    async def reconcile(self, node_id: uuid.UUID, live_uuids: Iterable[str]) -> list[str]:
        """Keep only the legs the node itself still has (after a reconnect); returns the ones dropped."""
        keep = {str(u) for u in live_uuids}
        members = {str(leg) for leg in await self.redis.smembers(_node_key(node_id))}
        dropped = sorted(members - keep)
        for start in range(0, len(dropped), 500):
            async with self.redis.pipeline(transaction=False) as pipe:
                for leg in dropped[start : start + 500]:
                    await self._forget(keys=[_node_key(node_id), _leg_key(node_id, leg)], args=[leg], client=pipe)
                await pipe.execute()
        if dropped:
            log.info("live_legs_reconciled", node_id=str(node_id), dropped=len(dropped))
        return dropped

    async def closed_legs(self, node_id: uuid.UUID) -> list[LegFacts]:
        """The node's live legs as facts, for closing; legs too garbled to close are dropped with a log line."""
        facts = []
        for leg in await self.legs(node_id):
            try:
                facts.append(leg.facts())
            except LegError as exc:
                log.warning("live_leg_unusable", node_id=str(node_id), leg=leg.leg_uuid, error=str(exc))
                await self.forget(node_id, leg.leg_uuid)
        return facts
