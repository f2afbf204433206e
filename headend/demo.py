"""The end-to-end demo: a simulated fleet in its own process, served over Modbus TCP and MQTT,
and the head-end working it over loopback: reading meters, taking a payment exactly once,
switching supply remotely, vending an STS token, and watching a meter run out of credit and come
back after a top-up. Then the head-end's job: the fleet registered in a fresh store, and
``serve()`` (as `hes serve` runs it: a poller worker with the balance monitor, and an
ingest-only worker) over it for a simulated day on the meters' accelerated clock, while one
meter's line is cut and mended, the simulator restarted and the ingest restarted; the store is
checked at the end. Last, two stories in process: supply control by policy
(:mod:`headend.demo_supply`) and the payments loop from every channel to the meters
(:mod:`headend.demo_payments`). Every step checks what it shows; the demo fails loudly when one
does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from headend.broker import BrokerPlan, choose_broker
from headend.demo_payments import MQTT_METERS, payments_loop
from headend.demo_supply import supply_control
from headend.domain.health import Health
from headend.ingest import Ingest, MemorySink
from headend.links.base import MeterLink, execute_confirmed
from headend.links.endpoint import LinkOptions, open_link
from headend.links.mqtt import MqttLinkHub
from headend.links.pool import LinkPool
from headend.metrics import ServeMetrics
from headend.services.poller import PollPlan
from headend.services.registry import records_from_fleet
from headend.services.serve import ServeSettings, accelerated_clock, clock_limits, serve
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.readings import health_of, last_event_seqs, latest_readings
from headend.storage.registry import import_meters
from headend.storage.views import export, meter_story
from headend.vending import vend_credit
from protocols.clock import AcceleratedClock, Clock
from protocols.commands import Command, CommandEnvelope, CommandResult, ResultCode
from protocols.errors import HesError
from protocols.mqtt import BrokerSettings
from protocols.readings import EventCode, MeterSnapshot
from protocols.sts import KeyData
from protocols.units import decimal_text

log = logging.getLogger(__name__)

AUTH_KEY = "6465 6d6f 2d6b 6579 2d6e 6f74 2d66 6f72 2d70 726f 6475 6374 696f 6e21".replace(" ", "")
VENDING_KEY = "abababababababab"
STS_DRN = "47123456783"
LOW_METER = "LOW-1"
STS_METER = "STS-1"
STATE_DIR = "meters"  # the fleet's saved state, under the work directory

FLEET = """\
# Written by `hes demo`: the simulated fleet of the demo.
[simulation]
speed = {speed}
state_dir = "{state_dir}"
tick_seconds = 0.25

[mqtt]
password_secret = "{password_secret}"

[defaults]
currency = "KES"
initial_credit = 50000
auth_key = "{auth_key}"

[defaults.load]
model = "residential"
mean_watts = 600

[[meters]]
id_prefix = "MTR-"
count = {count}
modbus_unit = 1

[[meters]]
id = "{low}"
modbus_unit = 200
initial_credit = 1500
emergency_credit = 0
friendly_hours = []
friendly_days = []
load = {{ model = "constant", watts = 3000 }}

[[meters]]
id = "{sts}"
modbus_unit = 201
credit_unit = "energy"
initial_credit = 3000
low_credit_threshold = 1000
emergency_credit = 0
sts = {{ vending_key = "{vending_key}", drn = "{drn}", base_date = 2014 }}
"""


class Reporter(Protocol):
    def section(self, title: str) -> None: ...

    def note(self, text: str) -> None: ...

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None: ...


@dataclass(frozen=True, slots=True)
class DemoOptions:
    meters: int = 4
    speed: float = 600.0  # simulated seconds per real second
    broker_url: str | None = None  # None: the default broker if it answers, else a local one
    mqtt: bool = True  # False: Modbus only, no broker
    workdir: Path | None = None  # default: a temporary directory, removed afterwards
    timeout: float = 60.0  # the longest any one step may wait
    hours: float = 24.0  # simulated hours of `hes serve` over the fleet (0: none)
    serve_speed: float = 3600.0  # the simulator's and the head-end's clock meanwhile
    supply: bool = True  # the supply-control story (in process, about half a minute)
    payments: bool = True  # the payments story (in process, about twenty seconds)


@dataclass(slots=True)
class DemoResult:
    checks: list[tuple[str, bool]] = field(default_factory=list)
    mqtt: bool = False

    @property
    def ok(self) -> bool:
        return all(passed for _, passed in self.checks)


class DemoFailed(HesError):
    """The demo could not run (the simulator did not start, a link failed)."""


@dataclass(slots=True)
class _HeadEnd:
    """What the demo's head-end knows: a link per meter and its key."""

    reporter: Reporter
    result: DemoResult
    links: dict[str, MeterLink] = field(default_factory=dict)
    pool: LinkPool = field(default_factory=LinkPool)
    key: bytes = bytes.fromhex(AUTH_KEY)
    confirmed: dict[str, int] = field(default_factory=dict)  # credit confirmed per meter
    first_event: dict[str, int] = field(default_factory=dict)  # last event seq before the run

    def check(self, what: str, passed: bool) -> None:
        self.result.checks.append((what, passed))
        self.reporter.note(f"{'✓' if passed else '✗ FAILED:'} {what}")

    async def command(self, link: MeterLink, command: Command) -> tuple[CommandResult, int]:
        snapshot = await link.read_snapshot()
        sequence = snapshot.last_command_seq + 1
        envelope = CommandEnvelope.signed(link.meter_id, sequence, command, self.key)
        return await execute_confirmed(link, envelope, timeout=10.0), sequence


