"""Automated meter reading, read and stored: the head-end's poller (``Poller.poll_once``)
against a bare pymodbus client loop with one SQLAlchemy Core executemany per batch, on SQLite
and on PostgreSQL.

    .venv/bin/python bench/amr.py                        # 1,000 meters, SQLite and PostgreSQL
    .venv/bin/python bench/amr.py --meters 10000 --rounds 2 --db sqlite

The meters are served by the simulator in a *subprocess*, so that its CPU does not compete with
the masters': Modbus TCP listeners of up to 247 unit ids each (``serve_tcp``; a fleet of 10,000
takes 41 listeners; ``serve_tcp_per_meter`` would take a port per meter), every meter on the
system clock. Both masters hold one connection per listener and send one request at a time on
it (the head-end's link pool shares one connection per gateway), so at most one read per
listener is in flight. Each master gets a database of its own,
migrated to head (a SQLite file in a temporary directory; a PostgreSQL database created for the
run on 127.0.0.1:5432 and dropped at its end).

* The poller: the meters registered as ``tcp://127.0.0.1:PORT/UNIT``, read through
  ``EndpointLinks`` (one connection per listener) with the default poll plan (but for a
  longer read deadline, ``--deadline``: the deadline runs while a read waits its turn), each
  read validated and stored with its health, all or nothing, reads that finish together in
  one transaction (what a round of ``hes poll --once`` does, profile and event-log reads
  included when the meter has something new).
* The baseline: one bare ``AsyncModbusTcpClient`` per listener reading its unit ids one after
  the other (the function-04 snapshot read of ``SNAPSHOT_SIZE`` registers, decoded), the
  listeners concurrently, and per listener one Core ``executemany`` of the same reading rows
  into the same ``readings`` table (insert-or-ignore, as the poller does).

One untimed warm-up round each (connections, the first read's history and events), then the
timed rounds, the two masters alternately. A round's *rows* are the readings it wrote (one per
meter read, new or, when the meter's clock still shows the second of the round before, found
stored: the bare loop's insert-or-ignore counts them alike); the poller's extra rows
(intervals, events) are shown beside. The ratio is the baseline's round time over the
poller's; beside it, the ratio of this process's CPU time per round (all its threads; the
simulator is another process), which moves less than wall time when other work shares the
machine.

Bounded: ``--meters`` <= 10,000, ``--rounds`` <= 20, the timed rounds stop early after
``--max-seconds``; loopback only; the subprocess, the databases and the files are removed at
the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from headend.domain.registry import MeterRecord
from headend.domain.validation import Findings
from headend.links.endpoint import LinkOptions
from headend.services.links import EndpointLinks
from headend.services.poller import Poller, PollPlan, RoundSummary
from headend.services.registry import route_of
from headend.storage import Database, open_database
from headend.storage.database import refresh_statistics
from headend.storage.readings import reading_row
from headend.storage.registry import import_meters
from headend.storage.schema import Reading
from protocols import registermap as rm
from protocols.clock import SystemClock
from protocols.errors import StorageError

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
UNITS_PER_LISTENER = 247
MAX_METERS = 10_000

Target = tuple[int, int, str]  # (port, unit id, meter id)


async def serve(count: int, per_listener: int = UNITS_PER_LISTENER) -> None:
    """The simulator's side: ``count`` meters, ``per_listener`` unit ids (at most 247) on each
    Modbus TCP listener (a gateway), until stdin closes; prints the targets."""
    from meter_sim.config import default_fleet
    from meter_sim.modbus_server import serve_tcp
    from meter_sim.runtime import MeterRuntime

    fleet = default_fleet(count, initial_credit=1_000_000)
    clock = SystemClock()
    runtimes = [MeterRuntime.open(meter, clock) for meter in fleet.meters]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with contextlib.AsyncExitStack() as stack:
        targets: list[Target] = []
        for first in range(0, count, per_listener):
            chunk = runtimes[first : first + per_listener]
            service = await stack.enter_async_context(serve_tcp(chunk, HOST))
            targets += [(service.port, r.config.modbus_unit, r.meter_id) for r in chunk]
        sys.stdout.write(json.dumps({"targets": targets}) + "\n")
        sys.stdout.flush()
        await stdin.read()


# -- databases ------------------------------------------------------------------------------------


def _postgres_answers() -> bool:
    import psycopg

    try:
        psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


@contextlib.asynccontextmanager
async def fresh_database(dialect: str, workdir: Path, name: str) -> AsyncIterator[str]:
    """An empty database migrated to head; its URL. Removed (dropped) at the end."""
    if dialect == "sqlite":
        url = f"sqlite:///{workdir / (name + '.db')}"
    else:
        import psycopg

        name = f"hes_bench_{name}_{int(time.time())}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"{POSTGRES_ADMIN.rsplit('/', 1)[0]}/{name}"
    try:
        db = await open_database(url, check=False)
        try:
            await db.upgrade()
        finally:
            await db.close()
        yield url
    finally:
        if dialect == "postgresql":
            import psycopg

            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the two masters ------------------------------------------------------------------------------


@dataclass(slots=True)
class Runs:
    """The timed rounds of one master: seconds, readings stored, other rows stored."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this process's CPU seconds (all threads)
    readings: list[int] = field(default_factory=list)
    other_rows: list[int] = field(default_factory=list)

    @property
    def round_time(self) -> float:
        return statistics.median(self.seconds)

    @property
    def round_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def rows_per_second(self) -> float:
        return sum(self.readings) / sum(self.seconds)


