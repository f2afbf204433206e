"""The MQTT ingest's storage sink: pushed telemetry, events and state into the head-end's store.

What a meter pushes lands in the same tables, through the same rules, as what a poll reads:

* telemetry becomes a reading (``source`` "mqtt") validated by
  :func:`headend.domain.validation.validate_reading` against the meter's latest stored reading
  and the head-end's clock. It is stored once per ``(meter, boot, n)`` (the ``telemetry_seen``
  row is written in the reading's transaction) and once per ``(meter, meter time)`` (a poll
  that read the same snapshot already holds the reading);
* an event goes to ``meter_events`` with boot 0: an event's sequence number is the meter's
  lifelong one, so a pushed event and the same event read by a poll are one row;
* a state message (online / offline) sets the meter's read health; a change is stored as a
  ``health_changes`` row, as a poll's is.

A message from a meter that is not registered (or is retired) is refused with
:class:`~protocols.errors.ValidationError`, so the ingest dead-letters it (a meter found active
is remembered, so one retired while the ingest runs is refused from the ingest's next start);
a database that is away raises :class:`~protocols.errors.StorageError`, so the ingest pauses
and tries the same message again. The messages of a burst are written in one transaction, so
each is stored whole or not at all (a failed burst fails for each of its messages, and the
ingest tries each again on its own); :meth:`StorageSink.stop` lets the writes in flight finish
and takes no more (a message handed over after it gets :class:`~headend.ingest.SinkStopped`, so
the ingest leaves it unacknowledged and hands over no more).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from headend.domain.health import Health
from headend.domain.validation import Findings, Limits, Previous, validate_registers
from headend.ingest import SinkStopped
from headend.storage import Database, Session
from headend.storage.readings import (
    event_rows,
    insert_rows,
    latest_readings,
    meter_statuses,
    record_presence,
    store_new_readings,
    values_row,
)
from headend.storage.schema import MeterEvent, TelemetrySeen
from protocols.clock import Clock
from protocols.errors import ValidationError
from protocols.mqtt import EventMessage, StateMessage, Telemetry

#: what a state message makes of the meter's read health
PRESENCE: dict[str, Health] = {"online": Health.ONLINE, "offline": Health.UNREACHABLE}


@dataclass(slots=True)
class SinkStats:
    readings: int = 0  # readings stored from telemetry
    events: int = 0  # events stored
    states: int = 0  # state messages applied
    health_changes: int = 0
    duplicates: int = 0  # telemetry or events the store held already
    flagged: int = 0  # readings stored with validation flags


class StorageSink:
    """An :class:`headend.ingest.IngestSink` that writes into the head-end's database.

    The messages handed to it together (the ingest hands over a burst at once) are written by
    one writer in one transaction, in the order they came (a group commit): a few set-wise
    statements for the burst's telemetry and events, the state messages one after the other.
    Each caller returns once that transaction is committed; if it fails, every message of it
    gets the error (the ingest then tries each again on its own)."""

    def __init__(self, db: Database, clock: Clock, limits: Limits | None = None) -> None:
        self.db = db
        self.clock = clock
        self.limits = limits or Limits()
        self.stats = SinkStats()
        self._known: set[str] = set()  # meters seen registered and active
        self._stopping = asyncio.Event()
        self._writing = 0
        self._idle = asyncio.Event()
        self._pending: list[tuple[_Message, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        if self._stopping.is_set():
            # the message stays unacknowledged; the broker delivers it again to the next ingest
            raise SinkStopped("the storage sink is stopping")
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            if not self._writing:
                self._idle.set()

    async def stop(self) -> None:
        """Take no new message; return once the writes in flight (if any) are committed."""
        self._stopping.set()
        while self._writing:
            self._idle.clear()
            await self._idle.wait()
        if self._writer is not None:  # a batch whose callers stopped waiting (cancelled)
            await asyncio.wait([self._writer])

    async def telemetry(self, message: Telemetry) -> None:
        await self._submit(message)

    async def event(self, message: EventMessage) -> None:
        await self._submit(message)

    async def state(self, message: StateMessage) -> None:
        await self._submit(message)

    async def take(self, messages: Sequence[_Message]) -> list[BaseException | None]:
        """A burst of messages, written together (:class:`headend.ingest.BurstSink`)."""
        if self._stopping.is_set():
            return [SinkStopped("the storage sink is stopping") for _ in messages]
        async with self._write():
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[None]] = [loop.create_future() for _ in messages]
            self._pending += zip(messages, futures, strict=True)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_batches())
            # a cancelled caller leaves the batch to finish
            await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))
            return [f.exception() for f in futures]

    async def _submit(self, message: _Message) -> None:
        async with self._write():
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._pending.append((message, done))
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write_batches())
            await asyncio.shield(done)  # a cancelled caller leaves the batch to finish

    async def _write_batches(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_BATCH], self._pending[_BATCH:]
            try:
                async with self.db.begin() as session:
                    refused, counted = await self._store(session, [m for m, _ in batch])
            except BaseException as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            self._count(counted)
            for index, (_, done) in enumerate(batch):
                if done.done():
                    continue
                if index in refused:
                    done.set_exception(refused[index])
                else:
                    done.set_result(None)

    async def _store(
        self, session: Session, messages: list[_Message]
    ) -> tuple[dict[int, ValidationError], SinkStats]:
        """Write ``messages`` in order in ``session``; the refused ones by index, and what was
        stored."""
        counted = SinkStats()
        refused: dict[int, ValidationError] = {}
        statuses: dict[str, str] = {}
        unknown = sorted({m.meter_id for m in messages} - self._known)
        if unknown:
            statuses = await meter_statuses(session, unknown)
            for meter_id in unknown:
                if statuses.get(meter_id) == "active":
                    self._known.add(meter_id)
        for index, message in enumerate(messages):
            if message.meter_id not in self._known:
                refused[index] = _refusal(message.meter_id, statuses.get(message.meter_id))
        now = self._now()
        telemetry = [
            (i, m) for i, m in enumerate(messages) if isinstance(m, Telemetry) and i not in refused
        ]
        if telemetry:
            await self._store_telemetry(session, [m for _, m in telemetry], now, counted)
        events = [
            m for i, m in enumerate(messages) if isinstance(m, EventMessage) and i not in refused
        ]
        if events:
            rows = [
                row for m in events for row in event_rows(m.meter_id, [m.event.to_event()], now)
            ]
            stored = len(await insert_rows(session, MeterEvent, rows))
            counted.events += stored
            counted.duplicates += len(events) - stored
        for index, message in enumerate(messages):
            if isinstance(message, StateMessage) and index not in refused:
                health = PRESENCE[message.state]
                reason = f"the meter's agent reports {message.state} (boot {message.boot})"
                change = await record_presence(
                    session, message.meter_id, health, now=now, reason=reason
                )
                counted.states += 1
                counted.health_changes += change is not None
        return refused, counted

    async def _store_telemetry(
        self, session: Session, messages: list[Telemetry], now: datetime, counted: SinkStats
    ) -> None:
        """Telemetry stored once per (meter, boot, n) and once per (meter, meter time), each
        validated against the meter's reading before it (stored, or earlier in the batch)."""
        values = {id(m): msgspec.structs.asdict(m.reading) for m in messages}
        seen_rows = [
            {"meter_id": m.meter_id, "boot": m.boot, "n": m.n, "meter_time": values[id(m)]["time"]}
            for m in messages
        ]
        new_keys = {
            tuple(row)
            for row in await insert_rows(
                session, TelemetrySeen, seen_rows, TelemetrySeen.meter_id, TelemetrySeen.boot,
                TelemetrySeen.n,
            )
        }  # fmt: skip
        fresh = [m for m in messages if (m.meter_id, m.boot, m.n) in new_keys]
        counted.duplicates += len(messages) - len(fresh)
        if not fresh:
            return
        previous = await latest_readings(session, sorted({m.meter_id for m in fresh}))
        head_end_time = int(self.clock.now())
        rows: list[dict[str, Any]] = []
        flagged: dict[tuple[str, int], bool] = {}
        for message in fresh:
            reading = values[id(message)]
            meter_time, energy = reading["time"], reading["energy_import_wh"]
            before = previous.get(message.meter_id)
            if before is not None and before.meter_time == meter_time:
                findings = Findings()  # the same reading again (a poll stored it)
            else:
                findings = validate_registers(
                    meter_time,
                    energy,
                    reading["energy_rates_wh"],
                    previous=before,
                    head_end_time=head_end_time,
                    limits=self.limits,
                )
            if before is None or meter_time > before.meter_time:
                previous[message.meter_id] = Previous(meter_time, energy)
            rows.append(values_row(message.meter_id, reading, findings, now, "mqtt"))
            flagged.setdefault((message.meter_id, meter_time), bool(findings.flags))
        stored = await store_new_readings(session, rows)
        counted.readings += len(stored)
        counted.duplicates += len(rows) - len(stored)
        counted.flagged += sum(flagged[(row[0], row[1])] for row in stored)

    def _count(self, counted: SinkStats) -> None:
        for name in SinkStats.__dataclass_fields__:
            setattr(self.stats, name, getattr(self.stats, name) + getattr(counted, name))


_Message = Telemetry | EventMessage | StateMessage
#: messages written in one transaction at most
_BATCH = 1000


def _refusal(meter_id: str, status: str | None) -> ValidationError:
    if status is None:
        return ValidationError(f"meter {meter_id} is not registered")
    return ValidationError(f"meter {meter_id} is {status}")
