"""Supply control at scale, each beside a plain baseline in the same run.

    .venv/bin/python bench/supply.py                       # 100,000 accounts, 1,000 commands
    .venv/bin/python bench/supply.py --accounts 20000 --commands 200 --db sqlite
    .venv/bin/python bench/supply.py --history 50 --phase evaluation   # a deeper store

1. **Evaluation** over ``--accounts`` synthetic accounts (customer, account, tariff, meter,
   ``--history`` readings each, 15 minutes apart; a tenth of them out of credit for their last
   three readings, a seventh low), on SQLite and on PostgreSQL: one full pass of
   the balance monitor (``BalanceMonitor.evaluate``: level changes and forecasts, set-wise in
   SQL, with the notices it raises written) and one of the policy (``policy_inputs`` with
   ``acting_only``, as the dispatcher's pass, and ``decide`` for each candidate, queueing
   nothing). Baseline: one bare SQL query that fetches each meter's latest reading with its
   account by GROUP BY over the readings (what both did before ``meter_state``). The readings
   are stored as the poller stores them (``store_new_readings``, keeping each meter's state).
   The first pass of the monitor raises the notices; the second, timed again, finds nothing
   new.
2. **Dispatch**: ``--commands`` disconnects queued for as many simulated meters (served by the
   simulator in a subprocess over Modbus TCP, up to 247 unit ids a listener) and dispatched
   until every one is verified by read-back (``Dispatcher.dispatch_once``), against a bare loop
   sending the same commands through the same links (``execute_confirmed`` and a read-back,
   nothing stored). Then the same meters are reconnected, so a second run starts connected.

``--phase`` runs only one of the two. Bounded: at most 200,000 accounts, 2,000 commands and
10,000,000 readings; loopback only; the databases (a
temporary SQLite file; a PostgreSQL database created on 127.0.0.1:5432 and dropped) and the
subprocess are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import amr  # this folder's AMR bench: its simulator subprocess and fresh databases
from sqlalchemy import and_, insert, select, text, update

from headend.domain.commands import Kind
from headend.domain.policy import decide
from headend.links.base import execute_confirmed
from headend.links.endpoint import LinkOptions
from headend.services.dispatcher import Dispatcher, DispatchSettings
from headend.services.links import EndpointLinks
from headend.services.monitor import BalanceMonitor
from headend.storage import Database, open_database
from headend.storage.commands import Request
from headend.storage.polling import PollTarget
from headend.storage.readings import latest_times, store_new_readings
from headend.storage.schema import Account, Customer, Meter, Reading, Tariff
from headend.storage.supply import policy_inputs
from protocols.clock import ManualClock, SystemClock
from protocols.commands import Command, CommandEnvelope

HOST = amr.HOST
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = amr.POSTGRES_ADMIN
T0 = 1_767_268_800  # 2026-01-01T12:00:00Z
NOW = datetime.fromtimestamp(T0, UTC)


# -- databases ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(dialect: str, workdir: Path, name: str) -> AsyncIterator[Database]:
    """``bench/amr.py``'s fresh database (migrated; removed at the end), open."""
    async with amr.fresh_database(dialect, workdir, name) as url:
        db = await open_database(url, check=False)
        try:
            yield db
        finally:
            await db.close()


# -- 1. evaluation --------------------------------------------------------------------------------


def _reading(meter_id: str, at: int, credit: int) -> dict[str, object]:
    return {
        "meter_id": meter_id, "meter_time": at, "received_at": NOW, "source": "poll",
        "energy_import_wh": 1000, "rate1_wh": 1000, "rate2_wh": 0, "rate3_wh": 0,
        "rate4_wh": 0, "power_w": 500, "voltage_dv": 2300, "current_ma": 2000,
        "power_factor_milli": 990, "frequency_chz": 5000, "credit": credit,
        "emergency_credit": 0, "debt": 0, "low_credit_threshold": 5000,
        "control_state": 1, "control_mode": 6, "status": 1, "last_event_seq": 1,
        "last_transfer": 0, "last_command_seq": 0, "flags": 0, "flag_reason": None,
    }  # fmt: skip