class Bare:
    """Bare pymodbus clients, one per listener, and a plain engine doing one executemany per
    listener's batch."""

    def __init__(self, url: str, targets: Sequence[Target]) -> None:
        driver = url.replace("sqlite://", "sqlite+aiosqlite://", 1).replace(
            "postgresql://", "postgresql+psycopg://", 1
        )
        self.engine = create_async_engine(driver)
        insert = postgresql.insert if url.startswith("postgresql") else sqlite.insert
        self.statement = insert(Reading).on_conflict_do_nothing()
        self.by_port: dict[int, list[tuple[int, str]]] = {}
        for port, unit, meter_id in targets:
            self.by_port.setdefault(port, []).append((unit, meter_id))
        self.clients = {
            port: AsyncModbusTcpClient(HOST, port=port, timeout=10, retries=0)
            for port in self.by_port
        }

    async def connect(self, url: str, targets: Sequence[Target]) -> None:
        db = await open_database(url)
        try:
            await register(db, targets)
        finally:
            await db.close()
        connected = await asyncio.gather(*(c.connect() for c in self.clients.values()))
        if not all(connected):
            raise SystemExit("the bare clients could not connect")

    async def _listener(self, port: int) -> int:
        client = self.clients[port]
        rows: list[dict[str, Any]] = []
        for unit, meter_id in self.by_port[port]:
            response = await client.read_input_registers(
                rm.SNAPSHOT_START, count=rm.SNAPSHOT_SIZE, device_id=unit
            )
            if response.isError():
                raise SystemExit(f"bare read of {meter_id} failed: {response}")
            snapshot = rm.decode_snapshot(response.registers, meter_id)
            rows.append(reading_row(snapshot, Findings(), datetime.now(UTC), "poll"))
        async with self.engine.begin() as conn:
            await conn.execute(self.statement, rows)
        return len(rows)

    async def round(self) -> tuple[int, int]:
        counts = await asyncio.gather(*(self._listener(port) for port in self.by_port))
        return sum(counts), 0

    async def close(self) -> None:
        for client in self.clients.values():
            client.close()
        await self.engine.dispose()


async def register(db: Database, targets: Sequence[Target]) -> None:
    """Register the meters as ``tcp://127.0.0.1:PORT/UNIT`` (both stores need them: readings
    refer to their meter)."""
    rows = []
    for line, (port, unit, meter_id) in enumerate(targets, start=2):
        endpoint = f"tcp://{HOST}:{port}/{unit}"
        rows.append((line, MeterRecord(meter_id, endpoint, route_of(endpoint))))
    report = await import_meters(db, rows, [], datetime.now(UTC), actor="bench")
    if not report.applied:
        raise SystemExit(f"registering the meters failed: {report.refused[:3]}")


class Project:
    """The meters registered in the head-end's store and read by its poller."""

    def __init__(self, url: str, deadline: float) -> None:
        self.url = url
        self.links = EndpointLinks(LinkOptions(timeout=10, retries=0))
        self.plan = PollPlan(read_deadline=deadline, lease=max(120.0, 2 * deadline))
        self.summary = RoundSummary()

    async def register(self, targets: Sequence[Target]) -> None:
        self.db = await open_database(self.url)
        await register(self.db, targets)
        self.poller = Poller(self.db, self.links, SystemClock(), plan=self.plan)

    async def round(self) -> tuple[int, int]:
        summary = await self.poller.poll_once()
        if summary.failed:
            failures = summary.as_dict()["failures"]
            assert isinstance(failures, dict)
            first = next(iter(failures.items()))
            raise SystemExit(f"{summary.failed} meters failed, e.g. {first}")
        # a reading the store held already (the meter's clock showed the same second) counts
        # as the bare loop's ignored insert does: written, found there
        readings = sum(o.ok for o in summary.outcomes)
        others = sum(o.intervals + o.estimated + o.events + o.gaps for o in summary.outcomes)
        return readings, others

    async def close(self) -> None:
        await self.links.close()
        if hasattr(self, "db"):
            await self.db.close()


async def analyze(url: str) -> None:
    """Refresh the planner's statistics of the database at ``url``, as autovacuum does within
    a minute of a bulk load (the timed rounds would otherwise run on plans made for empty
    tables)."""
    db = await open_database(url, check=False)
    try:
        await refresh_statistics(db)
    finally:
        await db.close()


