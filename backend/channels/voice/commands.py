"""Commands for the switch nodes from any process, carried through Redis to the process holding the node's socket.

Exactly one process holds a node's inbound event socket (`links.py`, under a lease
in Redis). Every other process (the API, other workers, call control) asks that
holder: a request is appended to the node's request list, but only while some
process holds the lease (one script, so a request never waits for a holder that is
not there: the asker hears `NodeUnavailable` at once); the holder runs it as `api`
or `bgapi` on its connection and pushes the answer to a reply list named in the
request, on which the asker waits with BLPOP.

At most once: a request is popped by one holder; if that holder dies before it
answers, the asker gets `CommandTimeout` and must treat the outcome as unknown.
Nothing is retried behind the caller's back, because an origination sent twice
rings a customer twice. A request carries a deadline; a holder that pops it too late
drops it (and says so in the log) rather than run something nobody waits for.

This module speaks Redis only: whoever calls it never touches ESL.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import msgspec
import structlog
from redis.asyncio import Redis

from backend.channels.voice.nodes import NodeHealth
from backend.config import Settings
from backend.lib.redis_keys import global_key

log = structlog.get_logger("voice.commands")

CommandKind = Literal["api", "bgapi"]

_VARIABLE_NAME = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# Values go inside `{name=value,...}`: no separators, brackets, quotes, `$` (expansion) or blanks.
_VARIABLE_VALUE = re.compile(r"^[A-Za-z0-9_.:@+/=#*-]{0,255}$")
_CAUSE = re.compile(r"^[A-Z_]{1,40}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
REPLY_GRACE_SECONDS = 30.0
"""Replies and queued requests outlive their deadline by this much before Redis forgets them."""

# Append the request only while some process holds the node's lease (KEYS: lease, requests).
SUBMIT_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def _node_tag(node_id: uuid.UUID) -> str:
    # The same hash tag as the node's live legs: every key of one node shares a Redis Cluster slot.
    return f"{{sw:{node_id}}}"


def lease_key(node_id: uuid.UUID) -> str:
    """Who holds the node's inbound event socket (value: the holder's token)."""
    return global_key(_node_tag(node_id), "esl", "lease")


def requests_key(node_id: uuid.UUID) -> str:
    """Commands waiting for the node's holder."""
    return global_key(_node_tag(node_id), "esl", "requests")


def reply_key(node_id: uuid.UUID, request_id: str) -> str:
    """Where the holder answers one request."""
    return global_key(_node_tag(node_id), "esl", "reply", request_id)


def status_key(node_id: uuid.UUID) -> str:
    """What the holder last said about its connection (for operators)."""
    return global_key(_node_tag(node_id), "esl", "status")


class SwitchCommandError(Exception):
    """A command could not be carried out; the subclass says whether the switch saw it."""


class NodeUnavailable(SwitchCommandError):
    """No process holds the node's connection, its holder is not connected, or no node takes originations.

    The switch never saw the command: it is safe to try another node or later.
    """


class CommandTimeout(SwitchCommandError):
    """No answer in time: the switch may or may not have run the command (the outcome is unknown)."""


class CommandRejected(SwitchCommandError):
    """The request itself was refused (a value that cannot go into a command line)."""


class CommandRequest(msgspec.Struct, frozen=True):
    """One command for a node's holder, as stored in the node's request list."""

    id: str
    kind: CommandKind
    command: str
    deadline: float
    """Wall-clock time (epoch seconds) after which nobody waits for the answer."""
    job_deadline: float = 0.0
    """For bgapi: until when the asker waits for the job's result."""
    job_uuid: str | None = None


class CommandReply(msgspec.Struct, frozen=True):
    """The holder's answer: `accepted` (bgapi taken by the switch), `done` (with the output) or `error`."""

    stage: Literal["accepted", "done", "error"]
    ok: bool = False
    body: str = ""
    error: str = ""
    """For `error`: `not_connected`, `connection_lost`, `timeout`, `expired` or `invalid`."""
    holder: str = ""


_REQUEST = msgspec.json.Encoder()
_DECODE_REQUEST = msgspec.json.Decoder(CommandRequest)
_DECODE_REPLY = msgspec.json.Decoder(CommandReply)


def encode_request(request: CommandRequest) -> str:
    """The request as stored in Redis."""
    return _REQUEST.encode(request).decode()


def decode_request(raw: str | bytes) -> CommandRequest:
    """A stored request; raises msgspec.DecodeError or msgspec.ValidationError for anything else."""
    return _DECODE_REQUEST.decode(raw)


def encode_reply(reply: CommandReply) -> str:
    """A reply as pushed to the asker's reply list."""
    return _REQUEST.encode(reply).decode()


