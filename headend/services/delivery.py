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
``per_gateway`` meters of one gateway on the wire at once (one per serial line), a gateway's
turn held only while the link is used, not while a step is written. The steps of concurrent
attempts are written together (:class:`~headend.storage.delivery.GroupWriter`).

:meth:`Deliverer.run` keeps up to ``batch`` transfers in flight, claiming more as soon as it is
woken (:meth:`Deliverer.wake`: a payment of its process that wrote a transfer, on PostgreSQL
the notification of any worker's commit that wrote one, or a transfer that ended and freed a
place or its meter's next transfer) and on its tick otherwise, which also covers those falling
due after a back-off and a notification lost with its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from headend.domain.delivery import (
    Judgement,
    TransferState,
    Verdict,
    judge,
    read_back,
    retry_delay,
)
from headend.domain.notices import QuietHours
from headend.links.base import MeterLink, RetryPolicy, execute_confirmed
from headend.services.links import GatewayLines, raise_unless_storage
from headend.services.poller import LinkSource
from headend.storage import Database
from headend.storage.delivery import (
    GroupWriter,
    Held,
    accept_tokens,
    claim_transfers,
    confirm,
    give_up,
    listen_for_transfers,
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


@dataclass(frozen=True, slots=True)
class Refused:
    """A definite refusal of an attempt, and what the read-back after it showed."""

    reason: str
    last_transfer: int
    credit: int


@dataclass(slots=True)
class DeliveryRound:
    """What one pass did: the state each transfer it worked was left in ('lost': another
    worker or a reversal took it meanwhile)."""

    outcomes: Counter[str] = field(default_factory=Counter)


#: seconds between two claims of a deliverer while transfers are in flight
CLAIM_GAP = 0.01


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
        self._woken = asyncio.Event()
        self._claim_room = max(1, self.settings.batch // 4)  # places a claim waits for

    def wake(self) -> None:
        """Look for transfers to claim now, not at the next tick (call it once a transfer was
        committed; from the event loop's thread)."""
        self._woken.set()

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
        await self._lines.work_all(claimed, self._work, result.outcomes, "transfer", guard=False)
        return result

    async def _work(self, held: Held) -> str:
        """One transfer as far as it goes now; returns the state it is left in. The
        gateway's line is held while the link is used, between the steps' writes."""
        line = self._lines.line(held)
        target = PollTarget(held.meter_id, held.endpoint, held.transport, "", 0, "")
        try:
            async with line:
                link = await self.links.link(target)
        except LinkError as exc:
            return await self._later(held, f"the meter cannot be reached: {exc}")
        if held.state is TransferState.SENDING:
            # it may be on the meter already: read back before any resend
            async with line:
                snapshot = await self._read_back(link, target)
            if isinstance(snapshot, str):
                return await self._later(held, snapshot)
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
            async with line:
                sent = await self._send(held, link, target)
            if isinstance(sent, str):
                return await self._later(held, sent)
            if isinstance(sent, Refused):
                return await self._judged_refusal(held, sent)
            verdict, credit, link = sent
            if verdict.verdict is Verdict.DELIVERED:
                return await self._delivered(held, verdict.reason, credit)
            if verdict.verdict is Verdict.RETRY:
                return await self._later(held, verdict.reason)
            log.info("%s: transfer %d: %s", held.meter_id, held.number, verdict.reason)
            resign = True
        return await self._later(held, "commands to the meter keep passing its sequence")

    async def _read_back(self, link: MeterLink, target: PollTarget) -> MeterSnapshot | str:
        """The meter's snapshot (under the gateway's line); a string: why it was not read."""
        try:
            return await self._snapshot(link)
        except (LinkError, DecodeError, TimeoutError) as exc:
            await self.links.discard(target)
            return f"reading back the last transfer: {exc}"

    async def _send(
        self, held: Held, link: MeterLink, target: PollTarget
    ) -> tuple[Judgement, int | None, MeterLink] | Refused | str:
        """The link part of an attempt (under the gateway's line): the envelope sent and
        confirmed, and then the meter's credit read for the notice when it was delivered, or
        a definite refusal read back; a string: why to retry later."""
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
                return f"{why}; reconnecting: {again}"
            return await self._read_refusal(link, why)
        except LinkError as exc:
            await self.links.discard(target)
            return str(exc)
        verdict = judge(held.number, result)
        if verdict.verdict is Verdict.FAILED:
            return await self._read_refusal(link, verdict.reason)
        if verdict.verdict is Verdict.DELIVERED:
            return verdict, await self._credit(link), link
        return verdict, None, link

    async def _read_refusal(self, link: MeterLink, reason: str) -> Refused | str:
        """A definite refusal, with the read-back that shows whether an earlier attempt
        reached the meter; a string (retry later) when the read-back fails."""
        try:
            snapshot = await self._snapshot(link)
        except (LinkError, DecodeError, TimeoutError) as exc:
            return f"{reason}; reading back the last transfer: {exc}"
        return Refused(reason, snapshot.last_transfer, snapshot.credit)

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

    async def _judged_refusal(self, held: Held, refused: Refused) -> str:
        """A definite refusal: failed, once the read-back shows the meter does not have it (an
        earlier attempt may have reached it)."""
        reason = refused.reason
        if read_back(held.number, refused.last_transfer):
            why = f"read back: the meter's last transfer is {refused.last_transfer}"
            return await self._delivered(held, why, refused.credit)
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
        """Deliver until ``stop``, up to ``batch`` transfers in flight: claim more when woken
        (:meth:`wake`, or a transfer ending) and every ``tick`` seconds, when the tokens
        reported accepted are marked too; the attempts in flight finish before it
        returns."""
        loop = asyncio.get_running_loop()
        working: set[asyncio.Task[str]] = set()
        failures: list[BaseException] = []
        tokens_due = loop.time()
        claimed_at = -CLAIM_GAP
        delay = 0.0  # after a storage error: the wait before trying again

        def ended(task: asyncio.Task[str]) -> None:
            working.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]
            self._woken.set()  # a place is free, and the meter's next transfer may be due

        # other workers' payments (PostgreSQL): their commits notify this one
        listener = asyncio.create_task(
            listen_for_transfers(self.db, self.wake, stop), name="credit transfers written"
        )
        try:
            while not stop.is_set() and not failures:
                self._woken.clear()
                try:
                    if loop.time() >= tokens_due:
                        tokens_due = loop.time() + tick
                        await self._accept_tokens()
                    room = self.settings.batch - len(working)
                    # claim for several places at once (a claim costs as much as a step):
                    # when a quarter of the batch is free, or nothing is in flight; and while
                    # transfers are in flight, at most once every CLAIM_GAP, so the payments
                    # and transfer ends of those milliseconds are claimed together
                    if room > 0 and (room >= self._claim_room or not working):
                        gap = claimed_at + CLAIM_GAP - loop.time()
                        if working and gap > 0:
                            await asyncio.sleep(gap)
                            room = self.settings.batch - len(working)
                        claimed_at = loop.time()
                        for held in await self._claim(room):
                            task = asyncio.create_task(
                                self._work_logged(held), name=f"transfer {held.id}"
                            )
                            working.add(task)
                            task.add_done_callback(ended)
                    delay = 0.0
                except StorageError as exc:
                    log.error("credit deliverer: %s", exc)
                    delay = min(max(delay * 2, tick), 30.0)
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                waiting = [
                    asyncio.ensure_future(stop.wait()),
                    asyncio.ensure_future(self._woken.wait()),
                ]
                try:
                    await asyncio.wait(
                        waiting,
                        timeout=max(0.0, tokens_due - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for waiter in waiting:
                        waiter.cancel()
        finally:
            listener.cancel()
            if working:
                await asyncio.gather(*working, return_exceptions=True)
            await asyncio.gather(listener, return_exceptions=True)
        if failures:
            raise failures[0]

    async def _accept_tokens(self) -> None:
        await accept_tokens(
            self.db,
            self.now(),
            actor=self.worker,
            quiet=self.quiet,
            expiry=self.settings.notice_expiry,
        )

    async def _claim(self, limit: int) -> list[Held]:
        now = self.now()
        lease_until = now + timedelta(seconds=self.settings.lease * clock_speed(self.clock))
        return await claim_transfers(self.db, self.worker, now, lease_until, limit)

    async def _work_logged(self, held: Held) -> str:
        """One transfer, a storage error logged (its lease will expire)."""
        try:
            return await self._work(held)
        except StorageError as exc:
            raise_unless_storage(exc, "transfer", held.id)
            return "storage error"


__all__ = ["Deliverer", "DeliveryRound", "DeliverySettings"]
