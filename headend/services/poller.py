"""Automated meter reading: read every active meter once per interval, validate, store.

A read is stored all or nothing: the snapshot (validated against the meter's previous
reading), the load-profile intervals since the last stored one (gaps the meter can no longer
fill recorded and estimated), the events since the last stored sequence, and the meter's read
health. Reads that finish together share one transaction (a group commit: a batch waits a
moment for the reads still talking to their meters); a batch that fails is stored again read
by read, so only the read at fault fails. A read killed half-way stores nothing, and the next
read picks up from what is stored, so the store has no gap that the meter could still fill and
no duplicate.

A read costs one request while the meter has nothing new: the profile is asked for only once
the meter's clock has passed the next interval boundary after the last profile read (rows fall
on multiples of the period), the event log only when the snapshot's last event sequence is
beyond the last one stored.

Each transport has its own concurrency bound, each gateway (a Modbus TCP host:port, a serial
line, a broker) its own; a serial line carries one request at a time. Meters are spread over
the interval by a stable slot, claimed through the database (leases), so several workers share
a fleet and a dead worker's meters are read by the others once its leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import Any, Protocol

from headend.domain.schedule import next_due, retry_delay
from headend.domain.validation import (
    CheckedInterval,
    Findings,
    Limits,
    check_intervals,
    estimate_gap,
    validate_reading,
)
from headend.links.base import MeterLink
from headend.storage import Database, Session
from headend.storage.polling import (
    PollTarget,
    active_targets,
    claim_due,
    ensure_health_rows,
    release,
)
from headend.storage.readings import (
    event_rows,
    gap_row,
    insert_rows,
    interval_row,
    last_event_seqs,
    last_intervals,
    reading_row,
    record_read,
    record_reads_ok,
    store_new_readings,
    stored_before,
)
from headend.storage.schema import Gap, Interval, MeterEvent
from protocols.clock import Clock, clock_speed
from protocols.errors import HesError, LinkError, StorageError, ValidationError
from protocols.readings import Event, MeterSnapshot, ProfileRow

log = logging.getLogger(__name__)


class LinkSource(Protocol):
    """Where the poller gets a meter's link; the source owns and closes the links."""

    async def link(self, target: PollTarget) -> MeterLink: ...

    async def discard(self, target: PollTarget) -> None:
        """Forget the meter's link after a failure, so the next read reconnects."""
        ...

    def lanes(self, target: PollTarget) -> int | None:
        """How many requests the source's links carry to ``target``'s gateway at once (None:
        no bound of the source's own). A round starts no more readers for a gateway than
        that: one more would only wait for the connection."""
        ...


@dataclass(frozen=True, slots=True)
class PollPlan:
    interval: float = 900.0  # seconds between two reads of a meter
    read_deadline: float = 20.0  # the longest one meter's read may take, retries included
    attempts: int = 3
    retry_base: float = 0.5
    retry_cap: float = 5.0
    concurrency: dict[str, int] = field(
        default_factory=lambda: {"tcp": 64, "rtu": 8, "mqtt": 256}
    )  # reads in flight per transport
    per_gateway: dict[str, int] = field(
        default_factory=lambda: {"tcp": 8, "rtu": 1, "mqtt": 256}
    )  # reads in flight per gateway
    unreachable_after: int = 3
    initial_history: int = 86400  # how far back the first read of a meter fetches, s
    event_page: int = 500
    lease: float = 120.0  # how long a claim holds before another worker may take the meter
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not self.interval > 0 or not self.read_deadline > 0 or self.attempts < 1:
            raise ValidationError("interval and read_deadline are positive, attempts >= 1")
        if self.lease <= self.read_deadline:
            raise ValidationError("a lease must outlast a read (lease > read_deadline)")


@dataclass(slots=True)
class ReadOutcome:
    meter_id: str
    ok: bool
    error: str = ""
    reading_new: bool = False
    intervals: int = 0
    estimated: int = 0
    events: int = 0
    gaps: int = 0
    flagged: int = 0
    duplicates: int = 0
    backfilled: bool = False
    attempts: int = 0


