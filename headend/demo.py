"""The end-to-end demo: a simulated fleet in its own process, served over Modbus TCP and MQTT,
and the head-end working it over loopback: reading meters, taking a payment exactly once,
switching supply remotely, vending an STS token, and watching a meter run out of credit and come
back after a top-up. Every step checks what it shows; the demo fails loudly when one does not
hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from headend.broker import BrokerPlan, choose_broker
from headend.ingest import Ingest, MemorySink
from headend.links.base import MeterLink, execute_confirmed
from headend.links.endpoint import open_link
from headend.links.mqtt import MqttLinkHub
from headend.links.pool import LinkPool
from headend.vending import vend_credit
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
            plan = await choose_broker(
                options.broker_url, workdir / "broker", meter_ids, secret=password_secret
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
        async with _simulator(fleet_file, plan.settings, workdir, options.timeout) as endpoints:
            reporter.note(
                f"{len(endpoints['meters'])} meters in a separate process at {options.speed:g}x "
                f"real time; Modbus TCP on {endpoints['modbus_tcp']}"
                + (f", MQTT on {endpoints['mqtt']}" if endpoints["mqtt"] else "")
            )
            head_end = _HeadEnd(reporter, result)
            await _steps(head_end, endpoints, plan.settings, options)
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


@contextlib.asynccontextmanager
async def _simulator(
    fleet_file: Path, broker: BrokerSettings | None, workdir: Path, timeout: float
) -> AsyncIterator[dict[str, Any]]:
    """``meter-sim serve`` in a child process; yields its endpoints once it serves."""
    command = [
        sys.executable,
        "-m",
        "cli.meter_sim",
        "serve",
        "--config",
        str(fleet_file),
        "--modbus-port",
        "0",
        "--ready-json",
        "--telemetry-interval",
        "1",
    ]
    if broker is not None:
        command += ["--mqtt", BrokerSettings(broker.host, broker.port).url()]
    log_path = workdir / "simulator.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=log_file, env=dict(os.environ)
        )
        try:
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout)
            except TimeoutError as exc:
                raise DemoFailed(f"the simulator did not start in {timeout:g} s") from exc
            if not line:
                await proc.wait()
                raise DemoFailed(
                    f"the simulator exited ({proc.returncode}): {log_path.read_text()[-2000:]}"
                )
            yield json.loads(line)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 15)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


__all__ = ["DemoFailed", "DemoOptions", "DemoResult", "Reporter", "run_demo"]