async def run_demo(options: DemoOptions, reporter: Reporter) -> DemoResult:
    """Run every step; the result lists each check and whether it held."""
    result = DemoResult()
    with contextlib.ExitStack() as cleanup:
        if options.workdir is None:
            workdir = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="hes-demo-")))
        else:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
            if (workdir / STATE_DIR).exists():
                # every run tells the same story from the same start: the previous run's meters
                # (credit spent, top-ups, events) would make its checks about another fleet
                shutil.rmtree(workdir / STATE_DIR)
                reporter.note(f"a fresh fleet: the previous run's meters in {workdir} replaced")
        meter_ids = [f"MTR-{n:04d}" for n in range(1, options.meters + 1)]
        meter_ids += [LOW_METER, STS_METER]
        password_secret = secrets.token_hex(32)  # this run's meters' MQTT passwords

        reporter.section("Broker")
        if options.mqtt:
            provisioned = meter_ids + list(MQTT_METERS if options.payments else ())
            plan = await choose_broker(
                options.broker_url, workdir / "broker", provisioned, secret=password_secret
            )
        else:
            plan = BrokerPlan(None, None, "MQTT switched off: Modbus only")
        cleanup.callback(plan.close)
        reporter.note(plan.note)
        result.mqtt = plan.settings is not None

        reporter.section("Simulator")
        fleet_file = workdir / "fleet.toml"
        fleet_file.write_text(
            FLEET.format(
                speed=options.speed,
                state_dir=workdir / STATE_DIR,
                auth_key=AUTH_KEY,
                count=options.meters,
                low=LOW_METER,
                sts=STS_METER,
                vending_key=VENDING_KEY,
                drn=STS_DRN,
                password_secret=password_secret,
            )
        )
        async with _simulator(fleet_file, plan.settings, workdir, options.timeout) as (
            simulator,
            endpoints,
        ):
            reporter.note(
                f"{len(endpoints['meters'])} meters in a separate process at {options.speed:g}x "
                f"real time; Modbus TCP on {endpoints['modbus_tcp']}"
                + (f", MQTT on {endpoints['mqtt']}" if endpoints["mqtt"] else "")
            )
            head_end = _HeadEnd(reporter, result)
            await _steps(head_end, endpoints, plan.settings, options)
            if options.hours > 0:
                with _log_file(workdir / "hes-serve.log"):
                    await _serve_a_day(head_end, simulator, workdir, plan.settings, options)
        if options.supply:
            with _log_file(workdir / "hes-serve.log"):
                await supply_control(head_end, reporter, workdir)
        if options.payments:
            with _log_file(workdir / "hes-serve.log"):
                await payments_loop(head_end, reporter, workdir, plan.settings, password_secret)
    return result


async def _steps(
    head_end: _HeadEnd,
    endpoints: dict[str, Any],
    broker: BrokerSettings | None,
    options: DemoOptions,
) -> None:
    reporter = head_end.reporter
    host_port = endpoints["modbus_tcp"]
    for meter_id, unit in endpoints["meters"].items():
        head_end.links[meter_id] = await open_link(f"tcp://{host_port}/{unit}", pool=head_end.pool)
    switched = f"MTR-{options.meters:04d}"  # the last ordinary meter
    try:
        await _read_fleet(head_end)
        await _pay_once(head_end)
        if broker is None:
            reporter.note("no MQTT broker: every step runs over Modbus")
            await _switch(head_end, head_end.links[switched], "Modbus")
            await _token(head_end, head_end.links[STS_METER], "Modbus")
            await _run_out(head_end, None, options)
            await _reconcile(head_end)
            return
        sink = MemorySink()
        run = secrets.token_hex(4)  # this run's own sessions on a broker that may be shared
        async with (
            Ingest(broker, sink, client_id=f"hes-demo-ingest-{run}") as ingest,
            MqttLinkHub(broker, client_id=f"hes-demo-links-{run}") as hub,
        ):
            await _switch(head_end, hub.link(switched, timeout=10.0), "MQTT")
            await _token(head_end, hub.link(STS_METER, timeout=10.0), "MQTT")
            await _run_out(head_end, sink, options)
            await sink.wait_until(lambda s: len(s.latest) == len(endpoints["meters"]), 30.0)
            stats = ingest.stats
            reporter.table(
                "MQTT ingest",
                ["telemetry", "events", "duplicates", "malformed", "meters reporting"],
                [
                    [
                        str(stats.telemetry),
                        str(stats.events),
                        str(stats.duplicates),
                        str(stats.malformed),
                        str(len(sink.latest)),
                    ]
                ],
            )
            head_end.check("every meter's telemetry reached the head-end", len(sink.latest) > 0)
        await _reconcile(head_end)
    finally:
        for link in head_end.links.values():
            await link.close()
        await head_end.pool.close()


def _money(snapshot: MeterSnapshot, amount: int) -> str:
    if snapshot.credit_unit == 1:
        return f"{decimal_text(amount, -3)} kWh"
    return f"{decimal_text(amount, snapshot.currency_scale)} {snapshot.currency}"