@dataclass(slots=True)
class RoundSummary:
    outcomes: list[ReadOutcome] = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failed(self) -> int:
        return sum(not o.ok for o in self.outcomes)

    def total(self, name: str) -> int:
        return sum(int(getattr(o, name)) for o in self.outcomes)

    def as_dict(self) -> dict[str, object]:
        return {
            "meters": len(self.outcomes),
            "read": self.read,
            "failed": self.failed,
            "backfilled": self.total("backfilled"),
            "flagged": self.total("flagged"),
            "intervals": self.total("intervals"),
            "estimated": self.total("estimated"),
            "events": self.total("events"),
            "gaps": self.total("gaps"),
            "duplicates": self.total("duplicates"),
            "failures": {o.meter_id: o.error for o in self.outcomes if not o.ok},
        }


@dataclass(slots=True)
class _Fetched:
    snapshot: MeterSnapshot
    profile: list[ProfileRow]
    events: list[Event]
    profile_read: bool  # the profile was read up to the snapshot's time
    hint: _Hint  # what the read started from


@dataclass(frozen=True, slots=True)
class _Hint:
    """What this poller stored last of a meter: its latest interval, its latest event sequence
    and the meter time up to which its profile was read (None: not known). Older than the
    store at worst (another worker may have stored more), which only makes a read ask for rows
    the store has; the store's own rows are what a batch validates against."""

    last: CheckedInterval | None
    seq: int
    profile_through: int | None = None


