"""The ESL library's tunables taken from the backend's settings."""

from __future__ import annotations

from backend.channels.voice.esl import Backoff, ClientConfig
from backend.config import Settings


def client_config(settings: Settings) -> ClientConfig:
    """Timeouts, back-off and buffer size for connections to switch nodes (inbound and outbound)."""
    return ClientConfig(
        connect_timeout=settings.esl_connect_timeout_seconds,
        command_timeout=settings.esl_command_timeout_seconds,
        api_timeout=settings.esl_api_timeout_seconds,
        job_timeout=settings.esl_job_timeout_seconds,
        event_queue_size=settings.esl_event_queue_size,
        event_format="json",
        backoff=Backoff(
            initial=settings.esl_reconnect_initial_seconds,
            maximum=settings.esl_reconnect_max_seconds,
            jitter=settings.esl_reconnect_jitter,
        ),
    )
