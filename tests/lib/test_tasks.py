"""Stopping tasks: the stopper's own cancellation is never swallowed with the stopped task's."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from backend.lib.tasks import cancel_and_wait


async def _slow_to_stop(stopping: asyncio.Event) -> None:
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        stopping.set()
        await asyncio.sleep(0.05)  # cleans up for a moment, as a link closing its socket does
        raise


async def test_a_stopper_cancelled_while_it_waits_is_cancelled_too():
    stopping = asyncio.Event()
    inner = asyncio.create_task(_slow_to_stop(stopping))
    await asyncio.sleep(0)
    carried_on = asyncio.Event()

    async def stopper() -> None:
        await cancel_and_wait(inner)
        carried_on.set()  # what suppress(CancelledError) let happen: the loop went on after its stop
        await asyncio.sleep(3600)

    outer = asyncio.create_task(stopper())
    await stopping.wait()
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(outer, timeout=5)
    assert not carried_on.is_set()
    await asyncio.wait({inner}, timeout=1)  # its own cleanup goes on a moment after the stopper's end
    assert inner.cancelled()


async def test_stopped_tasks_errors_and_finished_tasks_are_not_the_callers():
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("broken while stopping") from None

    async def done() -> int:
        return 1

    failing = asyncio.create_task(fails_on_cancel())
    finished = asyncio.create_task(done())
    await asyncio.sleep(0)
    await cancel_and_wait(failing, finished, None)
    assert failing.done() and finished.result() == 1


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again():
    """Cleanup that awaits something never coming (a reply from a closed socket) must not hang the stop."""
    cleaned = asyncio.Event()

    async def stubborn() -> None:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed: carries on with its cleanup
            await asyncio.sleep(3600)
        try:
            await asyncio.sleep(3600)  # the cleanup that never finishes
        finally:
            cleaned.set()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, grace=0.05), timeout=5)
    assert task.cancelled() and cleaned.is_set()


async def test_a_task_deaf_to_cancellation_is_left_running_not_waited_for():
    release = asyncio.Event()

    async def deaf() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, grace=0.02, attempts=2), timeout=5)
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.sleep(0.05)
    assert task.done()
