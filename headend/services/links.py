"""Links for the services: one open link per registered meter, reused until it fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

from headend.links.base import MeterLink
from headend.links.endpoint import LinkOptions, open_link
from headend.links.pool import LinkPool
from headend.storage.polling import PollTarget
from protocols.errors import HesError, LinkError, StorageError

log = logging.getLogger(__name__)


class EndpointLinks:
    """Opens each meter's link from its registered endpoint, over connections shared per
    gateway (one link pool); :meth:`close` closes them all."""

    def __init__(self, options: LinkOptions | None = None) -> None:
        self.options = options
        self._pool: LinkPool | None = None  # connections shared per gateway, serial line, broker
        self._links: dict[str, MeterLink] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def link(self, target: PollTarget) -> MeterLink:
        link = self._links.get(target.meter_id)
        if link is not None:
            return link
        lock = self._opening.setdefault(target.meter_id, asyncio.Lock())
        async with lock:
            link = self._links.get(target.meter_id)
            if link is None:
                try:
                    if self._pool is None:
                        self._pool = LinkPool()
                    link = await open_link(target.endpoint, self.options, pool=self._pool)
                except LinkError:
                    raise
                except HesError as exc:  # a malformed endpoint is this meter's failure
                    raise LinkError(f"{target.meter_id}: {exc}") from exc
                self._links[target.meter_id] = link
            return link

    def lanes(self, target: PollTarget) -> int | None:
        """One request at a time to a Modbus gateway (its links share one TCP connection) and
        on a serial line; no bound of its own over MQTT."""
        return 1 if target.transport in ("tcp", "rtu") else None

    async def discard(self, target: PollTarget) -> None:
        link = self._links.pop(target.meter_id, None)
        if link is not None:
            await _close(link)

    async def close(self) -> None:
        """Close every link (the source can be used again: links reopen on demand)."""
        links, self._links = list(self._links.values()), {}
        for link in links:
            await _close(link)
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


async def _close(link: MeterLink) -> None:
    with contextlib.suppress(HesError):  # a broken link's close has nothing more to tell
        await link.close()


class _Claim(Protocol):
    """A claimed command or transfer, as far as its line is concerned."""

    @property
    def id(self) -> int: ...
    @property
    def gateway(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def transport(self) -> str: ...


C = TypeVar("C", bound=_Claim)


class GatewayLines:
    """Work claimed items (commands, credit transfers) concurrently, at most ``per_gateway`` at
    a time on one gateway and one at a time on a serial line, and count how each one ended.

    By default an item holds its gateway's line for the whole of its work; a worker that
    writes to the database between its link operations may instead work ``guard=False`` and
    hold :meth:`line` only around those operations, so a gateway's turns are not spent
    waiting for a commit."""

    def __init__(self, per_gateway: int) -> None:
        self.per_gateway = per_gateway
        self._lines: dict[str, asyncio.Semaphore] = {}

    async def work_all(
        self,
        claimed: Sequence[C],
        work: Callable[[C], Awaitable[str]],
        outcomes: Counter[str],
        what: str,
        *,
        guard: bool = True,
    ) -> None:
        """``work`` each of ``claimed`` (returning the state it was left in) into
        ``outcomes``; a storage error is logged and counted (its lease will expire), anything
        else is raised."""
        ended = await asyncio.gather(
            *(self._guarded(item, work) if guard else work(item) for item in claimed),
            return_exceptions=True,
        )
        for item, outcome in zip(claimed, ended, strict=True):
            if isinstance(outcome, BaseException):
                raise_unless_storage(outcome, what, item.id)
                outcomes["storage error"] += 1
            else:
                outcomes[outcome] += 1

    def line(self, item: _Claim) -> asyncio.Semaphore:
        """The turns of ``item``'s gateway (of its serial line: one)."""
        gateway = item.gateway or item.endpoint
        line = self._lines.get(gateway)
        if line is None:
            line = asyncio.Semaphore(1 if item.transport == "rtu" else self.per_gateway)
            self._lines[gateway] = line
        return line

    async def _guarded(self, item: C, work: Callable[[C], Awaitable[str]]) -> str:
        async with self.line(item):
            return await work(item)


def raise_unless_storage(error: BaseException, what: str, item_id: int) -> None:
    """Log a storage error that ended the work of item ``item_id`` (its lease will expire);
    raise anything else."""
    if not isinstance(error, StorageError):
        raise error
    log.error("%s %d: %s (its lease will expire)", what, item_id, error)
