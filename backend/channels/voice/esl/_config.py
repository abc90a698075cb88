"""Tunable numbers of the ESL client and outbound server, with FreeSWITCH-friendly defaults."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from backend.channels.voice.esl._models import EventFormat
from backend.channels.voice.esl._parser import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_HEADER_BYTES


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential growth capped at `maximum`, each spread by +/- `jitter` (a fraction)."""

    initial: float = 0.5
    """The first delay after a connection is lost, in seconds."""
    maximum: float = 30.0
    """The longest delay between two attempts, in seconds."""
    multiplier: float = 2.0
    """How much the delay grows after each failed attempt."""
    jitter: float = 0.2
    """Random spread so that many processes do not reconnect in step (0.2 = +/-20%)."""

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before attempt number `attempt` (0 for the first retry)."""
        base = min(self.maximum, self.initial * self.multiplier ** max(0, attempt))
        spread = (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        return max(0.0, base * spread)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Timeouts and limits of one ESL connection (inbound client or outbound session)."""

    connect_timeout: float = 5.0
    """Seconds to open the TCP connection and receive the greeting (or the `connect` reply)."""
    command_timeout: float = 10.0
    """Seconds to wait for a `command/reply`; past it the connection is dropped (replies are matched in order)."""
    api_timeout: float = 30.0
    """Seconds to wait for an `api/response`; use bgapi for anything slow (originate)."""
    job_timeout: float = 120.0
    """Seconds to wait for a bgapi job's BACKGROUND_JOB event."""
    execute_timeout: float | None = None
    """Seconds to wait for an application's CHANNEL_EXECUTE_COMPLETE; None waits as long as the call lasts."""
    event_queue_size: int = 10_000
    """Events buffered for the consumer; when full, new events are dropped and counted, never blocking the reader."""
    read_chunk_bytes: int = 65_536
    """Bytes asked of the socket per read."""
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    """Longest header block accepted from the switch."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest frame body accepted from the switch."""
    event_format: EventFormat = "json"
    """Format asked for with `event` and `myevents` (json needs no URL-decoding)."""
    backoff: Backoff = field(default_factory=Backoff)
    """Reconnect delays of the inbound client."""
