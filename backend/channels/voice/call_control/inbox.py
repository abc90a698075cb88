"""A call's own task waits on the switch without going deaf: messages keep being handled meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def perform_while_serving(
    operation: Awaitable[T], inbox: asyncio.Queue[object], handle: Callable[[object], Awaitable[None]]
) -> T:
    """Wait for a switch operation, handling the call's signals, channel events and requests meanwhile."""
    task = asyncio.ensure_future(operation)
    try:
        while True:
            getter = asyncio.ensure_future(inbox.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                await handle(getter.result())
            else:
                getter.cancel()
            if task in done:
                return task.result()
    finally:
        if not task.done():
            task.cancel()
