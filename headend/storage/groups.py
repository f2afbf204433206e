"""Group commit: the jobs that callers hand in while a write is under way go into the next
write together (at most ``most``), each caller getting its own job's result. The command
recorder, the credit deliverer's step writer and the payment intake each run their batches
through one :class:`GroupCommit`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Generic, TypeVar

J = TypeVar("J")
R = TypeVar("R")


class GroupCommit(Generic[J, R]):
    """Batches of ``J`` written by ``write`` (one result ``R`` per job, in order). ``turn``,
    when given, is entered before a batch is made up (a process's turn to write), so the jobs
    that arrive while the caller waits for it join that batch. When ``write`` (or ``turn``)
    fails, every caller of the batch gets the exception."""

    def __init__(
        self,
        write: Callable[[Sequence[J]], Awaitable[Sequence[R]]],
        *,
        most: int,
        name: str,
        turn: Callable[[], AbstractAsyncContextManager[Any]] | None = None,
    ) -> None:
        self.most = most
        self.batches = 0  # how many it wrote (or tried), for measurements
        self._do = write
        self._name = name
        self._turn = turn or contextlib.nullcontext
        self._waiting: list[tuple[J, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, job: J) -> R:
        (result,) = await self.submit_all([job])
        return result

    async def submit_all(self, jobs: Sequence[J]) -> list[R]:
        """Several jobs, in order, in one batch when they fit in one."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in jobs]
        self._waiting.extend(zip(jobs, futures, strict=True))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=self._name)
        return list(await asyncio.gather(*(asyncio.shield(future) for future in futures)))

    def _take(self) -> list[tuple[J, asyncio.Future[R]]]:
        batch, self._waiting = self._waiting[: self.most], self._waiting[self.most :]
        return batch

    async def _write(self) -> None:
        while self._waiting:
            batch: list[tuple[J, asyncio.Future[R]]] = []
            try:
                async with self._turn():
                    await asyncio.sleep(0)  # the callers running now add theirs to this batch
                    batch = self._take()
                    results = await self._do([job for job, _ in batch])
            except Exception as exc:
                for _, future in batch or self._take():
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.batches += 1
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
