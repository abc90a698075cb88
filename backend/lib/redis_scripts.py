"""Lua scripts run on Redis with the calls of one event-loop turn sent together (automatic pipelining).

Under load many coroutines of a process call scripts at once (every offer group-committed to PostgreSQL
wakes its callers together, and each asks Redis for its next step). One round trip per call costs a
write and a read on both sides and a pass through redis-py's connection pool and retry wrappers; sent
as one pipeline, those costs are paid once per batch. Each script still runs atomically on its own, in
the order it was called; nothing waits for a batch to fill, so a lone call goes out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

_Call = tuple[AsyncScript, tuple[Any, ...], "asyncio.Future[Any]"]


class ScriptRunner:
    """Runs registered scripts on one client; calls made in the same event-loop turn share a round trip."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._queued: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.round_trips = 0
        """Round trips made so far (each carries one or more calls)."""

    async def __call__(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queued.append((script, (len(keys), *keys, *args), done))
        if len(self._queued) == 1:
            # After the callbacks already due in this turn: the coroutines they resume queue their calls too.
            loop.call_soon(self._send)
        return await done

    def _send(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._sending.add(task)  # a reference, or the task may be collected while it runs
        task.add_done_callback(self._sending.discard)

    async def _run(self, batch: list[_Call]) -> None:
        try:
            self.round_trips += 1
            if len(batch) == 1:
                script, command, _ = batch[0]
                results: list[Any] = [await self._one(script, command)]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for script, command, _ in batch:
                        pipe.pipeline_execute_command("EVALSHA", script.sha, *command)  # type: ignore[no-untyped-call]
                    results = await pipe.execute(raise_on_error=False)
                for at, (script, command, _) in enumerate(batch):
                    if isinstance(results[at], NoScriptError):
                        results[at] = await self._one(script, command)
        except Exception as exc:  # the connection failed (after its retries): every call of the batch fails
            for _, _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        except BaseException:  # cancelled (the loop is closing): so are the calls waiting on this batch
            for _, _, done in batch:
                done.cancel()
            raise
        for (_, _, done), result in zip(batch, results, strict=True):
            if done.done():  # its caller was cancelled
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)

    async def _one(self, script: AsyncScript, command: tuple[Any, ...]) -> Any:
        try:
            return await self._redis.execute_command("EVALSHA", script.sha, *command)  # type: ignore[no-untyped-call]
        except NoScriptError:
            # Redis restarted or its script cache was flushed: the script object loads it and runs it.
            count = command[0]
            return await script(keys=list(command[1 : 1 + count]), args=list(command[1 + count :]))