async def _read_fleet(head_end: _HeadEnd) -> None:
    head_end.reporter.section("Automated meter reading over Modbus TCP")
    rows = []
    for meter_id, link in head_end.links.items():
        snap = await link.read_snapshot()
        head_end.first_event[meter_id] = snap.last_event_seq
        rows.append(
            [
                meter_id,
                decimal_text(snap.energy_import_wh, -3),
                str(snap.power_w),
                _money(snap, snap.credit),
                snap.control_state.name.lower().replace("_", " "),
            ]
        )
    head_end.reporter.table("fleet", ["meter", "energy kWh", "power W", "credit", "relay"], rows)
    head_end.check("every meter answered", len(rows) == len(head_end.links))


async def _pay_once(head_end: _HeadEnd) -> None:
    head_end.reporter.section("A payment lands exactly once (Modbus)")
    link = head_end.links["MTR-0001"]
    before = await link.read_snapshot()
    transfer = before.last_transfer + 1
    amount = 25_000
    credit = Command.credit_transfer(transfer, amount)
    first, sequence = await head_end.command(link, credit)
    say = head_end.reporter.note
    say(f"transfer {transfer} of {_money(before, amount)}: {first.code.name.lower()}")
    envelope = CommandEnvelope.signed(link.meter_id, sequence, credit, head_end.key)
    resent = await execute_confirmed(link, envelope, timeout=10.0)
    say(f"the same command resent (its answer was lost): {resent.code.name.lower()} again")
    retry, _ = await head_end.command(link, credit)
    say(f"the payment retried as a new command: {retry.code.name.lower()}")
    stale = await execute_confirmed(link, envelope, timeout=10.0)
    say(f"the first command replayed after that: {stale.code.name.lower()}")
    forged = CommandEnvelope.signed(
        link.meter_id, sequence + 10, Command.credit_transfer(transfer + 1, 10**6), b"wrong key"
    )
    refused = await execute_confirmed(link, forged, timeout=10.0)
    say(f"a command with a forged tag: {refused.code.name.lower()}")
    events = await link.read_events(before.last_event_seq, 100)
    accepted = [e for e in events if e.code is EventCode.TOPUP_ACCEPTED]
    head_end.confirmed["MTR-0001"] = amount if first.code is ResultCode.OK else 0
    check = head_end.check
    check("the first transfer was applied", first.code is ResultCode.OK)
    check("the resent command got the first answer back", resent == first)
    check("the retried payment was acknowledged as a duplicate", retry.code is ResultCode.DUPLICATE)
    check("the late replay was refused", stale.code is ResultCode.REPLAYED)
    check("the forged command was refused", refused.code is ResultCode.AUTH_FAILED)
    check("the meter logged exactly one accepted top-up", [e.a for e in accepted] == [transfer])


async def _switch(head_end: _HeadEnd, link: MeterLink, transport: str) -> None:
    head_end.reporter.section(f"Remote disconnect and reconnect ({transport})")
    off, _ = await head_end.command(link, Command.remote_disconnect())
    after_off = await link.read_snapshot()
    head_end.reporter.note(
        f"disconnect: {off.code.name.lower()}, relay {after_off.control_state.name.lower()}"
    )
    on, _ = await head_end.command(link, Command.remote_reconnect())
    after_on = await link.read_snapshot()
    head_end.reporter.note(
        f"reconnect: {on.code.name.lower()}, relay {after_on.control_state.name.lower()} "
        f"(control mode {after_on.control_mode}: the customer's button closes the relay)"
    )
    head_end.check("remote disconnect opened the relay", not after_off.relay_closed)
    head_end.check(
        "remote reconnect armed the relay for the customer",
        on.code is ResultCode.OK and after_on.control_state.name == "READY_FOR_RECONNECTION",
    )


async def _token(head_end: _HeadEnd, link: MeterLink, transport: str) -> None:
    head_end.reporter.section(f"An STS token for a keypad meter ({transport})")
    before = await link.read_snapshot()
    key = KeyData.create(VENDING_KEY, STS_DRN, base_date=2014)
    issued_at = datetime.fromtimestamp(before.time, UTC)
    token = vend_credit(key, 5000, issued_at)
    head_end.reporter.note(f"vended 5.0 kWh: {token.digits} (TID {token.tid})")
    first, _ = await head_end.command(link, Command.enter_token(token.digits))
    again, _ = await head_end.command(link, Command.enter_token(token.digits))
    after = await link.read_snapshot()
    head_end.reporter.note(
        f"entered: {first.code.name.lower()}; entered again: {again.code.name.lower()} "
        f"({again.detail}); credit {_money(before, before.credit)} -> "
        f"{_money(after, after.credit)}"
    )
    head_end.check("the token was accepted", first.code is ResultCode.OK)
    head_end.check("the same token was refused the second time", not again.code.accepted)
    head_end.check(
        "the token added 5 kWh once (less what the meter used meanwhile)",
        0 < after.credit - before.credit <= 5000,
    )


