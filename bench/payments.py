"""Payments over HTTP into ``hes serve``, with the credit delivered to simulated meters, beside
a bare FastAPI endpoint in the same run, on SQLite and on PostgreSQL.

    .venv/bin/python bench/payments.py                          # 200 meters, both databases
    .venv/bin/python bench/payments.py --db sqlite --payments 2000 --rate 200 --seconds 10
    .venv/bin/python bench/payments.py --db sqlite --profile /tmp/prof   # cProfile the server

The meters are served by the simulator in a *subprocess* (this file with ``--serve-meters``:
remote-credit meters counting money, ``--per-gateway`` unit ids on each Modbus TCP listener,
as behind data concentrators; the deliverer works at most four meters of a gateway at once).
Each database is new (a SQLite file in a temporary directory; a PostgreSQL database created
on 127.0.0.1:5432 and dropped at the end), migrated, with a tariff (a fee, VAT and a monthly
service charge, so the whole split is worked), a customer and an account per meter, the
meters registered at their ``tcp://127.0.0.1:PORT/UNIT`` and ``--clients`` payment channels,
each with its API key.

* The project: ``hes serve --api-port 0`` in a subprocess (the poller, the balance monitor,
  the dispatcher and the credit deliverer on, as an operator runs it). ``--clients``
  channels post at once, each over its own HTTP/1.1 keep-alive connection (one
  ``httpx.AsyncClient`` a channel, one request at a time on it), the meters taken in turn.

  1. *Closed loop*: ``--payments`` payments as fast as they are answered: accepted
     payments/s (201s over the wall time). Then the bench waits until the deliverer has every
     transfer on its meter: deliveries/s from the first payment to the last delivery.
  2. *Fixed rate*: ``--rate`` payments/s offered for ``--seconds`` (each channel sends its
     share on schedule, or as soon as its previous answer came when it is behind): the
     latency of the answer (sent -> 201), and from accepted (201 received) to credit confirmed
     on the meter (the transfer's ``delivered_at``, written when the meter acknowledged it or
     a read-back showed it), p50 and p99. Both processes read the one system clock.
     The meters' credit is then read back over Modbus: every meter's last transfer number is
     the number of payments made to it.

* The baseline: a bare FastAPI endpoint (this file with ``--baseline-serve``) in a subprocess,
  served by uvicorn the same way (``headend.api.ApiServer``), validating the same body and
  doing one INSERT per request into one table of the same database (opened with the same
  engine settings, and committed as durably as a payment: on SQLite with the WAL synced
  before the answer), answering 201 with the row's id; the same clients post the same closed
  loop. The ratio is the project's accepted payments/s over the baseline's. Beside it, each
server's CPU time (user and system, all threads, from /proc) per request while the closed loop
ran, which a busy machine disturbs less than wall time.

Bounded: at most 1,000 meters, 20,000 payments, 1,000 payments/s and 60 s at that rate; each
wait has a deadline; loopback only; the subprocesses, the databases and the files are removed
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import amr  # this folder's AMR bench: its simulator subprocess and fresh databases
import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
)

from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.services.registry import route_of
from headend.storage import open_database
from headend.storage.database import DURABLE
from headend.storage.delivery import workable_count
from headend.storage.ledger import add_channel, check_balances
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.schema import CreditTransfer, Payment

HOST = amr.HOST
ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN = amr.POSTGRES_ADMIN
AMOUNT = 10_000  # minor units of each payment: 100.00 KES
TARIFF = TariffRecord(
    "RES", "KES", -2, (2500,), 5000, 1000, fee=50, service_charge=5_000, vat_bp=1600
)
START_WAIT = 120.0  # seconds a subprocess may take to be ready

Target = amr.Target


# -- the baseline server (a subprocess) -----------------------------------------------------------


class BareBody(BaseModel):
    """The baseline's request body: the payment's fields, validated."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(min_length=1, max_length=128)
    meter_id: str = Field(min_length=1, max_length=64)
    amount: StrictInt = Field(gt=0)
    currency: str = Field(pattern="^[A-Z]{3}$")
    paid_at: AwareDatetime


