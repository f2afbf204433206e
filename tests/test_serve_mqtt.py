"""`hes serve --mqtt` as a child process: MQTT meters' agents push telemetry and events through
a real Mosquitto into the store; an unregistered meter's messages are refused; a restart of
the ingest loses and duplicates nothing (every agent's telemetry numbers are stored once, with
no hole)."""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select

from headend.broker import LocalBroker
from headend.domain.registry import MeterRecord
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.registry import import_meters
from headend.storage.schema import Reading, TelemetrySeen
from meter_sim.config import MeterConfig
from meter_sim.mqtt_agent import AgentGroup, AgentOptions, run_agents
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock
from tests.mqtt_broker import TEST_KEY, TEST_METERS, TEST_SECRET
from tests.test_serve import SPEED, T0, Fleet, Serve, _scalar, _until

pytestmark = pytest.mark.mqtt
REGISTERED = TEST_METERS[:2]
STRANGER = TEST_METERS[2]
FAST = AgentOptions(
    telemetry_interval=0.1, backoff_initial=0.05, backoff_max=0.2, meter_secret=TEST_SECRET
)


async def _numbers(db: Database, meter_id: str) -> list[tuple[int, int]]:
    async with db.begin() as session:
        rows = (
            await session.execute(
                select(TelemetrySeen.boot, TelemetrySeen.n)
                .where(TelemetrySeen.meter_id == meter_id)
                .order_by(TelemetrySeen.boot, TelemetrySeen.n)
            )
        ).all()
    return [(int(b), int(n)) for b, n in rows]


async def test_serve_ingests_mqtt_meters_and_an_ingest_restart_loses_nothing(
    tmp_path: Path, broker: LocalBroker
) -> None:
    started = datetime.now(UTC)
    clock = AcceleratedClock(SPEED, T0)
    runtimes = [
        MeterRuntime.open(
            MeterConfig(m, auth_key=TEST_KEY, initial_credit=100_000), clock, tmp_path / "m"
        )
        for m in (*REGISTERED, STRANGER)
    ]
    headend = broker.settings()
    fleet = Fleet(runtimes[:2], 0, clock, started.isoformat())
    url = f"sqlite:///{tmp_path / 'hes.db'}"
    db = await open_database(url, check=False)
    try:
        await db.upgrade()
        endpoint = f"mqtt://{headend.host}:{headend.port}/"
        rows = [
            (n, MeterRecord(meter_id=m, endpoint=endpoint + m, route=route_of(endpoint + m)))
            for n, m in enumerate(REGISTERED, start=2)
        ]
        assert (await import_meters(db, rows, [], datetime.now(UTC), actor="test")).applied
        mqtt_url = headend.url(with_password=True)
        # polls of these meters need a login in their endpoint; a long interval keeps the
        # test about what they push
        extra = ("--mqtt", mqtt_url, "--interval", "86400")
        async with run_agents(runtimes, headend, options=FAST) as agents:
            await agents.wait_connected(5)
            serve = await Serve.start(url, fleet, tmp_path, "w1", *extra)
            try:

                async def some_telemetry() -> bool:
                    counts = [len(await _numbers(db, m)) for m in REGISTERED]
                    return min(counts) >= 5

                await _until(some_telemetry)
                text = await asyncio.to_thread(serve.metrics)
                assert serve.sample(text, 'hes_ingest_messages_total{outcome="telemetry"}') >= 10
                assert serve.sample(text, 'hes_ingest_messages_total{outcome="refused"}') >= 1
                assert await serve.stop(signal.SIGTERM) < 5.0
                assert serve.process.returncode == 0
                # the ingest is away while the agents go on publishing
                during = agents.agents[REGISTERED[0]].stats.telemetry_produced
                await _until(lambda: _produced_past(agents, during + 5), timeout=10)
                serve = await Serve.start(url, fleet, tmp_path, "w1", *extra)
                after = max(n for _, n in await _numbers(db, REGISTERED[0]))

                async def caught_up() -> bool:
                    counts = [len(await _numbers(db, m)) for m in REGISTERED]
                    return min(counts) >= after + 5

                await _until(caught_up)
                assert await serve.stop(signal.SIGTERM) < 5.0
                assert serve.process.returncode == 0
            finally:
                await serve.close()
        for meter_id in REGISTERED:
            numbers = await _numbers(db, meter_id)
            boots = {b for b, _ in numbers}
            assert len(boots) == 1
            # from the first message after the ingest's session existed, through the restart
            first = numbers[0][1]
            assert [n for _, n in numbers] == list(range(first, first + len(numbers))), meter_id
        stranger = await _scalar(
            db, select(func.count()).select_from(Reading).where(Reading.meter_id == STRANGER)
        )
        assert stranger == 0
        assert (
            await _scalar(
                db, select(func.count()).select_from(Reading).where(Reading.source == "mqtt")
            )
            >= 2
        )
    finally:
        await db.close()


async def _produced_past(agents: AgentGroup, count: int) -> bool:
    return agents.agents[REGISTERED[0]].stats.telemetry_produced >= count