async def _run_out(head_end: _HeadEnd, sink: MemorySink | None, options: DemoOptions) -> None:
    head_end.reporter.section("Credit runs out, the relay opens, a top-up restores supply")
    link = head_end.links[LOW_METER]
    start = await link.read_snapshot()
    head_end.reporter.note(
        f"{LOW_METER} draws 3 kW with {_money(start, start.credit)} of credit and no friendly hours"
    )
    deadline = time.monotonic() + options.timeout
    snap = start
    while snap.relay_closed and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        snap = await link.read_snapshot()
    head_end.check("the meter disconnected itself when credit ran out", not snap.relay_closed)
    events = await link.read_events(start.last_event_seq, 100)
    head_end.reporter.table(
        f"{LOW_METER} events",
        ["seq", "event", "a", "b"],
        [[str(e.seq), e.code.name.lower(), str(e.a), str(e.b)] for e in events],
    )
    if sink is not None:
        await sink.wait_until(
            lambda s: any(
                m.meter_id == LOW_METER and m.event.code is EventCode.CREDIT_EXHAUSTED
                for m in s.event_messages
            ),
            options.timeout,
        )
        head_end.check("the head-end heard 'credit exhausted' over MQTT", True)
    top_up, _ = await head_end.command(
        link, Command.credit_transfer(snap.last_transfer + 1, 20_000)
    )
    head_end.confirmed[LOW_METER] = 20_000 if top_up.accepted else 0
    after = await link.read_snapshot()
    head_end.reporter.note(
        f"top-up of {_money(after, 20_000)}: {top_up.code.name.lower()}; debt repaid, relay "
        f"{after.control_state.name.lower()}"
    )
    head_end.check("the top-up reconnected supply (control mode 6)", after.relay_closed)


async def _reconcile(head_end: _HeadEnd) -> None:
    head_end.reporter.section("Reconciliation: confirmed money = credit the meters received")
    rows = []
    for meter_id, confirmed in head_end.confirmed.items():
        since = head_end.first_event.get(meter_id, 0)  # this run's events only
        events = await head_end.links[meter_id].read_events(since, 1000)
        received = sum(e.b for e in events if e.code is EventCode.TOPUP_ACCEPTED)
        rows.append([meter_id, str(confirmed), str(received)])
        head_end.check(
            f"{meter_id}: confirmed {confirmed} = received {received}", confirmed == received
        )
    head_end.reporter.table("ledger", ["meter", "confirmed (minor units)", "received"], rows)


# -- the head-end's job: a simulated day of `hes serve` over the fleet ---------------------------

FLAKY_METER = "MTR-0001"  # reached over a line the demo cuts for a while
POLL_INTERVAL = 900.0  # simulated seconds between two reads of a meter


class _Line:
    """A TCP line from the head-end to the simulator's Modbus port that the demo can cut. While
    it is down nothing answers on its port (connections are refused, those open are dropped);
    the meter behind it goes on living and recording its load profile."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                far_reader, far_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                return  # the simulator is restarting: the head-end sees a dropped line
            self._writers |= {writer, far_writer}
            try:
                await asyncio.gather(_pipe(reader, far_writer), _pipe(far_reader, writer))
            finally:
                self._writers.discard(far_writer)
                far_writer.close()
        finally:
            self._writers.discard(writer)
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def close(self) -> None:
        await self.cut()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass  # the other end went away: the line is down
    finally:
        writer.close()


class _Worker:
    """One `hes serve` loop in this process (``serve()``, as `hes serve` runs it)."""

    def __init__(self, name: str, settings: ServeSettings, clock: Clock) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self.runs: list[ServeMetrics] = []  # the metrics of each run, once it stopped
        self._task: asyncio.Task[ServeMetrics] | None = None
        self._stop = asyncio.Event()

    async def start(self, timeout: float) -> None:
        self._stop = asyncio.Event()
        ready = asyncio.Event()
        self._task = asyncio.create_task(
            serve(self.settings, self.clock, self._stop, lambda _: ready.set()),
            name=f"hes serve ({self.name})",
        )
        waiting = asyncio.create_task(ready.wait())
        try:
            await asyncio.wait(
                {self._task, waiting}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
        self.raise_if_failed()
        if not ready.is_set():
            await self.close()
            raise DemoFailed(f"hes serve ({self.name}) did not start in {timeout:g} s")

    def raise_if_failed(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()  # the loop's own error, if it failed
            raise DemoFailed(f"hes serve ({self.name}) stopped by itself")

    async def finish(self) -> None:
        """Stop as SIGTERM stops `hes serve`: no new work, the writes in flight finish."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            self.runs.append(await task)

    async def close(self) -> None:
        """Stop, whatever state the loop is in (the demo is ending on an error)."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            await asyncio.gather(task, return_exceptions=True)

    def count(self, name: str, labels: dict[str, str]) -> int:
        """A counter summed over this worker's finished runs."""
        return sum(int(m.registry.get_sample_value(name, labels) or 0) for m in self.runs)


async def _until(
    condition: Callable[[], Awaitable[bool]], timeout: float, workers: Sequence[_Worker]
) -> bool:
    """Wait until ``condition`` holds (True) or ``timeout`` passes (False); a head-end loop
    that fails meanwhile ends the demo with its error."""
    deadline = time.monotonic() + timeout
    while True:
        for worker in workers:
            worker.raise_if_failed()
        if await condition():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


def _why(reason: str) -> str:
    """A health change's reason without the error's detail (the endpoint and the error)."""
    return reason.partition(": ")[0]


def _short(text: str, width: int = 44) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """The head-end loops' log lines go to ``path`` meanwhile, so the demo's own stay readable
    (a cut line makes the poller warn, as it should)."""
    logger = logging.getLogger("headend")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()