BARE = Table(
    "bench_payments",
    MetaData(),
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reference", String(128), nullable=False),
    Column("meter_id", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("paid_at", DateTime(timezone=True), nullable=False),
)


def baseline_serve(url: str) -> None:
    """A bare FastAPI endpoint: the body validated, one INSERT into one table, 201 with the
    id; prints ``{"port": P}`` when serving, stops on SIGTERM or SIGINT."""
    from fastapi import FastAPI

    from headend.api import ApiServer

    async def run() -> None:
        db = await open_database(url, check=False)
        async with db.engine.begin() as conn:
            await conn.run_sync(BARE.metadata.create_all)
        app = FastAPI()
        statement = insert(BARE).returning(BARE.c.id)
        durable = db.engine.execution_options(**{DURABLE: True})  # as a payment's commit

        @app.post("/v1/payments", status_code=201)
        async def post_payment(body: BareBody) -> dict[str, Any]:
            async with durable.begin() as conn:
                row_id = (await conn.execute(statement, body.model_dump())).scalar_one()
            return {"payment_id": row_id, "reference": body.reference}

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        server = ApiServer(app, HOST, 0)
        await server.start()
        sys.stdout.write(json.dumps({"port": server.port}) + "\n")
        sys.stdout.flush()
        try:
            await server.run(stop)
        finally:
            await db.close()

    asyncio.run(run())


# -- subprocesses ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Child:
    process: asyncio.subprocess.Process
    ready: dict[str, Any]
    log: Path

    def cpu(self) -> float:
        """The process's CPU seconds so far (user and system, all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def child(args: Sequence[str], log: Path, *, ready_key: str) -> AsyncIterator[Child]:
    """A subprocess that prints a JSON line with ``ready_key`` when it serves; stopped with
    SIGTERM at the end (killed if it does not stop)."""
    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=err,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_WAIT):
            while True:
                line = await process.stdout.readline()
                if not line:
                    code = await process.wait()
                    raise SystemExit(f"{args[1:4]} exited with {code}: see its log {log}")
                with contextlib.suppress(ValueError):
                    document = json.loads(line)
                    if isinstance(document, dict) and ready_key in document:
                        break
        yield Child(process, document, log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 60)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def simulator(count: int, per_gateway: int) -> AsyncIterator[list[Target]]:
    server = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--serve-meters", str(count), str(per_gateway), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=16 * 1024 * 1024,
    )  # fmt: skip
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), START_WAIT)
        if not line:
            raise SystemExit(f"the simulator exited with {await server.wait()}")
        yield [(int(p), int(u), str(m)) for p, u, m in json.loads(line)["targets"]]
    finally:
        server.stdin.close()
        try:
            await asyncio.wait_for(server.wait(), 60)
        except TimeoutError:
            server.kill()
            await server.wait()


# -- the database ---------------------------------------------------------------------------------


async def populate(url: str, targets: Sequence[Target], clients: int) -> list[tuple[str, str]]:
    """The tariff, a customer and account per meter, the meters, the channels; returns each
    channel's (name, API key)."""
    now = datetime.now(UTC)
    db = await open_database(url)
    try:
        await add_tariff(db, TARIFF, now, actor="bench")
        rows = []
        for line, (port, unit, meter_id) in enumerate(targets, start=2):
            customer = CustomerRecord(f"Customer {meter_id}", None, f"+2547{line:08d}", "sms")
            await add_customer(db, customer, f"ACC-{meter_id}", now, actor="bench")
            endpoint = f"tcp://{HOST}:{port}/{unit}"
            record = MeterRecord(
                meter_id=meter_id, endpoint=endpoint, route=route_of(endpoint),
                customer=customer.name, account=f"ACC-{meter_id}", tariff=TARIFF.tariff_id,
            )  # fmt: skip
            rows.append((line, record))
        report = await import_meters(db, rows, [], now, actor="bench")
        if not report.applied:
            raise SystemExit(f"registering the meters failed: {report.refused[:3]}")
        channels = []
        for n in range(clients):
            view, key = await add_channel(db, f"BENCH-{n}", "mobile", now, actor="bench")
            channels.append((view.name, key))
        return channels
    finally:
        await db.close()


async def wait_delivered(url: str, deadline: float) -> float:
    """Wait until no transfer is left to deliver; returns when that was seen (perf_counter)."""
    db = await open_database(url)
    try:
        async with asyncio.timeout(deadline):
            while await workable_count(db):  # noqa: ASYNC110 - nothing signals it
                await asyncio.sleep(0.02)
        return time.perf_counter()
    finally:
        await db.close()


async def delivered_at(url: str, payment_ids: Sequence[int]) -> dict[int, float]:
    db = await open_database(url)
    try:
        async with db.read() as session:
            found = await session.execute(
                select(CreditTransfer.payment_id, CreditTransfer.delivered_at).where(
                    CreditTransfer.payment_id.in_(list(payment_ids)),
                    CreditTransfer.delivered_at.is_not(None),
                )
            )
            return {int(p): _utc(at).timestamp() for p, at in found}
    finally:
        await db.close()


def _utc(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)  # SQLite keeps no zone


async def ledger_checks(url: str) -> tuple[int, int]:
    """(payments stored, accounts whose cached balance is not the sum of its postings)."""
    db = await open_database(url)
    try:
        async with db.read() as session:
            payments = len((await session.scalars(select(Payment.id))).all())
        wrong = [c for c in await check_balances(db) if c.cached != c.from_postings]
        return payments, len(wrong)
    finally:
        await db.close()


# -- the clients ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Posted:
    """What a run of posts gave: per accepted payment its id, when it was sent and answered
    (time.time())."""

    accepted: dict[int, tuple[float, float]] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.accepted) / self.seconds if self.seconds else 0.0