@dataclass(frozen=True, slots=True)
class SwitchReply:
    """What the switch answered: `-ERR ...` is data (`ok` False), as with the ESL library's ApiResponse."""

    node_id: uuid.UUID
    ok: bool
    body: str

    @property
    def text(self) -> str:
        """The body without its trailing newline."""
        return self.body.rstrip("\n")


@dataclass(frozen=True, slots=True)
class Origination:
    """The outcome of an originate: the node it ran on, the new leg's UUID, and whether it was answered."""

    node_id: uuid.UUID
    leg_uuid: uuid.UUID
    ok: bool
    cause: str | None
    """FreeSWITCH's reason when it failed (`NO_ANSWER`, `USER_BUSY`, `SUBSCRIBER_ABSENT`...)."""


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """A node's inbound connection as its holder last described it."""

    holder: str
    connected: bool
    since: float | None
    error: str | None
    events: int
    dropped: int
    failed: int
    lag_ms: float | None
    updated_at: float


def _plain(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise CommandRejected(f"{what} may not contain control characters or line breaks")
    return value


def dial_variables(variables: Mapping[str, str]) -> str:
    """`{name=value,...}` for a dial string, refusing anything that could change its meaning."""
    parts = []
    for name, value in variables.items():
        if not _VARIABLE_NAME.fullmatch(name):
            raise CommandRejected(f"bad channel variable name {name[:40]!r}")
        if not _VARIABLE_VALUE.fullmatch(value):
            raise CommandRejected(f"channel variable {name} has characters a dial string cannot carry")
        parts.append(f"{name}={value}")
    return "{" + ",".join(parts) + "}" if parts else ""


def _cause(body: str) -> str | None:
    text = body.strip()
    if text.startswith("-ERR"):
        return text[4:].strip() or "UNKNOWN"
    return None


class SwitchCommands:
    """Sends commands to switch nodes through their holders; what call control, routing and supervisors use."""

    def __init__(self, redis: Redis, health: NodeHealth, settings: Settings) -> None:
        self.redis = redis
        self.health = health
        self.settings = settings
        self._submit = redis.register_script(SUBMIT_SCRIPT)

    async def _send(self, node_id: uuid.UUID, request: CommandRequest) -> str:
        ttl_ms = int((max(request.deadline, request.job_deadline) - time.time() + REPLY_GRACE_SECONDS) * 1000)
        queued = await self._submit(
            keys=[lease_key(node_id), requests_key(node_id)], args=[encode_request(request), ttl_ms]
        )
        if not queued:
            raise NodeUnavailable(f"no process holds switch node {node_id}'s event socket")
        return reply_key(node_id, request.id)

    async def _reply(self, key: str, within: float, what: str) -> CommandReply:
        found = await self.redis.blpop([key], timeout=max(0.01, within))
        if found is None:
            raise CommandTimeout(f"no answer to {what!r} within {within:.1f}s; its outcome is unknown")
        reply = _DECODE_REPLY.decode(found[1])
        if reply.stage == "error":
            if reply.error in {"not_connected", "expired", "invalid"}:
                # The switch never saw it.
                raise NodeUnavailable(f"{what!r} was not run: {reply.error} {reply.body}".strip())
            raise CommandTimeout(f"{what!r}: {reply.error} {reply.body}; its outcome is unknown".strip())
        return reply

    async def api(self, node_id: uuid.UUID, command: str, *, within: float | None = None) -> SwitchReply:
        """`api <command>` on the node: for quick commands only (uuid_kill, uuid_setvar, show); use bgapi otherwise."""
        wait = within or self.settings.switch_command_timeout_seconds
        request = CommandRequest(
            id=uuid.uuid4().hex, kind="api", command=_plain(command, "a command"), deadline=time.time() + wait
        )
        key = await self._send(node_id, request)
        reply = await self._reply(key, wait, command)
        return SwitchReply(node_id, reply.ok, reply.body)

    async def bgapi(
        self, node_id: uuid.UUID, command: str, *, job_uuid: str | None = None, within: float | None = None
    ) -> SwitchReply:
        """`bgapi <command>` on the node, waiting for the job's output (BACKGROUND_JOB) `within` seconds."""
        accept = self.settings.switch_command_timeout_seconds
        job_wait = within or self.settings.esl_job_timeout_seconds
        now = time.time()
        request = CommandRequest(
            id=uuid.uuid4().hex,
            kind="bgapi",
            command=_plain(command, "a command"),
            deadline=now + accept,
            job_deadline=now + accept + job_wait,
            job_uuid=job_uuid,
        )
        key = await self._send(node_id, request)
        first = await self._reply(key, accept, command)
        if first.stage == "done":  # the switch refused the job outright
            return SwitchReply(node_id, first.ok, first.body)
        done = await self._reply(key, request.job_deadline - time.time(), command)
        return SwitchReply(node_id, done.ok, done.body)

    async def originate(
        self,
        destination: str,
        application: str,
        *,
        variables: Mapping[str, str] | None = None,
        node_id: uuid.UUID | None = None,
        leg_uuid: uuid.UUID | None = None,
        within: float | None = None,
    ) -> Origination:
        """Originate a call (callbacks, click-to-call) with bgapi, on `node_id` or on the node `pick_node` chooses.

        `destination` is a dial string without variables (`user/1001@acme.sip.example`, `loopback/...`),
        `application` what the answered leg runs (`&park()`, `&socket(host:port async full)`, or an
        extension). A node nobody holds, or whose holder is not connected, is skipped for the next one.
        """
        leg = leg_uuid or uuid.uuid4()
        values = {"origination_uuid": str(leg), **(variables or {})}
        command = f"originate {dial_variables(values)}{_plain(destination, 'a destination')} "
        command += _plain(application, "an application")
        tried: list[uuid.UUID] = []
        while True:
            if node_id is not None:
                target = node_id
            else:
                choice = await self.health.pick_node(tried)
                if choice is None:
                    raise NodeUnavailable("no switch node takes originations now (all down, draining or unheld)")
                target = choice.id
            try:
                reply = await self.bgapi(target, command, job_uuid=str(uuid.uuid4()), within=within)
            except NodeUnavailable as exc:
                if node_id is not None:
                    raise
                log.warning("originate_node_unavailable", node_id=str(target), error=str(exc))
                tried.append(target)
                continue
            cause = _cause(reply.body)
            log.info("originated", node_id=str(target), leg=str(leg), ok=reply.ok, cause=cause)
            return Origination(target, leg, reply.ok and cause is None, cause)

    async def hangup(self, node_id: uuid.UUID, leg_uuid: uuid.UUID, cause: str = "NORMAL_CLEARING") -> SwitchReply:
        """`uuid_kill <leg> <cause>`: end one leg (a prepaid balance ran out, a supervisor ends a call)."""
        if not _CAUSE.fullmatch(cause):
            raise CommandRejected(f"bad hangup cause {cause[:40]!r}")
        return await self.api(node_id, f"uuid_kill {leg_uuid} {cause}")

    async def eavesdrop(
        self,
        node_id: uuid.UUID,
        target_leg: uuid.UUID,
        endpoint: str,
        *,
        variables: Mapping[str, str] | None = None,
        leg_uuid: uuid.UUID | None = None,
        within: float | None = None,
    ) -> Origination:
        """A supervisor listens in: originate to their `endpoint` on the target's node, running `eavesdrop`.

        The endpoint must be reachable from that node (a phone registered there, or a SIP address).
        """
        return await self.originate(
            endpoint,
            f"&eavesdrop({target_leg})",
            variables=variables,
            node_id=node_id,
            leg_uuid=leg_uuid,
            within=within,
        )

    async def set_variable(self, node_id: uuid.UUID, leg_uuid: uuid.UUID, name: str, value: str) -> SwitchReply:
        """`uuid_setvar`: put a channel variable on a live leg (so its CDR carries it)."""
        if not _VARIABLE_NAME.fullmatch(name) or not _VARIABLE_VALUE.fullmatch(value):
            raise CommandRejected(f"variable {name[:40]!r} or its value cannot go into a command")
        return await self.api(node_id, f"uuid_setvar {leg_uuid} {name} {value}")

    async def record(self, node_id: uuid.UUID, leg_uuid: uuid.UUID, path: str, *, start: bool = True) -> SwitchReply:
        """`uuid_record <leg> start|stop <path>`: record a live leg to a file on the node."""
        if not _VARIABLE_VALUE.fullmatch(path):
            raise CommandRejected("the recording path has characters a command cannot carry")
        return await self.api(node_id, f"uuid_record {leg_uuid} {'start' if start else 'stop'} {path}")

    async def link_status(self, node_id: uuid.UUID) -> LinkStatus | None:
        """The node's holder and connection as last published (None: nobody holds it)."""
        stored = await self.redis.hgetall(status_key(node_id))
        raw = {str(name): str(value) for name, value in stored.items()}
        if not raw:
            return None

        def number(name: str) -> float | None:
            value = raw.get(name)
            try:
                return float(value) if value not in (None, "") else None
            except ValueError:
                return None

        return LinkStatus(
            holder=str(raw.get("holder", "")),
            connected=raw.get("connected") == "1",
            since=number("since"),
            error=raw.get("error") or None,
            events=int(number("events") or 0),
            dropped=int(number("dropped") or 0),
            failed=int(number("failed") or 0),
            lag_ms=number("lag_ms"),
            updated_at=number("updated_at") or 0.0,
        )