def _when(clock_time: float) -> str:
    return datetime.fromtimestamp(clock_time, UTC).strftime("%Y-%m-%d %H:%M")


async def _register(
    head_end: _HeadEnd, db: Database, fleet_file: Path, modbus_tcp: str, line: _Line
) -> list[str]:
    """`hes db upgrade` and `hes meters import --from-fleet`, through the calls they make."""
    say = head_end.reporter.note
    before, after = await db.upgrade()
    say(f"hes db upgrade: {db.shown_url}: schema {before or 'empty'} -> {after}")
    base = f"tcp://{modbus_tcp}"
    rows, refused = records_from_fleet(fleet_file, base)
    relayed = dict(records_from_fleet(fleet_file, f"tcp://127.0.0.1:{line.port}")[0])
    rows = [
        (number, relayed[number] if record.meter_id == FLAKY_METER else record)
        for number, record in rows
    ]
    report = await import_meters(db, rows, refused, datetime.now(UTC), actor="hes demo")
    say(
        f"hes meters import --from-fleet {fleet_file.name} --endpoint-base {base}: "
        f"{len(report.added)} meters registered, {len(report.refused)} refused; {FLAKY_METER} "
        f"is reached over a line the demo can cut (tcp://127.0.0.1:{line.port})"
    )
    head_end.check(
        "the fleet file's meters were registered in a fresh store",
        report.applied and not report.refused and len(report.added) == len(rows),
    )
    return [record.meter_id for _, record in rows]


async def _fleet_clock(modbus_tcp: str, unit: int, speed: float) -> AcceleratedClock:
    """The head-end's clock on the simulator's, as `hes serve --clock-speed S --clock-start T
    --clock-at R` sets it: T is a meter's clock, read at the real moment R."""
    pool = LinkPool()
    try:
        link = await open_link(f"tcp://{modbus_tcp}/{unit}", pool=pool)
        try:
            snapshot = await link.read_snapshot()
            read_at = time.time()
        finally:
            await link.close()
    finally:
        await pool.close()
    return accelerated_clock(
        speed,
        datetime.fromtimestamp(snapshot.time, UTC),
        datetime.fromtimestamp(read_at, UTC),
    )


async def _meters_now(modbus_tcp: str, units: dict[str, int]) -> dict[str, MeterSnapshot]:
    """Every meter's snapshot, read straight from the simulator (what the meters say)."""
    pool = LinkPool()
    snapshots: dict[str, MeterSnapshot] = {}
    try:
        for meter_id, unit in units.items():
            link = await open_link(f"tcp://{modbus_tcp}/{unit}", pool=pool)
            try:
                snapshots[meter_id] = await link.read_snapshot()
            finally:
                await link.close()
    finally:
        await pool.close()
    return snapshots


async def _health(db: Database, meter_id: str) -> Health:
    async with db.read() as session:
        return (await health_of(session, meter_id)).health


async def _latest_times(db: Database, meter_ids: Sequence[str]) -> dict[str, int]:
    """Each meter's latest stored reading's meter time."""
    async with db.read() as session:
        latest = await latest_readings(session, meter_ids)
    return {meter_id: previous.meter_time for meter_id, previous in latest.items()}


async def _event_seqs(db: Database, meter_ids: Sequence[str]) -> dict[str, int]:
    async with db.read() as session:
        return await last_event_seqs(session, meter_ids)


def _holes(intervals: Sequence[Any]) -> list[tuple[int, int]]:
    """Where consecutive intervals do not meet: (end of one, start of the next)."""
    return [
        (a.start + a.period, b.start)
        for a, b in itertools.pairwise(intervals)
        if b.start != a.start + a.period
    ]


@dataclass(slots=True)
class _Day:
    """What the simulated day's steps share."""

    head_end: _HeadEnd
    db: Database
    simulator: _Simulator
    line: _Line
    clock: Clock
    options: DemoOptions
    meter_ids: list[str]
    modbus_port: int
    units: dict[str, int]  # meter id -> Modbus unit id
    poller: _Worker
    ingest: _Worker | None
    started: float = 0.0
    end: float = 0.0

    @property
    def workers(self) -> list[_Worker]:
        return [w for w in (self.poller, self.ingest) if w is not None]