def _body(reference: str, meter_id: str) -> dict[str, Any]:
    return {
        "reference": reference,
        "meter_id": meter_id,
        "amount": AMOUNT,
        "currency": "KES",
        "paid_at": datetime.now(UTC).isoformat(),
    }


async def post_all(
    base: str,
    channels: Sequence[tuple[str, str]],
    meters: Sequence[str],
    count: int,
    prefix: str,
    *,
    rate: float | None = None,
) -> Posted:
    """``count`` payments, the channels posting concurrently (payment ``i`` by channel
    ``i % len(channels)``, to meter ``i % len(meters)``); at ``rate`` per second when given
    (payment ``i`` sent at ``i / rate`` s, or later if its channel is behind), else closed
    loop."""
    posted = Posted()
    started = time.perf_counter()

    async def channel(n: int, key: str) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(
            base_url=base, headers=headers, limits=limits, timeout=30.0
        ) as client:
            for i in range(n, count, len(channels)):
                if rate is not None:
                    wait = started + i / rate - time.perf_counter()
                    if wait > 0:
                        await asyncio.sleep(wait)
                body = _body(f"{prefix}-{i}", meters[i % len(meters)])
                sent = time.time()
                response = await client.post("/v1/payments", json=body)
                answered = time.time()
                if response.status_code == 201:
                    posted.accepted[int(response.json()["payment_id"])] = (sent, answered)
                else:
                    posted.refused.append(f"{response.status_code} {response.text[:200]}")

    await asyncio.gather(*(channel(n, key) for n, (_, key) in enumerate(channels)))
    posted.seconds = time.perf_counter() - started
    return posted


