"""The credit deliverer: takes the credit transfers payments wrote for remote-credit meters and
sees each onto its meter exactly once.

A transfer's life is the table in :mod:`headend.domain.delivery`; each step is written to the
store (:mod:`headend.storage.delivery`) before the next one starts:

1. a transfer found ``sending`` (a retry, or a head-end that was killed while it was on the
   wire) is first read back: when the meter's last transfer number has reached it, it is
   delivered and nothing is sent again;
2. ``sending`` is recorded, with the signed envelope, *before* the envelope goes out; the
   envelope goes through :func:`~headend.links.base.execute_confirmed` (ask before any
   resend);
3. the meter's answer settles it (:func:`~headend.domain.delivery.judge`): applied, a repeat
   or a last transfer number at or past it is ``delivered``; a command sequence the meter has
   passed (a command to the meter went out meanwhile) is signed again and resent; no answer or
   a busy meter is retried with back-off, without end: the money is the customer's; a definite
   refusal is ``failed`` only once a read-back shows the meter does not have it;
4. ``delivered`` posts the delivery in the ledger and raises the customer's "payment
   received" notice, in the same transaction.

A keypad meter's STS token is not sent: the customer keys it in. It is marked delivered, with
the same posting and notice, once the meter reports its TID accepted (an event the poller or the
MQTT ingest stored).

One transfer per meter is in flight at a time, in transfer-number order; at most
``per_gateway`` meters of one gateway at once (one per serial line). The steps of concurrent
attempts are written together (:class:`~headend.storage.delivery.GroupWriter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from headend.domain.delivery import TransferState, Verdict, judge, read_back, retry_delay
from headend.domain.notices import QuietHours
from headend.links.base import MeterLink, RetryPolicy, execute_confirmed
from headend.services.links import GatewayLines
from headend.services.poller import LinkSource
from headend.storage import Database
from headend.storage.delivery import (
    GroupWriter,
    Held,
    accept_tokens,
    claim_transfers,
    confirm,
    give_up,
    retry_later,
    start_attempt,
)
from headend.storage.polling import PollTarget
from protocols.clock import Clock, clock_speed
from protocols.errors import DecodeError, DeviceException, LinkError, StorageError
from protocols.readings import MeterSnapshot

log = logging.getLogger(__name__)

#: how often one pass signs a transfer again when commands keep passing its sequence
RESIGNS: int = 3


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    attempt_timeout: float = 5.0  # real seconds one attempt may take, its resends included
    lease: float = 60.0  # real seconds a claim holds before another worker may take it over
    retry_base: timedelta = timedelta(seconds=30)  # back-off after the first unanswered attempt
    retry_most: timedelta = timedelta(minutes=10)
    busy_wait: timedelta = timedelta(seconds=5)  # while a command to the meter may still go out
    per_gateway: int = 4  # transfers in flight per gateway (a serial line takes one)
    batch: int = 64  # transfers claimed at a time
    notice_expiry: timedelta = timedelta(hours=24)


@dataclass(slots=True)
class DeliveryRound:
    """What one pass did: the state each transfer it worked was left in ('lost': another
    worker or a reversal took it meanwhile)."""

    outcomes: Counter[str] = field(default_factory=Counter)


class Deliverer:
    def __init__(
        self,
        db: Database,
        links: LinkSource,
        clock: Clock,
        *,
        worker: str = "hes",
        settings: DeliverySettings | None = None,
        quiet: QuietHours | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.db = db
        self.links = links
        self.clock = clock
        self.worker = worker
        self.settings = settings or DeliverySettings()
        self.quiet = quiet or QuietHours()
        self.retry = retry
        self._lines = GatewayLines(self.settings.per_gateway)
        self.writer = GroupWriter(db)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    async def deliver_once(self, meter_ids: Sequence[str] | None = None) -> DeliveryRound:
        """Mark the tokens meters reported accepted; claim the due transfers and work each one
        as far as it goes now."""
        result = DeliveryRound()
        now = self.now()
        accepted = await accept_tokens(
            self.db,
            now,
            actor=self.worker,
            quiet=self.quiet,
            expiry=self.settings.notice_expiry,
        )
        if accepted:
            result.outcomes["token accepted"] += accepted
        lease_until = now + timedelta(seconds=self.settings.lease * clock_speed(self.clock))
        claimed = await claim_transfers(
            self.db, self.worker, now, lease_until, self.settings.batch, meter_ids=meter_ids
        )
        if not claimed:
            return result
        await self._lines.work_all(claimed, self._work, result.outcomes, "transfer")
        return result

    async def _work(self, held: Held) -> str:
        """One transfer as far as it goes now; returns the state it is left in."""
        target = PollTarget(held.meter_id, held.endpoint, held.transport, "", 0, "")
        try:
            link = await self.links.link(target)
        except LinkError as exc:
            return await self._later(held, f"the meter cannot be reached: {exc}")
        if held.state is TransferState.SENDING:
            # it may be on the meter already: read back before any resend
            try:
                snapshot = await self._snapshot(link)
            except (LinkError, DecodeError, TimeoutError) as exc:
                await self.links.discard(target)
                return await self._later(held, f"reading back the last transfer: {exc}")
            if read_back(held.number, snapshot.last_transfer):
                why = f"read back: the meter's last transfer is {snapshot.last_transfer}"
                return await self._delivered(held, why, snapshot.credit)
        resign = False
        for _ in range(RESIGNS):
            started = await start_attempt(
                self.db, held, self.now(), resign=resign, writer=self.writer
            )
            if started is None:
                return "lost"
            if started == "busy":
                return await self._later(
                    held, "a command to the meter may still go out first", self.settings.busy_wait
                )
            held = started
            assert held.envelope is not None
            try:
                result = await execute_confirmed(
                    link, held.envelope, self.settings.attempt_timeout, policy=self.retry
                )
            except DeviceException as exc:  # (an answer that does not decode is asked about)
                await self.links.discard(target)
                why = f"the meter's answer: {exc}"
                try:
                    link = await self.links.link(target)  # a new one, to read back over
                except LinkError as again:
                    return await self._later(held, f"{why}; reconnecting: {again}")
                return await self._refused(held, link, why)
            except LinkError as exc:
                await self.links.discard(target)
                return await self._later(held, str(exc))
            verdict = judge(held.number, result)
            if verdict.verdict is Verdict.DELIVERED:
                return await self._delivered(held, verdict.reason, await self._credit(link))
            if verdict.verdict is Verdict.RETRY:
                return await self._later(held, verdict.reason)
            if verdict.verdict is Verdict.FAILED:
                return await self._refused(held, link, verdict.reason)
            log.info("%s: transfer %d: %s", held.meter_id, held.number, verdict.reason)
            resign = True
        return await self._later(held, "commands to the meter keep passing its sequence")

    async def _snapshot(self, link: MeterLink) -> MeterSnapshot:
        async with asyncio.timeout(self.settings.attempt_timeout):
            return await link.read_snapshot()

    async def _credit(self, link: MeterLink) -> int | None:
        """The meter's credit now, for the customer's notice; None if it does not answer."""
        try:
            return (await self._snapshot(link)).credit
        except (LinkError, DecodeError, TimeoutError) as exc:
            log.info("%s: reading the credit after a transfer: %s", link.meter_id, exc)
            return None

    async def _delivered(self, held: Held, how: str, credit: int | None) -> str:
        done = await confirm(
            self.db,
            held,
            self.now(),
            how=how,
            credit=credit,
            quiet=self.quiet,
            expiry=self.settings.notice_expiry,
            writer=self.writer,
        )
        if not done:
            return "lost"
        log.info("%s: transfer %d delivered (%s)", held.meter_id, held.number, how)
        return TransferState.DELIVERED.value

    async def _refused(self, held: Held, link: MeterLink, reason: str) -> str:
        """A definite refusal: failed, once a read-back shows the meter does not have it (an
        earlier attempt may have reached it); retried when the read-back fails."""
        try:
            snapshot = await self._snapshot(link)
        except (LinkError, DecodeError, TimeoutError) as exc:
            return await self._later(held, f"{reason}; reading back the last transfer: {exc}")
        if read_back(held.number, snapshot.last_transfer):
            why = f"read back: the meter's last transfer is {snapshot.last_transfer}"
            return await self._delivered(held, why, snapshot.credit)
        done = await give_up(
            self.db, held, self.now(), reason, expiry=self.settings.notice_expiry,
            writer=self.writer,
        )  # fmt: skip
        if not done:
            return "lost"
        log.warning("%s: transfer %d failed: %s", held.meter_id, held.number, reason)
        return TransferState.FAILED.value

    async def _later(self, held: Held, reason: str, wait: timedelta | None = None) -> str:
        now = self.now()
        if wait is None:
            wait = retry_delay(
                max(held.attempts, 1), self.settings.retry_base, self.settings.retry_most
            )
        done = await retry_later(self.db, held, now, now + wait, reason, writer=self.writer)
        return held.state.value if done else "lost"

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Deliver until ``stop``; the attempts in flight finish before it returns."""
        delay = tick
        while not stop.is_set():
            try:
                result = await self.deliver_once()
                delay = tick if not result.outcomes else 0.0
            except StorageError as exc:
                log.error("credit deliverer: %s", exc)
                delay = min(max(delay, tick) * 2, 30.0)
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)


__all__ = ["Deliverer", "DeliveryRound", "DeliverySettings"]