async def _serve_a_day(
    head_end: _HeadEnd,
    simulator: _Simulator,
    workdir: Path,
    broker: BrokerSettings | None,
    options: DemoOptions,
) -> None:
    reporter = head_end.reporter
    check = head_end.check
    speed = options.serve_speed
    reporter.section(f"The head-end's job: {options.hours:g} simulated hours of hes serve")
    await simulator.stop()
    endpoints = await simulator.start(speed)
    modbus_tcp: str = endpoints["modbus_tcp"]
    host, _, port = modbus_tcp.rpartition(":")
    reporter.note(
        f"the simulator restarted at {speed:g}x real time (an hour every {3600 / speed:g} s); "
        "the meters go on from their saved state"
    )
    db_path = workdir / "hes.db"
    for name in ("hes.db", "hes.db-wal", "hes.db-shm", "hes.db-journal"):
        (workdir / name).unlink(missing_ok=True)  # each run registers the fleet afresh
    db = await open_database(f"sqlite:///{db_path}", check=False)
    line = _Line(host, int(port))
    workers: list[_Worker] = []
    try:
        await line.start()
        meter_ids = await _register(head_end, db, simulator.fleet_file, modbus_tcp, line)
        units: dict[str, int] = endpoints["meters"]
        clock = await _fleet_clock(modbus_tcp, units[meter_ids[0]], speed)
        run = secrets.token_hex(4)  # this run's own workers and sessions
        plan = PollPlan(
            interval=POLL_INTERVAL,
            read_deadline=5.0,
            attempts=2,
            retry_base=0.2,
            retry_cap=0.5,
            lease=15.0,
            limits=clock_limits(speed),
        )
        poller = _Worker(
            "poller",
            ServeSettings(
                db_url=db.url,
                plan=plan,
                worker=f"demo-poller-{run}",
                link_options=LinkOptions(timeout=2.0, retries=0),
                housekeeping=0.5,
                monitor_every=2.0,
            ),
            clock,
        )
        ingest = None
        if broker is not None:
            ingest = _Worker(
                "ingest",
                ServeSettings(
                    db_url=db.url,
                    plan=plan,
                    worker=f"demo-ingest-{run}",
                    broker=broker,
                    group=f"demo-{run}",
                    housekeeping=0.5,
                    monitor_every=None,
                    poll=False,
                    dispatch=None,
                ),
                clock,
            )
        day = _Day(
            head_end,
            db,
            simulator,
            line,
            clock,
            options,
            meter_ids,
            int(port),
            units,
            poller,
            ingest,
        )
        workers = day.workers
        for worker in workers:
            await worker.start(options.timeout)
        started = day.started = clock.now()
        end = day.end = started + options.hours * 3600
        reporter.note(
            f"{_when(started)}: hes serve on the meters' clock at {speed:g}x: the poller reads "
            f"each meter every {POLL_INTERVAL / 60:g} simulated minutes and backfills its load "
            "profile, the balance monitor runs"
            + (", and an ingest worker stores what the meters push over MQTT" if ingest else "")
        )
        await _outage(day)
        await _restarts(day)
        remaining = max(0.0, end - clock.now()) / speed

        async def day_done() -> bool:
            latest = await _latest_times(db, meter_ids)
            return len(latest) == len(meter_ids) and min(latest.values()) >= end

        finished = await _until(day_done, remaining * 2 + options.timeout, workers)
        for worker in reversed(workers):
            await worker.finish()
        reporter.note(f"{_when(clock.now())}: hes serve stopped (as on SIGTERM)")
        check(f"the head-end served the fleet for {options.hours:g} simulated hours", finished)
        await _day_report(day)
    finally:
        for worker in reversed(workers):
            await worker.close()
        await line.close()
        await db.close()


