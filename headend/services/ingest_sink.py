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
and tries the same message again. Every write is one transaction, so a message is stored whole
or not at all; :meth:`StorageSink.stop` lets the write in flight finish and takes no more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

from headend.domain.health import Health
from headend.domain.validation import Findings, Limits, validate_reading
from headend.storage import Database
from headend.storage.readings import (
    latest_reading,
    meter_status,
    reading_row,
    record_presence,
    store_events,
    store_readings,
    store_telemetry_seen,
)
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
    """An :class:`headend.ingest.IngestSink` that writes into the head-end's database."""

    def __init__(self, db: Database, clock: Clock, limits: Limits | None = None) -> None:
        self.db = db
        self.clock = clock
        self.limits = limits or Limits()
        self.stats = SinkStats()
        self._known: set[str] = set()  # meters seen registered and active
        self._stopping = asyncio.Event()
        self._writing = 0
        self._idle = asyncio.Event()

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        if self._stopping.is_set():
            # stopping: the message waits here, unacknowledged, until the ingest is closed
            # (which cancels the wait); the broker delivers it again to the next ingest
            await asyncio.Event().wait()
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            if not self._writing:
                self._idle.set()

    async def stop(self) -> None:
        """Take no new message; return once the write in flight (if any) is committed."""
        self._stopping.set()
        while self._writing:
            self._idle.clear()
            await self._idle.wait()

    def _admit(self, meter_id: str, status: str | None) -> None:
        """ValidationError unless the meter is registered and active."""
        if status is None:
            raise ValidationError(f"meter {meter_id} is not registered")
        if status != "active":
            raise ValidationError(f"meter {meter_id} is {status}")
        self._known.add(meter_id)

    async def telemetry(self, message: Telemetry) -> None:
        snapshot = message.snapshot()
        async with self._write(), self.db.begin() as session:
            now = self._now()
            if message.meter_id not in self._known:
                self._admit(message.meter_id, await meter_status(session, message.meter_id))
            new = await store_telemetry_seen(
                session, message.meter_id, message.boot, message.n, snapshot.time
            )
            if not new:
                self.stats.duplicates += 1
                return
            previous = await latest_reading(session, message.meter_id)
            if previous is not None and previous.meter_time == snapshot.time:
                findings = Findings()  # the same reading again (a poll stored it)
            else:
                findings = validate_reading(snapshot, previous, int(self.clock.now()), self.limits)
            stored = await store_readings(session, [reading_row(snapshot, findings, now, "mqtt")])
        if stored:
            self.stats.readings += 1
            self.stats.flagged += bool(findings.flags)
        else:
            self.stats.duplicates += 1

    async def event(self, message: EventMessage) -> None:
        async with self._write(), self.db.begin() as session:
            if message.meter_id not in self._known:
                self._admit(message.meter_id, await meter_status(session, message.meter_id))
            stored = await store_events(
                session, message.meter_id, [message.event.to_event()], self._now(), boot=0
            )
        if stored:
            self.stats.events += 1
        else:
            self.stats.duplicates += 1

    async def state(self, message: StateMessage) -> None:
        health = PRESENCE[message.state]
        reason = f"the meter's agent reports {message.state} (boot {message.boot})"
        async with self._write(), self.db.begin() as session:
            if message.meter_id not in self._known:
                self._admit(message.meter_id, await meter_status(session, message.meter_id))
            change = await record_presence(
                session, message.meter_id, health, now=self._now(), reason=reason
            )
        self.stats.states += 1
        self.stats.health_changes += change is not None