def _profile_due(start: int, through: int | None, period: int) -> tuple[int, int]:
    """(the meter time from which a profile read has something new to give, the start of
    that read): rows up to ``through`` are stored; rows fall on multiples of ``period``."""
    if through is None or through < start:
        return start, start
    return max(start, (through // period + 1) * period), through + 1


class Poller:
    def __init__(
        self,
        db: Database,
        links: LinkSource,
        clock: Clock,
        *,
        plan: PollPlan | None = None,
        worker: str = "hes",
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.db = db
        self.links = links
        self.clock = clock
        self.plan = plan or PollPlan()
        self.worker = worker
        self._draw = draw
        self._transport: dict[str, asyncio.Semaphore] = {}
        self._gateway: dict[tuple[str, str], asyncio.Semaphore] = {}
        #: reads that succeeded and failed, and the transactions that stored them ("batches")
        self.counts: Counter[str] = Counter()
        self._pending: list[
            tuple[PollTarget, _Fetched, ReadOutcome, Callable[[BaseException | None], None]]
        ] = []
        self._writer: asyncio.Task[None] | None = None
        self._fetching = 0  # reads talking to their meter now (their store may join a batch)
        self._flush = asyncio.Event()  # a batch is full, or no read is left to join it
        #: per meter, what this poller stored last (saves two queries and, while the meter has
        #: captured no new interval, the profile request of a read)
        self._known: dict[str, _Hint] = {}
        self._health_rows = False  # poll_once made sure every active meter has its row

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    def _limits(self, target: PollTarget) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        kind = target.transport
        if kind not in self._transport:
            self._transport[kind] = asyncio.Semaphore(self.plan.concurrency.get(kind, 16))
        key = (kind, target.gateway)
        if key not in self._gateway:
            self._gateway[key] = asyncio.Semaphore(self.plan.per_gateway.get(kind, 1))
        return self._transport[kind], self._gateway[key]

    # -- one round ------------------------------------------------------------------------------

    async def poll_once(
        self,
        meter_ids: list[str] | None = None,
        progress: Callable[[ReadOutcome], None] | None = None,
    ) -> RoundSummary:
        """Read every active meter (or the ones named) once, now; for `hes poll --once`."""
        if not self._health_rows:  # once per poller: meters registered since get theirs
            await ensure_health_rows(self.db)
            self._health_rows = True
        targets = await active_targets(self.db, meter_ids)
        if meter_ids is not None:
            missing = sorted(set(meter_ids) - {t.meter_id for t in targets})
            if missing:
                raise StorageError(f"not registered or retired: {', '.join(missing)}")
        return await self._round(targets, progress)

    async def _round(
        self, targets: Sequence[PollTarget], progress: Callable[[ReadOutcome], None] | None
    ) -> RoundSummary:
        """Read ``targets``: per gateway as many readers as it takes reads at once (and its
        links carry), each holding its turn on the transport and the gateway while it reads
        its gateway's meters one after the other, under one deadline timer, and hands each
        read to the batch writer without waiting for it to be stored."""
        summary = RoundSummary()
        await self._learn([t.meter_id for t in targets if t.meter_id not in self._known])
        queues: dict[tuple[str, str], deque[PollTarget]] = {}
        for target in targets:
            queues.setdefault((target.transport, target.gateway), deque()).append(target)
        unstored = 0  # reads handed to the writer and not yet settled
        all_stored = asyncio.Event()

        def finish(outcome: ReadOutcome) -> None:
            summary.outcomes.append(outcome)
            if progress is not None:
                progress(outcome)

        def stored(target: PollTarget, outcome: ReadOutcome, error: BaseException | None) -> None:
            nonlocal unstored
            unstored -= 1
            if not unstored:
                all_stored.set()
            if error is None:
                finish(self._stored(outcome))
            else:  # this meter's read is lost; the round goes on
                log.error("storing a read of %s failed: %s", target.meter_id, error)
                finish(ReadOutcome(target.meter_id, ok=False, error=f"storage: {error}"))

        async def reader(
            queue: deque[PollTarget], transport: asyncio.Semaphore, gateway: asyncio.Semaphore
        ) -> None:
            nonlocal unstored
            deadline = _Deadline()
            try:
                async with transport, gateway:
                    while queue:
                        target = queue.popleft()
                        try:
                            outcome, fetched = await self._fetch_retried(target, deadline)
                            if fetched is None:
                                finish(await self._failed(target, outcome))
                                continue
                        except StorageError as exc:  # this meter's read is lost; the round goes on
                            log.error("storing a read of %s failed: %s", target.meter_id, exc)
                            finish(ReadOutcome(target.meter_id, ok=False, error=f"storage: {exc}"))
                            continue
                        unstored += 1
                        self._enqueue(target, fetched, outcome, partial(stored, target, outcome))
            finally:
                deadline.close()

        async with asyncio.TaskGroup() as group:
            for (kind, _), queue in queues.items():
                readers = min(len(queue), self.plan.per_gateway.get(kind, 1))
                lanes = self.links.lanes(queue[0])
                if lanes is not None:
                    readers = max(1, min(readers, lanes))
                transport, gateway = self._limits(queue[0])
                for _ in range(readers):
                    group.create_task(reader(queue, transport, gateway))
        while unstored:
            all_stored.clear()
            await all_stored.wait()
        summary.outcomes.sort(key=lambda o: o.meter_id)
        return summary

    async def _learn(self, meter_ids: Sequence[str], chunk: int = 500) -> None:
        """What the store holds last of meters this poller has not stored yet (their latest
        interval and event sequence), a few queries for all of them: a round's first reads
        then do not each ask the store on their own."""
        for start in range(0, len(meter_ids), chunk):
            ids = meter_ids[start : start + chunk]
            async with self.db.read() as session:
                intervals = await last_intervals(session, ids)
                seqs = await last_event_seqs(session, ids)
            for meter_id in ids:
                self._known.setdefault(
                    meter_id, _Hint(intervals.get(meter_id), seqs.get(meter_id, 0))
                )

    # -- one meter ------------------------------------------------------------------------------

    async def read(self, target: PollTarget) -> ReadOutcome:
        """Read one meter with retries inside its deadline, store what it gave, record its
        health; never raises for the meter's own failures (a StorageError when its read cannot
        be stored). The deadline runs from when the read first gets its turn on the transport
        and gateway, not while it queues."""
        deadline = _Deadline()
        try:
            outcome, fetched = await self._fetch_retried(target, deadline, self._limits(target))
        finally:
            deadline.close()
        if fetched is None:
            return await self._failed(target, outcome)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(target, fetched, outcome, partial(_settle, done))
        await done
        return self._stored(outcome)

    def _stored(self, outcome: ReadOutcome) -> ReadOutcome:
        outcome.ok = True
        self.counts["read"] += 1
        return outcome

    async def _fetch_retried(
        self,
        target: PollTarget,
        deadline: _Deadline,
        limits: tuple[asyncio.Semaphore, asyncio.Semaphore] | None = None,
    ) -> tuple[ReadOutcome, _Fetched | None]:
        """The meter's read, tried again after link errors within the deadline; None (and
        the outcome's error) when it failed. Each attempt takes its turn on ``limits`` (the
        transport's and the gateway's) unless the caller holds it already (None)."""
        outcome = ReadOutcome(target.meter_id, ok=False)
        loop = asyncio.get_running_loop()
        until: float | None = None
        error = ""
        try:
            for attempt in range(self.plan.attempts):
                outcome.attempts = attempt + 1
                try:
                    if limits is None:
                        if until is None:
                            until = loop.time() + self.plan.read_deadline
                        return outcome, await self._fetch_within(target, deadline, until)
                    async with limits[0], limits[1]:
                        if until is None:
                            until = loop.time() + self.plan.read_deadline
                        return outcome, await self._fetch_within(target, deadline, until)
                except LinkError as exc:
                    error = str(exc) or type(exc).__name__
                    await self.links.discard(target)
                    pause = retry_delay(
                        attempt, self.plan.retry_base, self.plan.retry_cap, self._draw()
                    )
                    if attempt + 1 >= self.plan.attempts:
                        break
                    if until is not None and loop.time() + pause >= until:
                        raise TimeoutError from exc
                    await asyncio.sleep(pause)
        except TimeoutError:
            error = f"no complete read within {self.plan.read_deadline:g} s ({error or 'slow'})"
            await self.links.discard(target)
        except HesError as exc:
            if isinstance(exc, StorageError):
                raise
            error = f"{type(exc).__name__}: {exc}"
            await self.links.discard(target)
        outcome.error = error
        return outcome, None

    async def _fetch_within(
        self, target: PollTarget, deadline: _Deadline, until: float
    ) -> _Fetched:
        """:meth:`_fetch` ended by TimeoutError at ``until`` (loop time)."""
        self._fetching += 1
        try:
            with deadline.at(until):
                return await self._fetch(target)
        finally:
            self._fetching -= 1
            if not self._fetching:
                self._flush.set()

    async def _failed(self, target: PollTarget, outcome: ReadOutcome) -> ReadOutcome:
        """Record a failed read in the meter's health."""
        async with self.db.begin() as session:
            change = await record_read(
                session,
                target.meter_id,
                False,
                now=self._now(),
                error=outcome.error,
                unreachable_after=self.plan.unreachable_after,
            )
        if change is not None:
            log.warning("meter %s is %s: %s", target.meter_id, change.new, outcome.error)
        self.counts["failed"] += 1
        return outcome

    async def _fetch(self, target: PollTarget) -> _Fetched:
        link = await self.links.link(target)
        snapshot = await link.read_snapshot()
        if snapshot.meter_id != target.meter_id:
            raise LinkError(
                f"{target.endpoint} answers as {snapshot.meter_id}, not {target.meter_id}"
            )
        if target.meter_id not in self._known:  # not stored by this poller yet: ask the store
            await self._learn([target.meter_id])
        hint = self._known[target.meter_id]
        period = target.profile_period
        if hint.last is not None:
            start = hint.last.start + 2 * period  # the next interval's end
        else:
            start = snapshot.time - self.plan.initial_history
        # a profile row is captured when the meter's clock passes its time (a multiple of the
        # period), so rows up to the time of a snapshot read before are all stored: ask again
        # only once the clock has passed the next boundary after it
        due, start = _profile_due(start, hint.profile_through, period)
        profile = await link.read_profile(start, snapshot.time) if due <= snapshot.time else []
        events: list[Event] = []
        since = hint.seq
        while since < snapshot.last_event_seq:
            page = await link.read_events(since, self.plan.event_page)
            if not page:
                break
            events += page
            since = page[-1].seq
        return _Fetched(snapshot, profile, events, due <= snapshot.time, hint)

    def _enqueue(
        self,
        target: PollTarget,
        fetched: _Fetched,
        outcome: ReadOutcome,
        settle: Callable[[BaseException | None], None],
    ) -> None:
        """Hand one meter's read to the writer; ``settle`` is called once it is stored (None)
        or with its StorageError. Reads finishing together share one transaction (a group
        commit: one writer, one commit for the batch), each still all or nothing."""
        self._pending.append((target, fetched, outcome, settle))
        if len(self._pending) >= _BATCH or not self._fetching:
            self._flush.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_batches())

    async def _write_batches(self) -> None:
        while self._pending:
            if len(self._pending) < _BATCH and self._fetching:
                # reads are finishing meanwhile: let the batch fill for a moment, since one
                # transaction of many reads costs about what one of a single read does
                self._flush.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_LINGER):
                        await self._flush.wait()
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            items = [(target, fetched, outcome) for target, fetched, outcome, _ in batch]
            try:
                async with self.db.begin() as session:
                    hints = await self._store_batch(session, items)
                self._known.update(hints)  # committed
                self.counts["batches"] += 1
            except HesError:
                # one read spoiled the batch: store each on its own, so only it fails
                for target, fetched, outcome, settle in batch:
                    _reset(outcome)
                    try:
                        async with self.db.begin() as session:
                            hints = await self._store_batch(session, [(target, fetched, outcome)])
                        self._known.update(hints)
                    except HesError as exc:
                        if not isinstance(exc, StorageError):
                            exc = StorageError(f"{type(exc).__name__}: {exc}")
                        settle(exc)
                    else:
                        settle(None)
                continue
            except BaseException as exc:
                for *_, settle in batch:
                    settle(exc)
                raise
            for *_, settle in batch:
                settle(None)

    async def _store_batch(
        self, session: Session, items: Sequence[tuple[PollTarget, _Fetched, ReadOutcome]]
    ) -> dict[str, _Hint]:
        """Validate and store the reads of several meters (distinct) with a few statements:
        what the store holds of them (the latest interval and event sequence only of the meters
        whose read brought rows), then one insert per table and one update of their health."""
        now = self._now()
        head_end_time = int(self.clock.now())
        ids = [target.meter_id for target, _, _ in items]
        before = await stored_before(
            session,
            ids,
            intervals_of=[t.meter_id for t, f, _ in items if f.profile],
            events_of=[t.meter_id for t, f, _ in items if f.events],
        )
        readings: list[dict[str, Any]] = []
        intervals: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        gaps: list[dict[str, Any]] = []
        expected: Counter[str] = Counter()
        hints: dict[str, _Hint] = {}
        limits = self.plan.limits
        for target, fetched, outcome in items:
            meter_id, snapshot = target.meter_id, fetched.snapshot
            previous = before.readings.get(meter_id)
            if previous is not None and previous.meter_time == snapshot.time:
                findings = Findings()  # the same reading again: stored already
            else:
                findings = validate_reading(snapshot, previous, head_end_time, limits)
                if findings.flags:
                    outcome.flagged += 1
                    log.info("meter %s: %s", meter_id, findings.reason)
            readings.append(reading_row(snapshot, findings, now, "poll"))
            hint = fetched.hint
            last = before.intervals.get(meter_id) if fetched.profile else None
            newest = hint.last
            if fetched.profile:
                checked, found = check_intervals(
                    fetched.profile, target.profile_period, last, limits
                )
                estimates = _estimates(last, checked)
                intervals += [interval_row(meter_id, i) for i in (*checked, *estimates)]
                expected[meter_id] = len(checked) + len(estimates)
                outcome.intervals, outcome.estimated = len(checked), len(estimates)
                outcome.flagged += sum(bool(c.findings.flags) for c in checked)
                outcome.backfilled = len(checked) > 1 and last is not None
                gaps += [gap_row(meter_id, "intervals", a, b, now) for a, b in found]
                newest = max((*checked, *estimates), key=lambda i: i.start, default=last)
            since = before.seqs.get(meter_id, 0) if fetched.events else None
            new_events = [e for e in fetched.events if since is not None and e.seq > since]
            if since is not None and new_events and new_events[0].seq > since + 1:
                gaps.append(gap_row(meter_id, "events", since + 1, new_events[0].seq - 1, now))
            events += event_rows(meter_id, new_events, now)
            seq = new_events[-1].seq if new_events else since
            through = snapshot.time if fetched.profile_read else hint.profile_through
            hints[meter_id] = _Hint(newest, hint.seq if seq is None else seq, through)
        new_readings = {row[0] for row in await store_new_readings(session, readings)}
        stored = Counter(row[0] for row in await insert_rows(session, Interval, intervals))
        stored_events = Counter(row[0] for row in await insert_rows(session, MeterEvent, events))
        stored_gaps = Counter(row[0] for row in await insert_rows(session, Gap, gaps, Gap.meter_id))
        for target, _, outcome in items:
            meter_id = target.meter_id
            outcome.reading_new = meter_id in new_readings
            if not outcome.reading_new:
                outcome.duplicates += 1
            outcome.duplicates += expected[meter_id] - stored[meter_id]
            outcome.events = stored_events[meter_id]
            outcome.gaps = stored_gaps[meter_id]
        for meter_id, change in await record_reads_ok(session, ids, now, before.health):
            log.info("meter %s is %s: %s", meter_id, change.new, change.reason)
        return hints

    # -- the schedule ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Read meters as they fall due until ``stop`` is set; finishes the reads in flight."""
        await ensure_health_rows(self.db)
        in_flight: set[asyncio.Task[None]] = set()
        rounds = 0
        while not stop.is_set():
            if rounds % 30 == 0:
                await ensure_health_rows(self.db)  # meters registered meanwhile
            rounds += 1
            now = self._now()
            lease_until = now + timedelta(seconds=self.plan.lease * clock_speed(self.clock))
            room = max(0, sum(self.plan.concurrency.values()) - len(in_flight))
            claimed = await claim_due(self.db, self.worker, now, lease_until, room) if room else []
            if claimed:
                targets = {t.meter_id: t for t in await active_targets(self.db, claimed)}
                for meter_id in claimed:
                    target = targets.get(meter_id)
                    if target is None:
                        continue
                    task = asyncio.create_task(self._scheduled(target))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _scheduled(self, target: PollTarget) -> None:
        try:
            await self.read(target)
        except StorageError as exc:
            log.error("storing a read of %s failed: %s", target.meter_id, exc)
        due = next_due(target.meter_id, self.plan.interval, self.clock.now())
        try:
            await release(self.db, self.worker, target.meter_id, datetime.fromtimestamp(due, UTC))
        except StorageError as exc:
            log.error("releasing %s failed (its lease will expire): %s", target.meter_id, exc)


class _Deadline:
    """The deadline of the read a task is doing, for a task that does its reads one after
    another: ``with deadline.at(when):`` ends the block with TimeoutError at loop time
    ``when``, as ``asyncio.timeout_at`` does, but one timer serves all of the task's reads. It
    is armed for the first read's deadline; when it fires it finds the read running then (if
    any) and either ends it (its deadline has come) or moves on to that read's deadline, so a
    read that ends in time arms and cancels no timer of its own. :meth:`close` disarms it."""

    __slots__ = ("_armed", "_cancelling", "_expired", "_task", "_timer", "_when")

    def __init__(self) -> None:
        self._task: asyncio.Task[Any] | None = None
        self._when: float | None = None  # the running read's deadline (None: no read runs)
        self._timer: asyncio.TimerHandle | None = None
        self._armed = 0.0  # what the timer is armed for
        self._cancelling = 0  # the task's cancellations pending when the read began
        self._expired = False

    def at(self, when: float) -> _Deadline:
        self._when = when
        return self

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None or self._when is None:
            raise RuntimeError("a deadline is entered by a task, with at(when)")
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        if self._timer is None or self._armed > self._when:
            self._arm(self._when)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._when = None
        if self._expired and self._task is not None:
            self._expired = False
            # this deadline's cancellation is taken back; another one still pending goes on
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, when: float) -> None:
        self.close()
        self._armed = when
        self._timer = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        when, task = self._when, self._task
        if when is None or task is None:
            return  # no read runs: the next one arms the timer again
        if when <= self._armed:
            self._expired = True
            task.cancel()
        else:
            self._arm(when)


