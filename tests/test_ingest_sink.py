"""The MQTT ingest into the store: a real Mosquitto, a meter's client publishing, the storage
sink on SQLite and PostgreSQL. Redeliveries and an ingest restart store nothing twice, a
pushed event and a polled one are one row, state sets read health, an unregistered meter is
dead-lettered, and a database outage pauses the ingest without losing a message."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import pytest
from sqlalchemy import event, func, select

from headend.broker import LocalBroker
from headend.domain.registry import MeterRecord
from headend.domain.validation import Flag
from headend.ingest import Ingest, SinkStopped
from headend.services.ingest_sink import StorageSink
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.readings import store_events
from headend.storage.registry import import_meters
from headend.storage.schema import HealthChange, MeterEvent, PollHealth, Reading, TelemetrySeen
from protocols import mqtt
from protocols.clock import ManualClock
from protocols.mqtt import BrokerSettings, TopicScheme
from protocols.readings import Event, EventCode
from tests.databases import db_url, postgres_server
from tests.mqtt_broker import TEST_METERS
from tests.test_mqtt_payloads import SNAPSHOT

__all__ = ["db_url", "postgres_server"]  # fixtures

pytestmark = pytest.mark.mqtt
TOPICS = TopicScheme()
M1, M2 = TEST_METERS[0], TEST_METERS[1]
T0 = SNAPSHOT.time


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    rows = [(2, MeterRecord(meter_id=M1, endpoint=f"mqtt://127.0.0.1:1883/{M1}",
                            route=route_of(f"mqtt://127.0.0.1:1883/{M1}")))]  # fmt: skip
    report = await import_meters(database, rows, [], datetime.now(UTC), actor="test")
    assert report.applied
    try:
        yield database
    finally:
        await database.close()


def _client(settings: BrokerSettings, identifier: str | None = None) -> aiomqtt.Client:
    return aiomqtt.Client(
        settings.host,
        settings.port,
        username=settings.username,
        password=settings.password,
        identifier=identifier or settings.username,
        protocol=aiomqtt.ProtocolVersion.V5,
    )


def _telemetry(n: int, boot: int = 1, meter_id: str = M1) -> bytes:
    snapshot = dataclasses.replace(SNAPSHOT, meter_id=meter_id, time=T0 + 60 * n)
    return mqtt.encode_telemetry(snapshot, boot, n)


def _event(seq: int) -> Event:
    return Event(seq, T0 + seq, EventCode.LOW_CREDIT, 1, 2)


async def _count(db: Database, model: Any) -> int:
    async with db.begin() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition of this process's own state (never a server's readiness)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the ingest's counters have no event to wait on
            await asyncio.sleep(0.02)


async def test_redelivery_and_an_ingest_restart_store_nothing_twice(
    db: Database, broker: LocalBroker
) -> None:
    clock = ManualClock(T0)
    async with _client(broker.meter_settings(M1)) as meter:
        for _ in range(2):  # the second time round: a new ingest, whose memory is empty
            sink = StorageSink(db, clock)
            async with Ingest(broker.settings(), sink, client_id="hes-store") as ingest:
                for n in (1, 2, 3, 2, 1):  # repeats, as a meter's agent resends after a break
                    await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
                for seq in (1, 2, 2):
                    await meter.publish(
                        TOPICS.events(M1), mqtt.encode_event(M1, _event(seq)), qos=1
                    )
                await _until(lambda: ingest.stats.handled == 8)
    assert await _count(db, TelemetrySeen) == 3
    assert await _count(db, Reading) == 3
    assert await _count(db, MeterEvent) == 2
    # the second ingest's sink met every message in the store already
    assert (sink.stats.readings, sink.stats.events) == (0, 0)
    assert sink.stats.duplicates == 5
    async with db.begin() as session:
        sources = set((await session.scalars(select(Reading.source))).all())
        boots = set((await session.scalars(select(MeterEvent.boot))).all())
    assert sources == {"mqtt"}
    assert boots == {0}


async def test_a_pushed_and_a_polled_event_are_one_row_and_telemetry_is_validated(
    db: Database, broker: LocalBroker
) -> None:
    clock = ManualClock(T0 + 120)
    async with db.begin() as session:  # a poll read events 1 and 2 from the log
        await store_events(session, M1, [_event(1), _event(2)], datetime.now(UTC))
    sink = StorageSink(db, clock)
    backwards = dataclasses.replace(SNAPSHOT, time=T0 + 180, energy_import_wh=1000,
                                    energy_rates_wh=(1000, 0, 0, 0))  # fmt: skip
    async with (
        _client(broker.meter_settings(M1)) as meter,
        Ingest(broker.settings(), sink) as ingest,
    ):
        for seq in (2, 3):
            await meter.publish(TOPICS.events(M1), mqtt.encode_event(M1, _event(seq)), qos=1)
        await meter.publish(TOPICS.telemetry(M1), _telemetry(2), qos=1)
        await meter.publish(TOPICS.telemetry(M1), mqtt.encode_telemetry(backwards, 1, 3), qos=1)
        await _until(lambda: ingest.stats.handled == 4)
    assert await _count(db, MeterEvent) == 3
    assert (sink.stats.events, sink.stats.duplicates) == (1, 1)
    async with db.begin() as session:
        flags = (await session.scalars(select(Reading.flags).order_by(Reading.meter_time))).all()
    assert flags[0] == 0
    assert flags[1] & Flag.ENERGY_BACKWARDS
    assert sink.stats.flagged == 1


async def test_state_messages_set_read_health(db: Database, broker: LocalBroker) -> None:
    sink = StorageSink(db, ManualClock(T0))
    async with (
        _client(broker.meter_settings(M1)) as meter,
        Ingest(broker.settings(), sink) as ingest,
    ):
        for online in (True, True, False, True):
            await meter.publish(TOPICS.state(M1), mqtt.encode_state(M1, online, 7), qos=1)
        await _until(lambda: ingest.stats.handled == 4)
    async with db.begin() as session:
        changes = (await session.scalars(select(HealthChange.new).order_by(HealthChange.id))).all()
        health = await session.get(PollHealth, M1)
    assert list(changes) == ["online", "unreachable", "online"]
    assert health is not None
    assert health.health == "online"
    assert (sink.stats.states, sink.stats.health_changes) == (4, 3)


async def test_an_unregistered_meter_is_dead_lettered(db: Database, broker: LocalBroker) -> None:
    sink = StorageSink(db, ManualClock(T0))
    async with (
        _client(broker.meter_settings(M2)) as stranger,
        _client(broker.settings(), "hes-dead-letters") as watcher,
        Ingest(broker.settings(), sink) as ingest,
    ):
        await watcher.subscribe(TOPICS.deadletter, qos=1)
        await stranger.publish(TOPICS.telemetry(M2), _telemetry(1, meter_id=M2), qos=1)
        async with asyncio.timeout(5):
            letter = await anext(aiter(watcher.messages))
    assert str(letter.topic) == TOPICS.deadletter
    assert ingest.stats.sink_refused == 1
    assert ingest.stats.sink_failures == 0  # refused, not retried as an outage
    assert await _count(db, Reading) == 0


async def test_a_database_outage_pauses_the_ingest_and_loses_nothing(
    tmp_path: Any, broker: LocalBroker
) -> None:
    path = tmp_path / "hes.db"
    database = await open_database(f"sqlite:///{path}", check=False)
    await database.upgrade()
    await database.engine.dispose()  # new connections give up on a lock at once, below
    event.listen(database.engine.sync_engine, "connect", _short_busy_timeout)
    rows = [(2, MeterRecord(meter_id=M1, endpoint=f"mqtt://127.0.0.1:1883/{M1}",
                            route=route_of(f"mqtt://127.0.0.1:1883/{M1}")))]  # fmt: skip
    await import_meters(database, rows, [], datetime.now(UTC), actor="test")
    sink = StorageSink(database, ManualClock(T0))
    outage = sqlite3.connect(path, isolation_level=None)
    try:
        async with (
            _client(broker.meter_settings(M1)) as meter,
            Ingest(broker.settings(), sink, sink_backoff=(0.02, 0.1)) as ingest,
        ):
            outage.execute("BEGIN EXCLUSIVE")  # the database is away for writers
            for n in range(1, 6):
                await meter.publish(TOPICS.telemetry(M1), _telemetry(n), qos=1)
            await _until(lambda: ingest.stats.sink_failures >= 3 and ingest.paused)
            assert ingest.stats.handled == 0
            outage.execute("ROLLBACK")  # back
            await _until(lambda: ingest.stats.handled == 5)
            assert not ingest.paused
        assert ingest.stats.dead_lettered == ingest.stats.sink_refused == 0
        assert await _count(database, Reading) == 5
        assert await _count(database, TelemetrySeen) == 5
    finally:
        outage.close()
        await database.close()


def _short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=20")
    cursor.close()


async def test_stop_lets_the_write_in_flight_finish_and_takes_no_more(
    tmp_path: Any,
) -> None:
    path = tmp_path / "hes.db"
    database = await open_database(f"sqlite:///{path}", check=False)
    await database.upgrade()
    rows = [(2, MeterRecord(meter_id=M1, endpoint=f"mqtt://127.0.0.1:1883/{M1}",
                            route=route_of(f"mqtt://127.0.0.1:1883/{M1}")))]  # fmt: skip
    await import_meters(database, rows, [], datetime.now(UTC), actor="test")
    sink = StorageSink(database, ManualClock(T0))
    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the first write waits for the lock (up to 5 s)
        writing = asyncio.create_task(sink.telemetry(mqtt.decode_telemetry(_telemetry(1))))
        await _until(lambda: sink._writing == 1)
        stopping = asyncio.create_task(sink.stop())
        await asyncio.sleep(0)
        assert not stopping.done()  # waits for the write in flight
        lock.execute("ROLLBACK")
        await asyncio.wait_for(stopping, 5)
        await writing
        late = mqtt.decode_telemetry(_telemetry(2))
        with pytest.raises(SinkStopped):  # the ingest leaves it unacknowledged
            await sink.telemetry(late)
        assert [type(r) for r in await sink.take([late])] == [SinkStopped]
        assert await _count(database, Reading) == 1
        assert await _count(database, TelemetrySeen) == 1
    finally:
        lock.close()
        await database.close()


async def test_a_burst_is_stored_in_order_with_each_message_settled(db: Database) -> None:
    sink = StorageSink(db, ManualClock(T0))
    went_back = dataclasses.replace(SNAPSHOT, meter_id=M1, time=T0 + 60 * 4, energy_import_wh=10)
    went_back = dataclasses.replace(went_back, energy_rates_wh=(10, 0, 0, 0))
    burst = [
        mqtt.decode_telemetry(_telemetry(1)),
        mqtt.decode_telemetry(_telemetry(2, meter_id=M2)),  # M2 is not registered
        mqtt.decode_telemetry(_telemetry(2)),
        mqtt.decode_telemetry(_telemetry(2)),  # the same message again
        mqtt.decode_telemetry(mqtt.encode_telemetry(went_back, 1, 4)),  # below telemetry 2
        mqtt.decode_state(mqtt.encode_state(M1, False, 7)),
        mqtt.decode_state(mqtt.encode_state(M1, True, 7)),
        mqtt.decode_event(mqtt.encode_event(M1, _event(1))),
    ]
    results = await sink.take(burst)
    assert [type(r).__name__ if r else None for r in results] == [
        None, "ValidationError", None, None, None, None, None, None,
    ]  # fmt: skip
    assert (sink.stats.readings, sink.stats.duplicates, sink.stats.events) == (3, 1, 1)
    assert sink.stats.flagged == 1
    async with db.read() as session:
        flags = dict((await session.execute(select(Reading.meter_time, Reading.flags))).all())
        changes = (await session.scalars(select(HealthChange.new).order_by(HealthChange.id))).all()
    assert flags[T0 + 60 * 4] & Flag.ENERGY_BACKWARDS
    assert not flags[T0 + 60 * 2] & Flag.ENERGY_BACKWARDS
    assert list(changes) == ["unreachable", "online"]
    assert await _count(db, TelemetrySeen) == 3
    assert (await sink.take([mqtt.decode_telemetry(_telemetry(1))])) == [None]  # a redelivery
    assert sink.stats.duplicates == 2
