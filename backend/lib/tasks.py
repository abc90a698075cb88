"""Stopping background tasks without losing a cancellation meant for the one that stops them."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancel `tasks` and wait until each has finished; their own errors are not the caller's.

    `with suppress(CancelledError): await task` is not enough: if the task doing the waiting is itself
    cancelled meanwhile, its CancelledError is swallowed with the awaited task's, it carries on, and
    whoever cancelled it waits for it forever. So a CancelledError is re-raised when the caller is being
    cancelled.
    """
    chosen = [task for task in tasks if task is not None]
    for task in chosen:
        task.cancel()
    for task in chosen:
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:  # noqa: S110 - a task that failed while stopping has nothing left to report to us
            pass
