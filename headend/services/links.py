"""Links for the services: one open link per registered meter, reused until it fails."""

from __future__ import annotations

import asyncio
import contextlib

from headend.links.base import MeterLink
from headend.links.endpoint import LinkOptions, open_link
from headend.links.pool import LinkPool
from headend.storage.polling import PollTarget
from protocols.errors import HesError, LinkError


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
