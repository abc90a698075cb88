"""Stopping tasks: the stopper's own cancellation is never swallowed with the stopped task's."""

from __future__ import annotations

import asyncio

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
