"""The job queue (SAQ on Redis) that the API enqueues into and the worker runs."""

from __future__ import annotations

from saq.queue.redis import RedisQueue

from backend.config import Settings
from backend.lib.redis_client import make_redis

QUEUE_NAME = "contactcenter"


def make_job_queue(settings: Settings) -> RedisQueue:
    """The queue shared by API processes (enqueue) and workers (run), on a client that rides out Redis restarts."""
    # SAQ stores its jobs as bytes: its client must not decode responses.
    return RedisQueue(make_redis(settings.redis_url, decode_responses=False), name=QUEUE_NAME)
