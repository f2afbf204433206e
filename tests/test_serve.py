"""`hes serve` as a child process against simulated meters over Modbus TCP, on the same
accelerated clock: it stores readings (none flagged CLOCK_SKEW), answers metrics, exits 0 soon
after SIGTERM; killed with SIGKILL mid-round and started again it loses and duplicates nothing;
two workers on PostgreSQL share a fleet, and when one is killed the other takes its meters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from headend.domain.registry import MeterRecord
from headend.domain.schedule import slot
from headend.domain.validation import Flag
from headend.links.endpoint import LinkOptions
from headend.metrics import METRIC_NAMES
from headend.services.poller import PollPlan
from headend.services.registry import route_of
from headend.services.serve import Ready, ServeSettings, clock_limits, serve
from headend.storage import Database, open_database
from headend.storage.registry import import_meters
from headend.storage.schema import Gap, Interval, MeterEvent, Reading
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock
from tests.databases import drop_postgres, fresh_postgres, postgres_server

__all__ = ["postgres_server"]  # fixtures

REPO = Path(__file__).resolve().parent.parent
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SPEED = 600.0  # a 15-minute interval every 1.5 real seconds
INTERVAL = 900


@dataclass
class Fleet:
    runtimes: list[MeterRuntime]
    port: int
    clock: AcceleratedClock
    started: str  # the real moment the fleet's clock stood at T0


@contextlib.asynccontextmanager
async def _fleet(tmp: Path, count: int) -> AsyncIterator[Fleet]:
    started = datetime.now(UTC)
    clock = AcceleratedClock(SPEED, T0)
    runtimes = [
        MeterRuntime.open(
            MeterConfig(f"MTR-{n:03d}", modbus_unit=n, initial_credit=100_000), clock, tmp / "m"
        )
        for n in range(1, count + 1)
    ]
    async with serve_tcp(runtimes) as service:
        yield Fleet(runtimes, service.port, clock, started.isoformat())


@contextlib.asynccontextmanager
async def _database(url: str, fleet: Fleet) -> AsyncIterator[Database]:
    db = await open_database(url, check=False)
    try:
        await _register(db, fleet)
        yield db
    finally:
        await db.close()


async def _register(db: Database, fleet: Fleet) -> None:
    await db.upgrade()
    rows = []
    for n, runtime in enumerate(fleet.runtimes, start=2):
        endpoint = f"tcp://127.0.0.1:{fleet.port}/{runtime.config.modbus_unit}"
        rows.append((n, MeterRecord(meter_id=runtime.meter_id, endpoint=endpoint,
                                    route=route_of(endpoint))))  # fmt: skip
    report = await import_meters(db, rows, [], datetime.now(UTC), actor="test")
    assert report.applied


class Serve:
    """One `hes serve` child process; its ready line is read before the test goes on."""

    def __init__(self, process: asyncio.subprocess.Process, ready: dict[str, Any]) -> None:
        self.process = process
        self.ready = ready

    @classmethod
    async def start(cls, url: str, fleet: Fleet, tmp: Path, worker: str, *extra: str) -> Serve:
        command = [
            sys.executable, "-m", "cli.hes", "serve", "--db", url, "--worker", worker,
            "--interval", str(INTERVAL), "--deadline", "2", "--timeout", "0.5", "--lease", "4",
            "--clock-speed", str(SPEED), "--clock-start", "2026-01-01T00:00:00Z",
            "--clock-at", fleet.started,
            "--metrics-port", "0", "--log-json", *extra,
        ]  # fmt: skip
        with (tmp / f"{worker}.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        assert process.stdout is not None
        async with asyncio.timeout(30):
            line = await process.stdout.readline()
        if not line:
            await process.wait()
            pytest.fail(
                f"hes serve exited {process.returncode}: {(tmp / f'{worker}.log').read_text()}"
            )
        ready = json.loads(line)
        assert ready["event"] == "ready"
        return cls(process, ready)

    def metrics(self) -> str:
        port = self.ready["metrics_port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    def sample(self, text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not in the metrics")

    async def stop(self, sig: signal.Signals = signal.SIGTERM, within: float = 10.0) -> float:
        """Send ``sig``; returns the seconds until the process exited."""
        started = time.monotonic()
        self.process.send_signal(sig)
        async with asyncio.timeout(within):
            await self.process.wait()
        return time.monotonic() - started

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def _scalar(db: Database, query: Any) -> int:
    async with db.begin() as session:
        return int(await session.scalar(query) or 0)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Wait for a condition of the store (the children have no other signal to offer)."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - a database has no event to wait on
            await asyncio.sleep(0.1)


async def _readings(db: Database) -> int:
    return await _scalar(db, select(func.count()).select_from(Reading))


async def _readings_per_meter(db: Database) -> dict[str, int]:
    async with db.begin() as session:
        rows = (
            await session.execute(select(Reading.meter_id, func.count()).group_by(Reading.meter_id))
        ).all()
    return {str(meter): int(count) for meter, count in rows}


async def _assert_complete(db: Database, runtimes: Sequence[MeterRuntime]) -> None:
    """Every meter's intervals contiguous from the start, actual, no gap; its events exactly
    1..n once each."""
    async with db.begin() as session:
        assert await session.scalar(select(func.count()).select_from(Gap)) == 0
        for runtime in runtimes:
            starts = list(
                (
                    await session.scalars(
                        select(Interval.start)
                        .where(Interval.meter_id == runtime.meter_id)
                        .where(Interval.estimated.is_(False))
                        .order_by(Interval.start)
                    )
                ).all()
            )
            assert starts, runtime.meter_id
            assert starts == list(range(int(T0), int(starts[-1]) + 1, INTERVAL)), runtime.meter_id
            seqs = list(
                (
                    await session.scalars(
                        select(MeterEvent.seq)
                        .where(MeterEvent.meter_id == runtime.meter_id)
                        .order_by(MeterEvent.seq)
                    )
                ).all()
            )
            assert seqs == list(range(1, len(seqs) + 1)), runtime.meter_id


async def test_serve_stores_readings_answers_metrics_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with (
        _fleet(tmp_path, 3) as fleet,
        _database(f"sqlite:///{tmp_path / 'hes.db'}", fleet) as db,
    ):
        serve = await Serve.start(db.url, fleet, tmp_path, "w1")
        try:
            assert serve.ready["meters"] == 3

            async def two_rounds() -> bool:
                counts = await _readings_per_meter(db)
                return len(counts) == 3 and min(counts.values()) >= 2

            await _until(two_rounds)
            text = await asyncio.to_thread(serve.metrics)
            assert serve.sample(text, 'hes_polls_total{outcome="read"}') >= 6
            assert serve.sample(text, 'hes_polls_total{outcome="failed"}') == 0
            assert serve.sample(text, "hes_read_duration_seconds_count") >= 6
            assert serve.sample(text, 'hes_rows_stored_total{table="readings"}') >= 6
            assert serve.sample(text, 'hes_rows_stored_total{table="intervals"}') >= 3
            assert serve.sample(text, 'hes_database_errors_total{where="poll"}') == 0
            assert 'hes_duplicates_total{source="poll"}' in text
            for family in METRIC_NAMES:  # every name the help promises
                name = family.split("{")[0]
                assert f"# TYPE {name} " in text, name

            async def gauge_online() -> bool:  # the gauge follows the store within seconds
                text = await asyncio.to_thread(serve.metrics)
                return serve.sample(text, 'hes_meters{health="online"}') == 3

            await _until(gauge_online, timeout=10)
            took = await serve.stop(signal.SIGTERM)
            assert serve.process.returncode == 0
            assert took < 5.0
        finally:
            await serve.close()
        flagged = await _scalar(
            db, select(func.count()).select_from(Reading).where(Reading.flags != 0)
        )
        skewed = await _scalar(
            db,
            select(func.count())
            .select_from(Reading)
            .where(Reading.flags.op("&")(int(Flag.CLOCK_SKEW)) != 0),
        )
        assert (flagged, skewed) == (0, 0)  # the head-end ran on the meters' clock
        await _assert_complete(db, fleet.runtimes)


async def test_sigkill_mid_round_then_a_restart_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    async with (
        _fleet(tmp_path, 24) as fleet,
        _database(f"sqlite:///{tmp_path / 'hes.db'}", fleet) as db,
    ):
        serve = await Serve.start(db.url, fleet, tmp_path, "w1")
        try:
            await _until(lambda: _some_read(db))  # the first round is under way
            await serve.stop(signal.SIGKILL)
            before = await _readings(db)
            serve = await Serve.start(
                db.url, fleet, tmp_path, "w1"
            )  # takes back its claims at once
            mark = fleet.clock.now()

            async def every_meter_read_since() -> bool:
                async with db.begin() as session:
                    fresh = await session.scalar(
                        select(func.count(func.distinct(Reading.meter_id))).where(
                            Reading.meter_time > mark + INTERVAL
                        )
                    )
                return fresh == len(fleet.runtimes)

            await _until(every_meter_read_since)
            await serve.stop(signal.SIGTERM)
            assert serve.process.returncode == 0
        finally:
            await serve.close()
        assert await _readings(db) > before
        await _assert_complete(db, fleet.runtimes)


async def _some_read(db: Database, count: int = 3) -> bool:
    return await _readings(db) >= count


async def test_two_workers_on_postgresql_share_a_fleet_and_take_over(
    tmp_path: Path, postgres_server: str | None
) -> None:
    if postgres_server is None:
        pytest.skip("PostgreSQL at 127.0.0.1:5432 does not answer")
    url, name = fresh_postgres(postgres_server)
    try:
        async with _fleet(tmp_path, 12) as fleet, _database(url, fleet) as db:
            a = await Serve.start(url, fleet, tmp_path, "wa")
            b = await Serve.start(url, fleet, tmp_path, "wb")
            try:

                async def both_share() -> bool:
                    counts = await _readings_per_meter(db)
                    if len(counts) < 12 or min(counts.values()) < 3:
                        return False
                    texts = await asyncio.gather(
                        asyncio.to_thread(a.metrics), asyncio.to_thread(b.metrics)
                    )
                    reads = [
                        w.sample(t, 'hes_polls_total{outcome="read"}')
                        for w, t in zip((a, b), texts, strict=True)
                    ]
                    return min(reads) > 0  # b started later: it takes its share from then on

                await _until(both_share)
                await _assert_spaced(db)  # no meter was read by both in one slot
                await a.stop(signal.SIGKILL)
                killed_at = fleet.clock.now()
                lease = 4 * SPEED  # --lease 4 real seconds, in simulated seconds

                async def b_has_them_all() -> bool:
                    async with db.begin() as session:
                        fresh = await session.scalar(
                            select(func.count(func.distinct(Reading.meter_id))).where(
                                Reading.meter_time > killed_at + lease
                            )
                        )
                    return fresh == 12

                started = time.monotonic()
                await _until(b_has_them_all)
                # within the lease and one interval (1.5 s real) and start-up slack
                assert time.monotonic() - started < 4 + 1.5 + 5
                await b.stop(signal.SIGTERM)
                assert b.process.returncode == 0
            finally:
                await a.close()
                await b.close()
            await _assert_spaced(db)
            await _assert_complete(db, fleet.runtimes)
    finally:
        drop_postgres(postgres_server, name)


async def _assert_spaced(db: Database) -> None:
    """At most one reading of a meter in each of its slots of the interval grid (a read due at
    a slot happens in that slot however late): two workers never read one meter for one slot."""
    async with db.begin() as session:
        rows = (await session.execute(select(Reading.meter_id, Reading.meter_time))).all()
    windows: dict[tuple[str, int], int] = {}
    for meter_id, meter_time in rows:
        window = int((meter_time - slot(meter_id, INTERVAL)) // INTERVAL)
        assert (meter_id, window) not in windows, (meter_id, windows[meter_id, window], meter_time)
        windows[meter_id, window] = meter_time


async def test_hes_poll_on_the_meters_clock_flags_no_clock_skew(tmp_path: Path) -> None:
    async def poll(url: str, fleet: Fleet, *clock: str) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.hes", "poll", "--once", "--json", "--db", url, *clock,
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode == 0, err
        assert json.loads(out)["read"] == len(fleet.runtimes)

    async def skewed(db: Database) -> int:
        return await _scalar(
            db,
            select(func.count())
            .select_from(Reading)
            .where(Reading.flags.op("&")(int(Flag.CLOCK_SKEW)) != 0),
        )

    async with (
        _fleet(tmp_path, 2) as fleet,
        _database(f"sqlite:///{tmp_path / 'hes.db'}", fleet) as db,
    ):
        await poll(db.url, fleet)  # on the wall clock: months away from the meters'
        assert await skewed(db) == 2
        start = ["--clock-start", "2026-01-01T00:00:00Z", "--clock-at", fleet.started]
        await poll(db.url, fleet, "--clock-speed", str(SPEED), *start)
        assert await _readings(db) == 4
        assert await skewed(db) == 2  # the second round's readings are clean


async def test_serve_in_process_rides_out_a_database_outage_and_stops_cleanly(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hes.db"
    async with _fleet(tmp_path, 2) as fleet, _database(f"sqlite:///{path}", fleet) as db:
        settings = ServeSettings(
            db_url=db.url,
            plan=PollPlan(interval=INTERVAL, read_deadline=8.0, lease=20.0,
                          limits=clock_limits(SPEED)),
            worker="inproc",
            link_options=LinkOptions(timeout=0.5, retries=0),
            metrics_port=0,
            housekeeping=0.2,
        )  # fmt: skip
        stop = asyncio.Event()
        announced: list[Ready] = []
        task = asyncio.create_task(serve(settings, fleet.clock, stop, announced.append))
        outage = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        try:
            await _until(lambda: _some_read(db, 2))
            await asyncio.to_thread(_take_the_write_lock, outage)  # longer than a writer waits
            await _until(lambda: _errors_counted(announced[0]), timeout=30)
            outage.execute("ROLLBACK")
            before = await _readings(db)
            await _until(lambda: _some_read(db, before + 2), timeout=20)  # back to work
            stop.set()
            started = time.monotonic()
            metrics = await asyncio.wait_for(task, 10)
            assert time.monotonic() - started < 5.0
            stored = await _readings(db)
        finally:
            outage.close()
            stop.set()
            with contextlib.suppress(BaseException):
                await task
    assert announced[0].metrics_port is not None
    # every read stored a reading (the accelerated clock moves between reads)
    assert metrics.registry.get_sample_value("hes_polls_total", {"outcome": "read"}) == stored
    assert metrics.registry.get_sample_value("hes_rows_stored_total", {"table": "readings"}) == (
        stored
    )


def _take_the_write_lock(outage: sqlite3.Connection) -> None:
    """BEGIN EXCLUSIVE on ``outage``, in a thread: the head-end in this event loop must be
    free to finish the write it may be in the middle of, and SQLite's busy handler is not
    fair (on a loaded machine one wait can lose every race to the head-end's writers)."""
    for attempt in range(6):
        try:
            outage.execute("BEGIN EXCLUSIVE")
        except sqlite3.OperationalError:
            if attempt == 5:
                raise
        else:
            return


async def _errors_counted(ready: Ready) -> bool:
    """The schedule's claiming of meters has failed (and is being retried)."""
    text = await asyncio.to_thread(_scrape, ready.metrics_port)
    failed = {
        line.split('"')[1]
        for line in text.splitlines()
        if line.startswith("hes_database_errors_total{") and not line.endswith(" 0.0")
    }
    return "schedule" in failed


def _scrape(port: int | None) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())
