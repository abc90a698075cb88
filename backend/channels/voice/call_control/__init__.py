"""Call control: the outbound-ESL server that runs each inbound call (IVR, queue, agents, transfers, recording)."""

from backend.channels.voice.call_control.desk import CallDesk
from backend.channels.voice.call_control.records import CallRecord, CallStore
from backend.channels.voice.call_control.server import CallControlServer
from backend.channels.voice.call_control.services import CallServices

__all__ = ["CallControlServer", "CallDesk", "CallRecord", "CallServices", "CallStore"]