async def populate(db: Database, count: int, history: int = 2) -> None:
    """``count`` customers, accounts and meters on one tariff, each meter with ``history``
    readings 15 minutes apart, the last at ``T0 - 900``, its credit falling by 40 a reading;
    every tenth meter out of credit for its last three readings, every seventh low."""
    batch = max(500, 5000 * 2 // history)
    async with db.begin() as session:
        await session.execute(
            insert(Tariff),
            [{"id": "RES", "kind": "flat", "currency": "KES", "currency_scale": -2,
              "definition": "{}",
              "low_threshold": 5000, "critical_threshold": 1000, "created_at": NOW}],
        )  # fmt: skip
    for first in range(0, count, batch):
        numbers = range(first + 1, min(count, first + batch) + 1)
        async with db.begin() as session:
            await session.execute(
                insert(Customer),
                [{"id": n, "name": f"Customer {n}", "email": None, "phone": f"+2547{n:08d}",
                  "notice_channel": "sms", "language": "en", "created_at": NOW}
                 for n in numbers],
            )  # fmt: skip
            await session.execute(
                insert(Account),
                [{"id": f"ACC-{n}", "customer_id": n, "status": "active", "protected": False,
                  "alert_level": 0, "forecast_sent": False, "created_at": NOW}
                 for n in numbers],
            )  # fmt: skip
            await session.execute(
                insert(Meter),
                [{"id": f"MTR-{n}", "serial": f"S{n}", "endpoint": f"tcp://{HOST}:1/1",
                  "transport": "tcp", "gateway": f"{HOST}:1", "unit_id": 1, "control_mode": 6,
                  "credit_unit": "money", "currency": "KES", "currency_scale": -2,
                  "account_id": f"ACC-{n}", "tariff_id": "RES", "poll_group": "default",
                  "profile_period": 900, "last_command_seq": 0, "status": "active",
                  "created_at": NOW}
                 for n in numbers],
            )  # fmt: skip
            rows = []
            for n in numbers:
                credit = 0 if n % 10 == 0 else 3000 if n % 7 == 0 else 500_000
                for back in range(history - 1, -1, -1):  # oldest first
                    at = T0 - 900 * (back + 1)
                    rows.append(_reading(f"MTR-{n}", at, credit + 40 * max(0, back - 2)))
            await store_new_readings(session, rows)  # as the poller stores them


async def baseline_query(db: Database) -> tuple[float, int]:
    latest = latest_times()
    query = (
        select(Meter.id, Reading.credit, Reading.control_state, Account.id)
        .join(latest, latest.c.meter_id == Meter.id)
        .join(
            Reading, and_(Reading.meter_id == Meter.id, Reading.meter_time == latest.c.meter_time)
        )
        .join(Account, Account.id == Meter.account_id)
    )
    started = time.perf_counter()
    async with db.read() as session:
        rows = (await session.execute(query)).all()
    return time.perf_counter() - started, len(rows)


async def policy_pass(db: Database) -> tuple[float, int]:
    started = time.perf_counter()
    async with db.read() as session:
        inputs = await policy_inputs(session, acting_only=True)
    acting = sum(
        1
        for row in inputs
        if decide(row.account, row.meter, row.calendar, NOW).action.value != "none"
    )
    return time.perf_counter() - started, acting


async def evaluation(dialect: str, count: int, history: int, workdir: Path) -> None:
    async with fresh_database(dialect, workdir, "supply") as db:
        started = time.perf_counter()
        await populate(db, count, history)
        if dialect == "postgresql":  # what autovacuum does after a bulk load: plan on statistics
            async with db.begin() as session:
                await session.execute(text("ANALYZE"))
        print(f"\n{dialect}: {count:,} accounts, {count * history:,} readings written in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
        base, rows = await baseline_query(db)
        monitor = BalanceMonitor(db, ManualClock(T0))
        started = time.perf_counter()
        first = await monitor.evaluate()
        first_s = time.perf_counter() - started
        started = time.perf_counter()
        again = await monitor.evaluate()
        again_s = time.perf_counter() - started
        policy_s, acting = await policy_pass(db)
        print(f"  baseline: latest reading per meter with its account: {base:.3f} s ({rows:,})")
        print(f"  monitor, first pass: {first_s:.3f} s ({first.notices:,} notices written)")
        print(f"  monitor, next pass:  {again_s:.3f} s ({again.notices} notices)"
              f"  ratio {base / again_s:.2f}")  # fmt: skip
        print(f"  policy pass:         {policy_s:.3f} s ({acting:,} meters to act on)"
              f"  ratio {base / policy_s:.2f}")  # fmt: skip


# -- 2. dispatch ----------------------------------------------------------------------------------


async def register(db: Database, targets: Sequence[tuple[int, int, str]]) -> None:
    async with db.begin() as session:
        await session.execute(
            insert(Meter),
            [{"id": meter_id, "serial": meter_id, "endpoint": f"tcp://{HOST}:{port}/{unit}",
              "transport": "tcp", "gateway": f"{HOST}:{port}", "unit_id": unit,
              "control_mode": 6, "credit_unit": "money", "currency": "KES",
              "currency_scale": -2, "poll_group": "default", "profile_period": 900,
              "last_command_seq": 0, "status": "active", "created_at": NOW}
             for port, unit, meter_id in targets],
        )  # fmt: skip


async def dispatch_all(db: Database, kind: Kind, meters: Sequence[str]) -> tuple[float, int]:
    """Queue ``kind`` for every meter and dispatch until all are verified; (seconds, verified)."""
    links = EndpointLinks(LinkOptions(timeout=5.0, retries=0))
    settings = DispatchSettings(attempt_timeout=10.0, batch=len(meters), per_gateway=64)
    dispatcher = Dispatcher(db, links, SystemClock(), worker="bench", settings=settings)
    started = time.perf_counter()
    try:
        await dispatcher.queue_many([Request(m, kind, "bench", "bench") for m in meters])
        queued = time.perf_counter() - started
        verified = 0
        for _ in range(10):
            result = await dispatcher.dispatch_once()
            verified += result.outcomes.get("verified", 0)
            if verified == len(meters) or not result.outcomes:
                break
    finally:
        await links.close()
    print(f"  ({queued:.2f} s to queue; {dispatcher.recorder.transactions} transactions of "
          "transitions)")  # fmt: skip
    return time.perf_counter() - started, verified


async def bare_loop(
    targets: Sequence[tuple[int, int, str]], kind: Kind, first_seq: int
) -> tuple[float, int]:
    """The same commands through the same links: envelope, confirmed send, read-back."""
    links = EndpointLinks(LinkOptions(timeout=5.0, retries=0))
    command = Command.remote_disconnect() if kind is Kind.DISCONNECT else Command.remote_reconnect()
    line = {port: asyncio.Semaphore(64) for port, _, _ in targets}

    async def one(port: int, unit: int, meter_id: str) -> bool:
        target = PollTarget(meter_id, f"tcp://{HOST}:{port}/{unit}", "tcp", "", 900, "")
        async with line[port]:
            link = await links.link(target)
            envelope = CommandEnvelope(meter_id, first_seq, command)
            result = await execute_confirmed(link, envelope, 10.0)
            snapshot = await link.read_snapshot()
        return result.accepted and (snapshot.relay_closed is (kind is Kind.RECONNECT))

    started = time.perf_counter()
    try:
        done = await asyncio.gather(*(one(*t) for t in targets))
    finally:
        await links.close()
    return time.perf_counter() - started, sum(done)


async def dispatch(dialect: str, count: int, workdir: Path) -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable, amr.__file__, "--serve", str(count), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024,
    )  # fmt: skip
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 600)
        if not line:
            raise SystemExit(f"the simulator exited with {await server.wait()}")
        targets = [(int(p), int(u), str(m)) for p, u, m in json.loads(line)["targets"]]
        meters = [m for _, _, m in targets]
        # the bare loop first (sequences 1 and 2), then the dispatcher (3 and 4)
        bare_off, bare_ok = await bare_loop(targets, Kind.DISCONNECT, 1)
        bare_on, _ = await bare_loop(targets, Kind.RECONNECT, 2)
        async with fresh_database(dialect, workdir, "dispatch") as db:
            await register(db, targets)
            async with db.begin() as session:  # the head-end has seen the bare loop's numbers
                await session.execute(update(Meter).values(last_command_seq=2))
            off, verified = await dispatch_all(db, Kind.DISCONNECT, meters)
            on, _ = await dispatch_all(db, Kind.RECONNECT, meters)
        print(f"\n{dialect}: {count:,} meters over Modbus TCP "
              f"({len({p for p, _, _ in targets})} listener(s))")  # fmt: skip
        print(f"  bare loop: {count:,} disconnects confirmed and read back in {bare_off:.2f} s "
              f"({bare_ok:,} ok); reconnects {bare_on:.2f} s")  # fmt: skip
        print(
            f"  dispatcher: {count:,} disconnects queued, sent and verified in {off:.2f} s "
            f"({verified:,} verified); reconnects {on:.2f} s  ratio {bare_off / off:.2f}"
        )
    finally:
        server.stdin.close()
        try:
            await asyncio.wait_for(server.wait(), 60)
        except TimeoutError:
            server.kill()
            await server.wait()


