"""What call control keeps about each call, in Redis, so that another process can take the call over.

One record per call (keyed by the caller's leg UUID, under the tenant's hash
tag) holds where the call is (IVR with its interpreter state, waiting, ringing
agents, bridged to an agent, leaving a message), its interaction, agent, legs,
recording and any transfer under way. The process that controls the call owns
the record: a global sorted set scores each call by the moment its owner's
lease runs out, and the owner pushes that moment forward every few seconds for
all its calls at once. When a process dies its leases lapse; a surviving process
claims them (one script: only a lapsed lease is taken) and adopts the calls.

Requests for a call (hold, transfer, recording) reach its owner through a Redis
list per owner, answered on a reply list, as switch commands reach a node's
holder (`commands.py`): at most once, with a deadline.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Literal

import msgspec
from redis.asyncio import Redis

from backend.config import Settings
from backend.lib.redis_keys import global_key, tenant_key
from backend.routing.ivr_interpreter import Action, CallState

Phase = Literal["ivr", "queued", "ringing", "bridged", "voicemail", "ending"]

LEASES = global_key("callctl", "leases")
"""Every controlled call (`<tenant>|<call uuid>`), scored by when its owner's lease runs out (ms)."""
RECORD_TTL_SECONDS = 86_400
"""A record Redis forgets on its own a day after its last write (a call never lasts that long)."""

# KEYS: the leases set. ARGV: now_ms, new expiry, limit. Takes the lapsed leases (each by one caller only).
_CLAIM_LAPSED = """
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(lapsed) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return lapsed
"""


def owner_token() -> str:
    """This process's name as an owner of calls: host, pid and a random part (a restarted pid is someone else)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Ringing(msgspec.Struct, frozen=True):
    """An agent's leg being rung for the call."""

    agent_id: uuid.UUID
    leg: uuid.UUID


class PendingTransfer(msgspec.Struct, frozen=True):
    """A transfer asked for and not finished: where the caller goes once the agent's leg is gone."""

    target: Literal["queue", "agent"]
    queue_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    mode: Literal["blind", "attended"] = "blind"
    by: uuid.UUID | None = None
    consult_leg: uuid.UUID | None = None
    """Attended: the leg of the agent being consulted."""
    consult_state: Literal["ringing", "talking"] = "ringing"
    """Attended: the consulted agent's phone rings (the caller on hold), or the two agents talk (the caller hears
    the queue's music from call control)."""


class CallRecord(msgspec.Struct, kw_only=True):
    """One call as call control knows it; plain data, resumable by any process."""

    tenant_id: uuid.UUID
    call_uuid: uuid.UUID
    """The caller's leg."""
    node_id: uuid.UUID | None = None
    interaction_id: uuid.UUID | None = None
    phase: Phase = "ivr"
    caller_number: str = ""
    did: str | None = None
    flow: CallState | None = None
    """The IVR interpreter's state while in the flow."""
    action: Action | None = None
    """The interpreter's pending action (a resumed call carries it out again)."""
    queue_id: uuid.UUID | None = None
    language: str | None = None
    voice: str | None = None
    ringing: list[Ringing] = msgspec.field(default_factory=list)
    agent_id: uuid.UUID | None = None
    agent_leg: uuid.UUID | None = None
    held: bool = False
    recording_id: uuid.UUID | None = None
    recording_path: str | None = None
    recording_paused: bool = False
    voicemail_id: uuid.UUID | None = None
    pending: PendingTransfer | None = None
    owner: str = ""
    started_ms: int = 0
    direction: Literal["inbound", "outbound"] = "inbound"
    """`outbound`: an agent's own call or a callback (`outbound_calls.py`): `call_uuid` is the agent's leg."""
    customer_leg: uuid.UUID | None = None
    """Outbound: the customer's leg through the carrier gateway."""


class CallRequest(msgspec.Struct, frozen=True):
    """A request for a call's owner (from the API or another process)."""

    id: str
    tenant_id: uuid.UUID
    call_uuid: uuid.UUID
    operation: str
    arguments: dict[str, Any]
    deadline: float
    """Epoch seconds after which nobody waits for the answer (the owner drops it)."""


class CallReply(msgspec.Struct, frozen=True):
    """The owner's answer: done, or refused with an HTTP-like status and a reason."""

    ok: bool
    status: int = 200
    detail: str = ""
    kind: str = ""
    data: dict[str, Any] = msgspec.field(default_factory=dict)


_ENCODE = msgspec.json.Encoder()
_DECODE_RECORD = msgspec.json.Decoder(CallRecord)
_DECODE_REQUEST = msgspec.json.Decoder(CallRequest)
_DECODE_REPLY = msgspec.json.Decoder(CallReply)


def _member(tenant_id: uuid.UUID, call_uuid: uuid.UUID) -> str:
    return f"{tenant_id}|{call_uuid}"


def _record_key(tenant_id: uuid.UUID, call_uuid: uuid.UUID) -> str:
    return tenant_key(tenant_id, "callctl", "call", str(call_uuid))