#: reads stored in one transaction at most (a round of 10,000 meters: 20 transactions; with
#: 200 a transaction the round took 5 % longer on SQLite and 10 % on PostgreSQL, whose
#: server shares the machine's cores with the meters)
_BATCH = 500
#: how long a batch waits for more reads to join it at most, s (while reads are finishing; the
#: round's last reads are stored at once). 0.1 rather than 0.05: a round of 1,000 meters takes
#: 3-4 transactions instead of 5-7, which on SQLite left the head-end 3 % less CPU a round and
#: the round 8 % shorter (three pairs of runs, 2026-12-02)
_LINGER = 0.1


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    """Tell a read's store whether it is stored (unless it stopped waiting: cancelled)."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def _reset(outcome: ReadOutcome) -> None:
    """Forget what a rolled-back store counted, before it is stored again."""
    outcome.reading_new = False
    outcome.intervals = outcome.estimated = outcome.events = outcome.gaps = 0
    outcome.flagged = outcome.duplicates = 0
    outcome.backfilled = False


def _estimates(
    last: CheckedInterval | None, checked: Sequence[CheckedInterval]
) -> list[CheckedInterval]:
    estimates: list[CheckedInterval] = []
    before = last
    for interval in checked:
        if before is not None:
            estimates += estimate_gap(before, interval)
        before = interval
    return estimates
