"""The notifier: takes due notices from the outbox, sends each through its channel, and marks
it sent, due again later (with back-off), or failed once it expires or is refused for good.

Each outcome is written with its audit entry in one transaction, fenced by the claim's lease, so
two workers never both record one notice, and a worker that died holding notices only delays
them until its leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from headend.domain.notices import Channel, Kind, render
from headend.domain.schedule import retry_delay
from headend.services.senders import Outgoing, Sender
from headend.storage import Database, audit
from headend.storage.notices import Pending, claim, finish
from protocols.clock import Clock
from protocols.errors import DeliveryError, DeliveryRefused, StorageError, ValidationError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DeliveryRound:
    sent: int = 0
    retried: int = 0
    failed: int = 0


class Notifier:
    def __init__(
        self,
        db: Database,
        senders: Mapping[str, Sender],
        clock: Clock,
        *,
        worker: str = "notifier",
        retry_base: float = 5.0,
        retry_cap: float = 600.0,
        lease: float = 60.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.senders = senders
        self.clock = clock
        self.worker = worker
        self.retry_base, self.retry_cap, self.lease = retry_base, retry_cap, lease
        self._draw = draw

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    async def deliver_once(self, limit: int = 100) -> DeliveryRound:
        """Send every notice due now (up to ``limit``)."""
        now = self._now()
        until = now + timedelta(seconds=self.lease)
        pending = await claim(self.db, self.worker, now, until, limit, channels=list(self.senders))
        result = DeliveryRound()
        for notice in pending:
            outcome = await self._deliver(notice)
            setattr(result, outcome, getattr(result, outcome) + 1)
        return result

    async def _deliver(self, notice: Pending) -> str:
        now = self._now()
        if now >= notice.expires_at:
            await self._record(notice, "failed", "expired before it could be sent", None)
            return "failed"
        sender = self.senders.get(notice.channel)
        if sender is None:
            await self._record(notice, "failed", f"no sender for channel {notice.channel}", None)
            return "failed"
        try:
            text = render(
                Kind(notice.kind), notice.language, notice.values, Channel(notice.channel)
            )
        except (ValidationError, ValueError) as exc:
            await self._record(notice, "failed", f"cannot render it: {exc}", None)
            return "failed"
        outgoing = Outgoing(
            notice.idempotency_key,
            notice.kind,
            notice.channel,
            notice.address,
            notice.language,
            text.subject,
            text.body,
            notice.values,
            notice.meter_id,
            notice.account_id,
            () if notice.attachment is None else (notice.attachment,),
        )
        try:
            await sender.send(outgoing)
        except DeliveryRefused as exc:
            await self._record(notice, "failed", str(exc), None)
            return "failed"
        except DeliveryError as exc:
            delay = retry_delay(
                min(notice.attempts, 30), self.retry_base, self.retry_cap, self._draw()
            )
            again = now + timedelta(seconds=delay)
            if again >= notice.expires_at:
                await self._record(notice, "failed", f"{exc}; expires before the next try", None)
                return "failed"
            await self._record(notice, "pending", str(exc), again)
            log.info("notice %s: %s; again at %s", notice.idempotency_key, exc, again.isoformat())
            return "retried"
        await self._record(notice, "sent", None, None)
        return "sent"

    async def _record(
        self, notice: Pending, state: str, error: str | None, again: datetime | None
    ) -> None:
        now = self._now()
        async with self.db.begin() as session:
            mine = await finish(
                session,
                notice.id,
                self.worker,
                state=state,
                now=now,
                error=error,
                next_attempt_at=again,
            )
            if mine and state != "pending":
                await audit.append(
                    session,
                    at=now,
                    actor=self.worker,
                    action=f"notice.{notice.kind}",
                    subject=notice.meter_id or notice.account_id or notice.address,
                    reason=error or "due",
                    outcome=state,
                    detail={"key": notice.idempotency_key, "channel": notice.channel},
                )
        if state == "failed":
            log.warning("notice %s failed: %s", notice.idempotency_key, error)

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Deliver due notices until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.deliver_once()
            except StorageError as exc:
                log.error("notifier: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)

    async def close(self) -> None:
        for sender in self.senders.values():
            await sender.close()