def _interaction_key(tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> str:
    return tenant_key(tenant_id, "callctl", "ix", str(interaction_id))


def _requests_key(owner: str) -> str:
    return global_key("callctl", "owner", owner, "requests")


def _reply_key(request_id: str) -> str:
    return global_key("callctl", "reply", request_id)


class CallStore:
    """Call records, their owners' leases and requests to owners, in Redis."""

    def __init__(self, redis: Redis, settings: Settings, owner: str | None = None) -> None:
        self.redis = redis
        self.settings = settings
        self.owner = owner or owner_token()
        self._claim = redis.register_script(_CLAIM_LAPSED)

    def _expiry_ms(self) -> int:
        return int((time.time() + self.settings.call_control_lease_seconds) * 1000)

    # --- records --------------------------------------------------------------------------------

    async def save(self, record: CallRecord) -> None:
        """Write the record (owned by this process) and renew its lease."""
        record.owner = self.owner
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_record_key(record.tenant_id, record.call_uuid), _ENCODE.encode(record), ex=RECORD_TTL_SECONDS)
            if record.interaction_id is not None:
                pipe.set(
                    _interaction_key(record.tenant_id, record.interaction_id),
                    str(record.call_uuid),
                    ex=RECORD_TTL_SECONDS,
                )
            pipe.zadd(LEASES, {_member(record.tenant_id, record.call_uuid): self._expiry_ms()})
            await pipe.execute()

    async def load(self, tenant_id: uuid.UUID, call_uuid: uuid.UUID) -> CallRecord | None:
        """The call's record, if call control holds one."""
        raw = await self.redis.get(_record_key(tenant_id, call_uuid))
        return _DECODE_RECORD.decode(raw) if raw else None

    async def for_interaction(self, tenant_id: uuid.UUID, interaction_id: uuid.UUID) -> CallRecord | None:
        """The record of the call carrying this interaction (the tenant's own keys only)."""
        call = await self.redis.get(_interaction_key(tenant_id, interaction_id))
        if not call:
            return None
        try:
            return await self.load(tenant_id, uuid.UUID(str(call)))
        except ValueError:
            return None

    async def forget(self, record: CallRecord) -> None:
        """The call is over: its record, index entry and lease go."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(_record_key(record.tenant_id, record.call_uuid))
            if record.interaction_id is not None:
                pipe.delete(_interaction_key(record.tenant_id, record.interaction_id))
            pipe.zrem(LEASES, _member(record.tenant_id, record.call_uuid))
            await pipe.execute()

    # --- leases ---------------------------------------------------------------------------------

    async def renew(self, calls: list[tuple[uuid.UUID, uuid.UUID]]) -> None:
        """Push the leases of this process's calls forward (one command for all of them)."""
        if calls:
            expiry = self._expiry_ms()
            await self.redis.zadd(LEASES, {_member(t, c): expiry for t, c in calls}, xx=True)

    async def lease_alive(self, tenant_id: uuid.UUID, call_uuid: uuid.UUID) -> bool:
        """Whether the call's owner renewed its lease recently enough."""
        score = await self.redis.zscore(LEASES, _member(tenant_id, call_uuid))
        return score is not None and float(score) > time.time() * 1000

    async def claim_lapsed(self, limit: int = 50) -> list[tuple[uuid.UUID, uuid.UUID]]:
        """Take calls whose owner stopped renewing (each taken by one process only)."""
        now = int(time.time() * 1000)
        members = await self._claim(keys=[LEASES], args=[now, self._expiry_ms(), limit])
        taken: list[tuple[uuid.UUID, uuid.UUID]] = []
        for member in members:
            tenant, _, call = str(member).partition("|")
            try:
                taken.append((uuid.UUID(tenant), uuid.UUID(call)))
            except ValueError:
                await self.redis.zrem(LEASES, member)
        return taken

    # --- requests to a call's owner ---------------------------------------------------------------

    async def ask(
        self, record: CallRecord, operation: str, arguments: dict[str, Any], within: float
    ) -> CallReply | None:
        """Send a request to the call's owner and wait for its answer; None if none came in time."""
        request = CallRequest(
            id=uuid.uuid4().hex,
            tenant_id=record.tenant_id,
            call_uuid=record.call_uuid,
            operation=operation,
            arguments=arguments,
            deadline=time.time() + within,
        )
        queue = _requests_key(record.owner)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(queue, _ENCODE.encode(request))
            pipe.expire(queue, int(within) + 30)
            await pipe.execute()
        found = await self.redis.blpop([_reply_key(request.id)], timeout=max(0.01, within))
        if found is None:
            return None
        return _DECODE_REPLY.decode(found[1])

    async def next_request(self, within: float) -> CallRequest | None:
        """The next request for this process's calls (waits up to `within` seconds)."""
        found = await self.redis.blpop([_requests_key(self.owner)], timeout=max(0.01, within))
        if found is None:
            return None
        try:
            return _DECODE_REQUEST.decode(found[1])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    async def answer(self, request: CallRequest, reply: CallReply) -> None:
        """Answer a request (the asker waits on its reply list)."""
        key = _reply_key(request.id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(key, _ENCODE.encode(reply))
            pipe.expire(key, 60)
            await pipe.execute()