async def _outage(day: _Day) -> None:
    head_end, db, clock, line, options = day.head_end, day.db, day.clock, day.line, day.options
    workers, started, end = day.workers, day.started, day.end
    reporter, check = head_end.reporter, head_end.check

    async def reached(moment: float) -> bool:
        return clock.now() >= moment

    await _until(lambda: reached(started + (end - started) / 6), options.timeout * 2, workers)
    if await _health(db, FLAKY_METER) is not Health.ONLINE:
        await _until(lambda: _is(db, FLAKY_METER, Health.ONLINE), options.timeout, workers)
    cut_at = clock.now()
    await line.cut()
    reporter.note(
        f"{_when(cut_at)}: the line to {FLAKY_METER} is cut; the meter goes on recording"
        + (" (its MQTT agent, on another path, goes on pushing telemetry)" if day.ingest else "")
    )
    unreachable = await _until(
        lambda: _is(db, FLAKY_METER, Health.UNREACHABLE), options.timeout, workers
    )
    mended_at = clock.now()
    await line.start()
    reporter.note(
        f"{_when(mended_at)}: {FLAKY_METER} is "
        f"{'marked unreachable' if unreachable else 'still not unreachable'}; the line is mended"
    )

    async def backfilled() -> bool:  # a poll read it after the line was mended
        if await _health(db, FLAKY_METER) is not Health.ONLINE:
            return False
        since = await export(db, FLAKY_METER, int(mended_at), 2**62, include_estimated=False)
        return any(r.source == "poll" for r in since.readings)

    back = await _until(backfilled, options.timeout, workers)
    now = datetime.fromtimestamp(clock.now(), UTC)
    story = await meter_story(db, FLAKY_METER, now)
    window = await export(
        db, FLAKY_METER, int(cut_at) - 3600, int(mended_at), include_estimated=True
    )
    during = [i for i in window.intervals if cut_at <= i.start < mended_at - i.period]
    estimated = sum(i.estimated for i in window.intervals)
    reporter.note(
        f"{_when(clock.now())}: {FLAKY_METER} read again: {len(during)} intervals of the "
        f"{(mended_at - cut_at) / 3600:.1f} hours it was away backfilled"
        + (f" ({estimated} estimated)" if estimated else "")
    )
    changes = list(reversed(story.health_changes))
    reporter.table(
        f"{FLAKY_METER} health changes",
        ["at", "from", "to", "why"],
        [[_when(c.at.timestamp())[5:], c.old, c.new, _short(_why(c.reason))] for c in changes],
    )
    check(f"{FLAKY_METER} was marked unreachable while its line was down", unreachable)
    news = [c.new for c in changes]
    returned = "unreachable" in news and "online" in news[news.index("unreachable") :]
    check("its health changes were stored: unreachable, then online when it came back", returned)
    expected = int((mended_at - cut_at) // POLL_INTERVAL) - 1
    check(
        f"it was backfilled on its return: {len(during)} intervals of the outage, "
        "contiguous, none estimated",
        back and not _holes(window.intervals) and not estimated and len(during) >= expected,
    )


async def _is(db: Database, meter_id: str, health: Health) -> bool:
    return await _health(db, meter_id) is health


async def _restarts(day: _Day) -> None:
    head_end, db, clock, options, ingest = day.head_end, day.db, day.clock, day.options, day.ingest
    simulator, workers, meter_ids = day.simulator, day.workers, day.meter_ids
    reporter, check = head_end.reporter, head_end.check
    if ingest is not None:
        await ingest.finish()
        reporter.note(
            f"{_when(clock.now())}: the ingest stopped; its MQTT session stays, and the broker "
            "keeps what the meters push meanwhile"
        )
    await simulator.stop()
    endpoints = await simulator.start(options.serve_speed, day.modbus_port)
    modbus_tcp: str = endpoints["modbus_tcp"]
    rebooted = await _meters_now(modbus_tcp, endpoints["meters"])
    behind = clock.now() - min(snapshot.time for snapshot in rebooted.values())
    reporter.note(
        f"{_when(clock.now())}: the simulator restarted: every meter rebooted from its saved "
        "state and logged a power-down and a power-up; their clocks stood still while they "
        f"were off and now run {behind / 3600:.1f} h behind the head-end's (within its "
        "clock tolerance)"
    )

    async def restart_events_stored() -> bool:
        stored = await _event_seqs(db, meter_ids)
        return all(stored.get(m, 0) >= s.last_event_seq for m, s in rebooted.items())

    stored = await _until(restart_events_stored, options.timeout, workers)
    check("the poller read every meter after its restart and stored its events", stored)
    if ingest is None:
        reporter.note("no MQTT broker: no ingest to restart")
        return
    # a payment lands while the ingest is away: the meter logs it, the poller reads it, and
    # the broker still holds the agent's message of it for the ingest
    pool = LinkPool()
    try:
        link = await open_link(f"tcp://{modbus_tcp}/{endpoints['meters'][LOW_METER]}", pool=pool)
        try:
            before = await link.read_snapshot()
            top_up, _ = await head_end.command(
                link, Command.credit_transfer(before.last_transfer + 1, 20_000)
            )
            after = await link.read_snapshot()
        finally:
            await link.close()
    finally:
        await pool.close()
    reporter.note(
        f"{_when(clock.now())}: {LOW_METER} topped up while the ingest is away: "
        f"{top_up.code.name.lower()}"
    )

    async def top_up_read() -> bool:
        stored = await _event_seqs(db, [LOW_METER])
        return stored.get(LOW_METER, 0) >= after.last_event_seq

    read = await _until(top_up_read, options.timeout, workers)
    await ingest.start(options.timeout)
    back_at = {m: s.time for m, s in (await _meters_now(modbus_tcp, endpoints["meters"])).items()}

    async def caught_up() -> bool:  # the backlog is in: telemetry from after the ingest's return
        for meter_id, since in back_at.items():
            found = await export(db, meter_id, since, 2**62, include_estimated=False)
            if not any(r.source == "mqtt" for r in found.readings):
                return False
        return True

    delivered = await _until(caught_up, options.timeout, workers)
    reporter.note(
        f"{_when(clock.now())}: the ingest started again and took the broker's backlog"
        + ("" if delivered else " (not all of it in time)")
    )
    check(
        f"{LOW_METER}'s top-up was read by the poller before the ingest came back",
        top_up.code is ResultCode.OK and read,
    )


async def _day_report(day: _Day) -> None:
    head_end, db, meter_ids, started = day.head_end, day.db, day.meter_ids, day.started
    poller, ingest = day.poller, day.ingest
    reporter, check = head_end.reporter, head_end.check
    reporter.section("What the store holds after the day")
    rows = []
    contiguous = True
    covered = True
    last_polls: dict[str, int] = {}  # meter -> the meter time of its last poll
    now = datetime.now(UTC)
    for meter_id in meter_ids:
        stored = await export(db, meter_id, 0, 2**62, include_estimated=True)
        intervals = stored.intervals
        holes = _holes(intervals)
        estimated = sum(i.estimated for i in intervals)
        polled = [r.meter_time for r in stored.readings if r.source == "poll"]
        last_read = last_polls[meter_id] = polled[-1] if polled else 0
        # the day is covered: from before the serve started to the last poll's last interval
        complete = (
            bool(intervals)
            and intervals[0].start <= started
            and intervals[-1].start + 2 * intervals[-1].period > last_read
        )
        contiguous &= not holes
        covered &= complete
        story = await meter_story(db, meter_id, now)
        sources = Counter(r.source for r in stored.readings)
        span = (intervals[-1].start + intervals[-1].period - intervals[0].start) if intervals else 0
        rows.append(
            [
                meter_id,
                str(len(intervals)),
                f"{span / 3600:.1f} h",
                str(len(holes)),
                str(estimated),
                f"{sources['poll']} / {sources['mqtt']}",
                story.health.health if story.health is not None else "unknown",
            ]
        )
    reporter.table(
        "per meter (estimated: intervals the meter never recorded, as it was off while it "
        "restarted)",
        ["meter", "intervals", "span", "holes", "estimated", "readings poll/mqtt", "health"],
        rows,
    )
    check("every meter has contiguous intervals for the whole period (no hole)", contiguous)
    check("every meter's intervals run from before the serve to its last poll", covered)
    polls = {o: poller.count("hes_polls_total", {"outcome": o}) for o in ("read", "failed")}
    stored_rows = {
        t: poller.count("hes_rows_stored_total", {"table": t})
        for t in ("readings", "intervals", "events")
    }
    poll_repeats = poller.count("hes_duplicates_total", {"source": "poll"})
    mqtt_repeats = ingest.count("hes_duplicates_total", {"source": "mqtt"}) if ingest else 0
    ingest_repeats = (
        ingest.count("hes_ingest_messages_total", {"outcome": "duplicates"}) if ingest else 0
    )
    telemetry = ingest.count("hes_ingest_messages_total", {"outcome": "telemetry"}) if ingest else 0
    reporter.table(
        "hes serve's counters",
        ["metric", "value"],
        [
            ["hes_polls_total read / failed", f"{polls['read']} / {polls['failed']}"],
            [
                "hes_rows_stored_total readings / intervals / events",
                f"{stored_rows['readings']} / {stored_rows['intervals']} / {stored_rows['events']}",
            ],
            ["hes_ingest_messages_total{outcome=telemetry}", str(telemetry)],
            ["hes_duplicates_total{source=poll}: repeats not stored", str(poll_repeats)],
            ["hes_duplicates_total{source=mqtt}: repeats not stored", str(mqtt_repeats)],
            ["hes_ingest_messages_total{outcome=duplicates}: redeliveries", str(ingest_repeats)],
        ],
    )
    if ingest is not None:
        check(
            f"the restarts stored nothing twice: {poll_repeats + mqtt_repeats + ingest_repeats} "
            "repeats seen and not stored",
            mqtt_repeats >= 1 and contiguous,
        )
    # what the meters logged, read from them now, against what the store holds
    modbus_tcp = f"127.0.0.1:{day.modbus_port}"
    pool = LinkPool()
    as_logged = True
    try:
        for meter_id in meter_ids:
            story = await meter_story(db, meter_id, now)
            kept = sorted((e.seq, e.code) for e in story.events)
            last = kept[-1][0] if kept else 0
            link = await open_link(f"tcp://{modbus_tcp}/{day.units[meter_id]}", pool=pool)
            try:
                logged = await link.read_events(max(0, last - 10), 100)
            finally:
                await link.close()
            earlier = [(e.seq, int(e.code)) for e in logged if e.seq <= last]
            # the meters live on after the head-end stopped: what they logged since is not lost
            later = [e for e in logged if e.seq > last]
            as_logged &= bool(kept) and earlier[-len(kept) :] == kept
            as_logged &= all(e.time >= last_polls[meter_id] for e in later)
    finally:
        await pool.close()
    check(
        "every meter's events are stored as it logged them, once each (its latest ten compared)",
        as_logged,
    )
    verification = await verify_chain(db)
    reporter.note(
        f"hes audit verify: {verification.entries} entries, "
        + ("intact" if verification.broken is None else f"broken: {verification.broken.why}")
    )
    check(
        "the audit chain verifies",
        verification.broken is None and verification.entries > 0,
    )


class _Simulator:
    """``meter-sim serve`` in a child process, started again when the demo restarts it."""

    def __init__(
        self, fleet_file: Path, broker: BrokerSettings | None, workdir: Path, timeout: float
    ) -> None:
        self.fleet_file = fleet_file
        self.broker = broker
        self.log_path = workdir / "simulator.log"
        self.timeout = timeout
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, speed: float | None = None, modbus_port: int = 0) -> dict[str, Any]:
        """Start serving; returns the endpoints once the simulator serves them."""
        command = [
            sys.executable,
            "-m",
            "cli.meter_sim",
            "serve",
            "--config",
            str(self.fleet_file),
            "--modbus-port",
            str(modbus_port),
            "--ready-json",
            "--telemetry-interval",
            "1",
        ]
        if speed is not None:
            command += ["--speed", f"{speed:g}"]
        if self.broker is not None:
            command += ["--mqtt", BrokerSettings(self.broker.host, self.broker.port).url()]
        with self.log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=log_file, env=dict(os.environ)
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), self.timeout)
        except TimeoutError as exc:
            await self.stop()
            raise DemoFailed(f"the simulator did not start in {self.timeout:g} s") from exc
        if not line:
            await self.proc.wait()
            raise DemoFailed(
                f"the simulator exited ({self.proc.returncode}): "
                f"{self.log_path.read_text()[-2000:]}"
            )
        endpoints: dict[str, Any] = json.loads(line)
        return endpoints

    async def stop(self) -> None:
        """SIGTERM: the meters save their state and their agents say goodbye."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _simulator(
    fleet_file: Path, broker: BrokerSettings | None, workdir: Path, timeout: float
) -> AsyncIterator[tuple[_Simulator, dict[str, Any]]]:
    """The simulator started; stopped however the demo ends."""
    simulator = _Simulator(fleet_file, broker, workdir, timeout)
    try:
        yield simulator, await simulator.start()
    finally:
        await simulator.stop()


__all__ = ["DemoFailed", "DemoOptions", "DemoResult", "Reporter", "run_demo"]
