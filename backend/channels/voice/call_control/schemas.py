"""Request and response bodies of the live-call routes."""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec

from backend.tenants.schemas import Strict


class CallTransfer(Strict):
    """Where the call goes: a queue or an agent of the same tenant. `blind`: the agent's leg ends now;
    `attended` (to an agent): the caller waits on hold while the agent consults the other agent, then the agent
    completes or cancels (`…/transfer/complete`, `…/transfer/cancel`)."""

    target: Literal["queue", "agent"]
    queue_id: uuid.UUID | None = None
    agent_id: uuid.UUID | None = None
    mode: Literal["blind", "attended"] = "blind"


class SupervisionMode(Strict):
    """How the supervisor joins: `listen` (nobody hears them), `whisper` (the agent only), `barge` (both)."""

    mode: Literal["listen", "whisper", "barge"]


class RecordingControl(Strict):
    """`start` (queues with the on-demand policy), `pause`, `resume` or `stop`."""

    action: Literal["start", "pause", "resume", "stop"]


class LiveCallOut(msgspec.Struct):
    """A call under control, as the workspace shows it."""

    interaction_id: uuid.UUID
    call_uuid: uuid.UUID
    phase: str
    queue_id: uuid.UUID | None
    agent_id: uuid.UUID | None
    held: bool
    recording_id: uuid.UUID | None
    recording_paused: bool
    transfer_pending: bool
    consult_agent_id: uuid.UUID | None = None
    """An attended transfer under way: the agent consulted."""
    consult_state: str | None = None
    """`ringing` (the caller on hold) or `talking` (the agents talk, the caller hears the queue's music)."""
