"""The job queue (SAQ on Redis) that the API enqueues into and the worker runs."""

from __future__ import annotations

from saq import Queue

from backend.config import Settings

QUEUE_NAME = "contactcenter"


def make_job_queue(settings: Settings) -> Queue:
    """The queue shared by API processes (enqueue) and workers (run)."""
    return Queue.from_url(settings.redis_url, name=QUEUE_NAME)
