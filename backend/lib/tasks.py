"""Stopping background tasks without losing a cancellation meant for the one that stops them."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

log = structlog.get_logger("tasks")

STOP_GRACE_SECONDS = 5.0
"""How long a cancelled task may take to finish before it is cancelled again."""
STOP_ATTEMPTS = 3


async def cancel_and_wait(
    *tasks: asyncio.Future[Any] | None, grace: float = STOP_GRACE_SECONDS, attempts: int = STOP_ATTEMPTS
) -> None:
    """Cancel `tasks` and wait until each has finished; their own errors are not the caller's.

    `with suppress(CancelledError): await task` is not enough: if the task doing the waiting is itself
    cancelled meanwhile, its CancelledError is swallowed with the awaited task's, it carries on, and
    whoever cancelled it waits for it forever. Here the caller's own cancellation always propagates
    (`asyncio.wait` raises it). And a task that swallows its cancellation (cleanup code awaiting something
    that never comes) is cancelled again after `grace` seconds, up to `attempts` times, then left running
    with an error logged: stopping never hangs on it.
    """
    chosen = [task for task in tasks if task is not None]
    for task in chosen:
        task.cancel()
    for task in chosen:
        for _ in range(attempts):
            done, _ = await asyncio.wait({task}, timeout=grace)
            if done:
                break
            log.warning("task_outlived_its_cancellation", task=_name(task), grace_seconds=grace)
            task.cancel()
        if task.done():
            _retrieve(task)
        else:
            log.error("task_left_running", task=_name(task))
            task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    # A task that failed while stopping has nothing left to report to its stopper; reading its exception
    # keeps asyncio from logging "exception was never retrieved" for it.
    if not task.cancelled():
        task.exception()


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