async def measure(args: argparse.Namespace) -> None:
    dialects = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in dialects and not amr._postgres_answers():
        if args.db == "postgresql":
            raise SystemExit(f"PostgreSQL at {POSTGRES_ADMIN} does not answer")
        print(f"PostgreSQL at {POSTGRES_ADMIN} does not answer: SQLite only")
        dialects.remove("postgresql")
    with tempfile.TemporaryDirectory(prefix="hes-bench-") as workdir:
        if args.phase in ("both", "evaluation"):
            for dialect in dialects:
                await evaluation(dialect, args.accounts, args.history, Path(workdir))
        if args.phase in ("both", "dispatch"):
            for dialect in dialects:
                await dispatch(dialect, args.commands, Path(workdir))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=100_000, help="1..200000")
    parser.add_argument("--commands", type=int, default=1000, help="1..2000")
    parser.add_argument("--history", type=int, default=2, help="readings a meter, 2..1000")
    parser.add_argument("--db", choices=("both", "sqlite", "postgresql"), default="both")
    parser.add_argument("--phase", choices=("both", "evaluation", "dispatch"), default="both")
    args = parser.parse_args()
    if not 1 <= args.accounts <= 200_000 or not 1 <= args.commands <= 2000:
        parser.error("--accounts is 1..200000, --commands 1..2000")
    if not 2 <= args.history <= 1000 or args.accounts * args.history > 10_000_000:
        parser.error("--history is 2..1000, and --accounts times --history at most 10,000,000")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