async def _timed(master: Bare | Project, runs: Runs) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    readings, others = await master.round()
    runs.seconds.append(time.perf_counter() - started)
    runs.cpu.append(time.process_time() - cpu)
    runs.readings.append(readings)
    runs.other_rows.append(others)


async def compare(
    dialect: str, targets: Sequence[Target], args: argparse.Namespace, workdir: Path
) -> float | None:
    """The two masters on one dialect; the ratio, or None when the poller's round failed."""
    async with (
        fresh_database(dialect, workdir, "bare") as bare_url,
        fresh_database(dialect, workdir, "poller") as project_url,
    ):
        bare = Bare(bare_url, targets)
        project = Project(project_url, args.deadline)
        failed = ""
        try:
            await bare.connect(bare_url, targets)
            await project.register(targets)
            warm = Runs()
            started = time.perf_counter()
            await _timed(bare, warm)
            await _timed(project, warm)
            print(
                f"{dialect}: warm-up round, bare {warm.seconds[0]:.2f} s, poller "
                f"{warm.seconds[1]:.2f} s ({warm.other_rows[1]} interval/event rows)"
            )
            if dialect == "postgresql":  # what autovacuum does after a bulk load
                for url in (bare_url, project_url):
                    await analyze(url)
            bare_runs, project_runs = Runs(), Runs()
            profiler = cProfile.Profile() if args.profile else None
            started = time.perf_counter()
            for _ in range(args.rounds):
                await _timed(bare, bare_runs)
                if profiler is not None:
                    profiler.enable()
                await _timed(project, project_runs)
                if profiler is not None:
                    profiler.disable()
                if time.perf_counter() - started > args.max_seconds:
                    break
        except* StorageError as group:  # poll_once lets a storage failure end the round
            failed = f"after {time.perf_counter() - started:.1f} s: {group.exceptions[0]}"
        finally:
            await bare.close()
            await project.close()
    if failed:
        print(f"{dialect}: {len(targets)} meters: the poller's round failed {failed}")
        return None
    print(f"{dialect}: {len(targets)} meters, {len(bare_runs.seconds)} timed rounds each")
    print("                          rows/s  round s (median)  cpu s  other rows  rounds (s)")
    for name, runs in (("bare pymodbus + Core", bare_runs), ("poller (poll_once)", project_runs)):
        text = ", ".join(f"{s:.2f}" for s in runs.seconds)
        print(
            f"  {name:<21} {runs.rows_per_second:7.0f}  {runs.round_time:16.2f}  "
            f"{runs.round_cpu:5.2f}  {sum(runs.other_rows):10d}  {text}"
        )
    if profiler is not None:
        print(f"  the poller's timed rounds, top {args.profile} functions by own time:")
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(args.profile)
    ratio = bare_runs.round_time / project_runs.round_time
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"  ratio poller / bare: {ratio:.2f} (target >= 0.80: {verdict})")
    cpu_ratio = bare_runs.round_cpu / project_runs.round_cpu
    print(
        f"  ratio of this process's CPU per round, bare / poller: {cpu_ratio:.2f} (steadier "
        "than the wall-clock ratio on a machine others share)"
    )
    return ratio


async def measure(args: argparse.Namespace) -> None:
    dialects = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in dialects and not _postgres_answers():
        if args.db == "postgresql":
            raise SystemExit(f"PostgreSQL at {POSTGRES_ADMIN} does not answer")
        print(f"PostgreSQL at {POSTGRES_ADMIN} does not answer: SQLite only")
        dialects.remove("postgresql")
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(args.meters),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=16 * 1024 * 1024,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 600)
        if not line:
            raise SystemExit(f"the simulator exited with {await server.wait()}")
        targets = [tuple(t) for t in json.loads(line)["targets"]]
        listeners = len({port for port, _, _ in targets})
        print(
            f"{len(targets)} meters served by a simulator subprocess on {listeners} Modbus TCP "
            f"listener(s), up to {UNITS_PER_LISTENER} unit ids each"
        )
        with tempfile.TemporaryDirectory(prefix="hes-bench-") as workdir:
            for dialect in dialects:
                await compare(dialect, targets, args, Path(workdir))
    finally:
        server.stdin.close()
        try:
            await asyncio.wait_for(server.wait(), 60)
        except TimeoutError:
            server.kill()
            await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=1000, help="meters to serve (1..10000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each master (1..20)")
    parser.add_argument(
        "--db", choices=("both", "sqlite", "postgresql"), default="both", help="the stores"
    )
    parser.add_argument(
        "--deadline", type=float, default=120.0, help="the poll plan's read deadline, s"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="time bound of the timed rounds"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile the poller's timed rounds (cProfile, this process only) and print the "
        "top N functions",
    )
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if not (1 <= args.meters <= MAX_METERS and 1 <= args.rounds <= 20 and args.deadline > 0):
        parser.error("--meters is 1..10000, --rounds 1..20, --deadline positive")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