def percentile(values: Sequence[float], p: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


# -- one database ---------------------------------------------------------------------------------


async def bench(
    dialect: str, args: argparse.Namespace, targets: Sequence[Target], workdir: Path
) -> tuple[float, float]:
    meters = [m for _, _, m in targets]
    gateways = len({port for port, _, _ in targets})
    print(f"\n{dialect}: {len(meters)} meters behind {gateways} Modbus TCP gateways, "
          f"{args.clients} channels")  # fmt: skip
    async with amr.fresh_database(dialect, workdir, "payments") as url:
        channels = await populate(url, targets, args.clients)
        # the baseline first, on the fresh database
        baseline_args = [sys.executable, __file__, "--baseline-serve", url]
        async with child(baseline_args, workdir / f"baseline-{dialect}.log", ready_key="port") as c:
            base = f"http://{HOST}:{c.ready['port']}"
            warm = await post_all(base, channels, meters, 4 * args.clients, "W")
            cpu = c.cpu()
            bare = await post_all(base, channels, meters, args.payments, "B")
            bare_cpu = (c.cpu() - cpu) / max(1, len(bare.accepted))
        if bare.refused:
            raise SystemExit(f"the baseline refused: {bare.refused[:3]}")
        print(f"  baseline, bare FastAPI + one INSERT: {bare.rate:,.0f} requests/s "
              f"({len(bare.accepted):,} in {bare.seconds:.2f} s), "
              f"CPU {bare_cpu * 1000:.2f} ms a request")  # fmt: skip
        serve_args = [
            sys.executable, "-m", "cli.hes", "serve", "--db", url, "--api-port", "0",
            "--log-json", "--worker", "bench", "--timeout", "5",
        ]  # fmt: skip
        profile = None
        if args.profile is not None:
            profile = args.profile / f"serve-{dialect}.prof"
            serve_args[1:1] = ["-m", "cProfile", "-o", str(profile)]
        async with child(serve_args, workdir / f"serve-{dialect}.log", ready_key="event") as c:
            base = f"http://{HOST}:{c.ready['api_port']}"
            warm = await post_all(base, channels, meters, 4 * args.clients, "W")
            if warm.refused:
                raise SystemExit(f"hes serve refused: {warm.refused[:3]}")
            await wait_delivered(url, args.delivery_wait)
            loop_started, cpu = time.perf_counter(), c.cpu()
            closed = await post_all(base, channels, meters, args.payments, "C")
            closed_cpu = c.cpu() - cpu
            print(f"  hes serve, closed loop: {closed.rate:,.0f} payments/s accepted "
                  f"({len(closed.accepted):,} in {closed.seconds:.2f} s)  "
                  f"ratio {closed.rate / bare.rate:.2f}")  # fmt: skip
            print(f"    CPU of hes serve while they came: "
                  f"{closed_cpu / max(1, len(closed.accepted)) * 1000:.2f} ms a payment "
                  f"({closed_cpu / closed.seconds:.0%} of a core); CPU ratio (bare / hes serve) "
                  f"{bare_cpu * len(closed.accepted) / closed_cpu:.2f}")  # fmt: skip
            drained = await wait_delivered(url, args.delivery_wait)
            delivery_cpu = c.cpu() - cpu
            fixed = await post_all(
                base, channels, meters, int(args.rate * args.seconds), "R", rate=args.rate
            )
            await wait_delivered(url, args.delivery_wait)
        refused = closed.refused + fixed.refused
        if refused:
            errors = [line for line in c.log.read_text().splitlines() if '"error"' in line]
            raise SystemExit(
                f"hes serve refused {len(refused)}: {refused[:3]}; its errors: {errors[-3:]}"
            )
        done = await delivered_at(url, list(fixed.accepted))
        confirm = [done[p] - answered for p, (_, answered) in fixed.accepted.items() if p in done]
        answer = [answered - sent for sent, answered in fixed.accepted.values()]
        payments, wrong = await ledger_checks(url)
        off = await check_meters(targets, await last_numbers(url))
    deliveries = len(closed.accepted) / (drained - loop_started)
    print(f"    delivered to the meters: {deliveries:,.0f}/s (the last one "
          f"{drained - loop_started - closed.seconds:.2f} s after the last answer); CPU of "
          f"hes serve until then {delivery_cpu / max(1, len(closed.accepted)) * 1000:.2f} ms "
          "a payment")  # fmt: skip
    print(f"  at {args.rate:g} payments/s offered for {args.seconds:g} s: {fixed.rate:,.0f}/s "
          f"accepted; answer p50 {percentile(answer, 50) * 1000:.0f} ms, "
          f"p99 {percentile(answer, 99) * 1000:.0f} ms")  # fmt: skip
    print(f"    accepted -> confirmed on the meter: p50 {percentile(confirm, 50) * 1000:.0f} ms, "
          f"p99 {percentile(confirm, 99) * 1000:.0f} ms, max {max(confirm) * 1000:.0f} ms "
          f"({len(confirm):,} of {len(fixed.accepted):,} delivered)")  # fmt: skip
    print(f"  {payments:,} payments stored; {wrong} cached balances off their postings; "
          f"{len(targets) - off} of {len(targets)} meters read back at their last transfer's "
          "number")  # fmt: skip
    if profile is not None:
        print(f"  profile of hes serve: {profile}")
        pstats.Stats(str(profile)).sort_stats("cumulative").print_stats(40)
    return closed.rate, bare.rate


async def last_numbers(url: str) -> dict[str, int]:
    """Each meter's highest transfer number delivered."""
    db = await open_database(url)
    try:
        async with db.read() as session:
            found = await session.execute(
                select(CreditTransfer.meter_id, func.max(CreditTransfer.number))
                .where(CreditTransfer.kind == "transfer", CreditTransfer.state == "delivered")
                .group_by(CreditTransfer.meter_id)
            )
            return {str(m): int(n) for m, n in found}
    finally:
        await db.close()


async def check_meters(targets: Sequence[Target], expected: dict[str, int]) -> int:
    """Meters whose last transfer number (read over Modbus) is not ``expected``."""
    from headend.links.endpoint import LinkOptions
    from headend.services.links import EndpointLinks
    from headend.storage.polling import PollTarget

    links = EndpointLinks(LinkOptions(timeout=5.0, retries=1))
    wrong = 0
    try:
        for port, unit, meter_id in targets:
            target = PollTarget(meter_id, f"tcp://{HOST}:{port}/{unit}", "tcp", "", 900, "")
            snapshot = await (await links.link(target)).read_snapshot()
            if snapshot.last_transfer != expected.get(meter_id, 0):
                if not wrong:
                    print(f"  {meter_id}: last transfer {snapshot.last_transfer}, "
                          f"{expected.get(meter_id, 0)} delivered")  # fmt: skip
                wrong += 1
    finally:
        await links.close()
    return wrong


async def measure(args: argparse.Namespace) -> None:
    dialects = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in dialects and not amr._postgres_answers():
        if args.db == "postgresql":
            raise SystemExit(f"PostgreSQL at {POSTGRES_ADMIN} does not answer")
        print(f"PostgreSQL at {POSTGRES_ADMIN} does not answer: SQLite only")
        dialects.remove("postgresql")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hes-bench-") as workdir:
        for dialect in dialects:
            # a simulator of its own for each database: transfer numbers start at 1
            async with simulator(args.meters, args.per_gateway) as targets:
                await bench(dialect, args, targets, Path(workdir))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-serve":
        baseline_serve(sys.argv[2])
        return
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-meters":
        asyncio.run(amr.serve(int(sys.argv[2]), int(sys.argv[3])))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=200, help="1..1000")
    parser.add_argument("--per-gateway", type=int, default=25, help="meters a listener, 1..247")
    parser.add_argument("--clients", type=int, default=8, help="channels posting at once, 1..64")
    parser.add_argument("--payments", type=int, default=3000, help="closed loop, 1..20000")
    parser.add_argument("--rate", type=float, default=200.0, help="payments/s offered, 1..1000")
    parser.add_argument("--seconds", type=float, default=10.0, help="at that rate, 1..60")
    parser.add_argument("--db", choices=("both", "sqlite", "postgresql"), default="both")
    parser.add_argument(
        "--delivery-wait", type=float, default=120.0,
        help="seconds the deliverer may take to empty its backlog, 1..600",
    )  # fmt: skip
    parser.add_argument("--profile", type=Path, help="cProfile hes serve into this folder")
    args = parser.parse_args()
    if not (
        1 <= args.meters <= 1000
        and 1 <= args.per_gateway <= 247
        and 1 <= args.clients <= 64
        and 1 <= args.payments <= 20_000
        and 1 <= args.rate <= 1000
        and 1 <= args.seconds <= 60
        and 1 <= args.delivery_wait <= 600
    ):
        parser.error("--meters 1..1000, --per-gateway 1..247, --clients 1..64, "
                     "--payments 1..20000, --rate 1..1000, --seconds 1..60, "
                     "--delivery-wait 1..600")  # fmt: skip
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
