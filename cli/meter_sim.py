"""`meter-sim`: the prepaid meter simulator's command-line interface."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import tomli_w
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.common import (
    OneLineErrors,
    console,
    fail,
    handle_errors,
    jsonable,
    parse_duration,
    print_json,
    setup_logging,
)
from cli.meter_sim_rig import rig_app
from meter_sim.config import (
    MAX_AMOUNT,
    FleetConfig,
    MeterConfig,
    default_fleet,
    faults_from_text,
    fleet_from_mapping,
    load_fleet,
    new_password_secret,
)
from meter_sim.console import serve_console
from meter_sim.describe import (
    amount_text,
    conservation,
    event_dict,
    event_text,
    iso_time,
    snapshot_rows,
    status_names,
)
from meter_sim.firmware import Integration
from meter_sim.fleet import Fleet, resume_time
from meter_sim.lock import StateDirLock
from meter_sim.runtime import MeterRuntime
from meter_sim.serve import (
    Endpoints,
    SerialLine,
    ServeOptions,
    mqtt_password_secret,
    serve_fleet,
)
from meter_sim.simulate import run_batch
from protocols import registermap
from protocols.clock import AcceleratedClock, ManualClock
from protocols.cosem import CreditUnit
from protocols.errors import ConfigError, ValidationError
from protocols.mqtt import DEFAULT_PREFIX, BrokerSettings, TopicScheme
from protocols.units import decimal_text

T = TypeVar("T")

app = typer.Typer(
    name="meter-sim",
    help="Simulated prepaid electricity meters.",
    no_args_is_help=True,
    add_completion=False,
    cls=OneLineErrors,
)

DEFAULT_CONFIG = Path("meter-sim.toml")
ConfigOption = typer.Option(
    DEFAULT_CONFIG,
    "--config",
    "-c",
    help="Fleet file (TOML). Without one, three meters with every default.",
)
StateDirOption = typer.Option(
    None, "--state-dir", help="Where meters keep their state (default: simulation.state_dir)."
)
JsonOption = typer.Option(False, "--json", help="Print JSON instead of a table.")
IntegrationOption: Any = typer.Option(
    "events",
    "--integration",
    help="events: integrate whole runs of steps between the moments where something can "
    "change; fixed: one step at a time. Both give the same energy, credit and events.",
)
MIN_SPEED, MAX_SPEED = 0.001, 1e9


def _speed_option(help_text: str) -> Any:
    return typer.Option(None, "--speed", min=MIN_SPEED, max=MAX_SPEED, help=help_text)


CreditUnitChoice = Literal["money", "energy"]
ParityChoice = Literal["N", "E", "O"]


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More logging (-vv: debug)."
    ),
) -> None:
    setup_logging(verbose)


def _option(name: str, parse: Callable[[], T]) -> T:
    """``parse()``, its refusal named by the option it came from."""
    try:
        return parse()
    except (ConfigError, ValidationError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def _fleet_config(path: Path) -> FleetConfig:
    if path == DEFAULT_CONFIG and not path.exists():
        # no secret a broker could know: serving MQTT asks for a fleet file (meter-sim init)
        return replace(default_fleet(), mqtt_password_secret=None)
    return load_fleet(path)


def _state_dir(config: FleetConfig, state_dir: Path | None) -> Path:
    directory = state_dir if state_dir is not None else Path(config.simulation.state_dir)
    if directory.exists() and not directory.is_dir():
        where = "--state-dir" if state_dir is not None else "simulation.state_dir"
        raise ConfigError(f"{where} {directory}: not a directory")
    return directory


def _meter(config: FleetConfig, meter_id: str | None) -> MeterConfig:
    if meter_id is None:
        if not config.meters:
            raise ConfigError("the fleet file has no meters")
        return config.meters[0]
    for meter in config.meters:
        if meter.meter_id == meter_id:
            return meter
    raise ConfigError(f"no meter {meter_id!r} in the fleet file")


# -- init -----------------------------------------------------------------------------------------


@app.command()
@handle_errors
def init(
    path: Path = typer.Argument(DEFAULT_CONFIG, help="Where to write the fleet file."),
    count: int = typer.Option(3, "--count", "-n", min=1, max=100_000, help="How many meters."),
    credit_unit: CreditUnitChoice = typer.Option(
        "money", help="money (minor currency units) or energy (Wh)."
    ),
    currency: str = typer.Option("KES", help="ISO 4217 currency of monetary accounts."),
    initial_credit: int = typer.Option(
        20_000, min=0, max=MAX_AMOUNT, help="Credit each meter starts with."
    ),
    speed: float = typer.Option(
        60.0, min=MIN_SPEED, max=MAX_SPEED, help="Simulated seconds per real second."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a fleet file with sensible defaults (every key documented in docs/configuration.md)."""
    if path.exists() and not force:
        raise fail(f"{path} exists (use --force to overwrite)")
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise fail(f"--currency is a 3-letter ISO 4217 code such as KES, got {currency!r}")
    document: dict[str, Any] = {
        "simulation": {"speed": speed, "state_dir": "var/meters", "tick_seconds": 1.0},
        "defaults": {
            "credit_unit": credit_unit,
            "currency": currency,
            "initial_credit": initial_credit,
            "load": {"model": "residential", "mean_watts": 450},
        },
        "meters": [{"id_prefix": "MTR-", "count": count, "modbus_unit": 1}],
        "mqtt": {"password_secret": new_password_secret()},
    }
    fleet_from_mapping(document)  # refuse to write what could not be read back
    path.write_text(tomli_w.dumps(document))
    console.print(f"wrote {path}: {count} meter(s); keep its [mqtt] password_secret private")


# -- run ------------------------------------------------------------------------------------------


@app.command()
@handle_errors
def run(
    config_path: Path = ConfigOption,
    duration: str | None = typer.Option(
        None, "--for", help="Stop after this much simulated time (e.g. 30d, 12h)."
    ),
    speed: float | None = _speed_option("Simulated seconds per real second."),
    batch: bool = typer.Option(
        False, "--batch", help="Run --for as fast as possible instead of at --speed."
    ),
    integration: Integration = IntegrationOption,
    state_dir: Path | None = StateDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Run the fleet under the accelerated clock (on a terminal, a live view of the simulated
    time and every meter, refreshed each second); print every meter at the end."""
    config = _fleet_config(config_path)
    directory = _state_dir(config, state_dir)
    seconds = parse_duration(duration, "--for") if duration is not None else None
    if batch and seconds is None:
        raise fail("--batch needs --for")
    with StateDirLock(directory):
        start = resume_time(config, directory)
        if batch:
            assert seconds is not None
            clock = ManualClock(start)
            fleet = Fleet.from_config(config, clock, directory, integration)
            run_batch(fleet, clock, seconds)
        else:
            sim_speed = config.simulation.speed if speed is None else speed
            accelerated = AcceleratedClock(sim_speed, start)
            fleet = Fleet.from_config(config, accelerated, directory, integration)
            real_seconds = None if seconds is None else seconds / sim_speed
            asyncio.run(_run_realtime(fleet, real_seconds, None if as_json else console))
    _print_fleet(fleet, as_json)


#: at most this many meters are shown one per row in the live view; more are summed up
LIVE_ROWS = 20


def live_view(fleet: Fleet) -> Table:
    """What ``meter-sim run`` shows on a terminal while the fleet runs: the simulated time and
    each meter's energy, credit and relay (or fleet totals for a large fleet)."""
    snapshots = [runtime.meter.snapshot() for runtime in fleet.runtimes.values()]
    title = (
        f"{iso_time(int(fleet.clock.now()))} simulated, {len(snapshots)} meter(s) (Ctrl-C stops)"
    )
    table = Table(title=title)
    if len(snapshots) <= LIVE_ROWS:
        for column in ("meter", "energy kWh", "power W", "credit", "relay"):
            table.add_column(column)
        for snap in snapshots:
            table.add_row(
                snap.meter_id,
                decimal_text(snap.energy_import_wh, -3),
                str(snap.power_w),
                amount_text(snap, snap.credit),
                snap.control_state.name.lower().replace("_", " "),
            )
        return table
    for column in ("meters", "energy kWh", "power W", "credit", "relay"):
        table.add_column(column)
    credit: dict[tuple[CreditUnit, str, int], int] = {}
    for snap in snapshots:
        unit = (snap.credit_unit, snap.currency, snap.currency_scale)
        credit[unit] = credit.get(unit, 0) + snap.credit
    relays = Counter(snap.control_state.name.lower().replace("_", " ") for snap in snapshots)
    samples = {(s.credit_unit, s.currency, s.currency_scale): s for s in snapshots}
    table.add_row(
        str(len(snapshots)),
        decimal_text(sum(snap.energy_import_wh for snap in snapshots), -3),
        str(sum(snap.power_w for snap in snapshots)),
        ", ".join(amount_text(samples[unit], total) for unit, total in credit.items()),
        ", ".join(f"{count} {state}" for state, count in sorted(relays.items())),
    )
    return table


async def _run_realtime(
    fleet: Fleet, real_seconds: float | None, terminal: Console | None = None
) -> None:
    """Run ``fleet`` until Ctrl-C or for ``real_seconds``; with a ``terminal`` console that is
    a terminal, show :func:`live_view` refreshed once a second meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if real_seconds is not None:
        loop.call_later(real_seconds, stop.set)
    try:
        if terminal is None or not terminal.is_terminal:
            await fleet.run(stop)
            return
        with Live(live_view(fleet), console=terminal, auto_refresh=False, transient=True) as live:
            running = asyncio.create_task(fleet.run(stop))
            while not running.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(running), 1.0)
                live.update(live_view(fleet), refresh=True)
            await running
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_fleet(fleet: Fleet, as_json: bool) -> None:
    snapshots = [runtime.meter.snapshot() for runtime in fleet.runtimes.values()]
    if as_json:
        print_json([_snapshot_json(s) for s in snapshots])
        return
    table = Table(title=f"{len(snapshots)} meter(s)")
    for column in ("meter", "energy kWh", "power W", "credit", "debt", "relay", "status"):
        table.add_column(column)
    for snap in snapshots:
        rows = dict(snapshot_rows(snap))
        table.add_row(
            snap.meter_id,
            rows["energy import"].removesuffix(" kWh"),
            str(snap.power_w),
            rows["credit"],
            rows["debt"],
            rows["relay"],
            rows["status"],
        )
    console.print(table)


def _snapshot_json(snapshot: Any) -> dict[str, Any]:
    data: dict[str, Any] = jsonable(snapshot)
    data["control_state"] = snapshot.control_state.name.lower()
    data["status"] = status_names(snapshot.status)
    return data


# -- inspecting and operating a stopped meter -----------------------------------------------


def _open_stopped(config_path: Path, meter_id: str | None, state_dir: Path | None) -> MeterRuntime:
    config = _fleet_config(config_path)
    return MeterRuntime.open_stopped(_meter(config, meter_id), _state_dir(config, state_dir))


@contextlib.contextmanager
def _locked(config_path: Path, state_dir: Path | None) -> Any:
    config = _fleet_config(config_path)
    with StateDirLock(_state_dir(config, state_dir)):
        yield


@app.command()
@handle_errors
def show(
    meter_ids: list[str] = typer.Argument(None, help="Meters to show (default: all)."),
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
    events: int = typer.Option(
        5, min=0, max=100_000, help="How many recent events to list per meter."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Registers, credit, relay state and recent events of stopped meters, as last saved."""
    config = _fleet_config(config_path)
    ids = meter_ids or [m.meter_id for m in config.meters]
    directory = _state_dir(config, state_dir)
    runtimes = [MeterRuntime.open_stopped(_meter(config, i), directory) for i in ids]
    if as_json:
        out = []
        for runtime in runtimes:
            data = _snapshot_json(runtime.meter.snapshot())
            data["events"] = [event_dict(e) for e in _recent(runtime, events)]
            expected, net = conservation(runtime.meter)
            data["conservation_ok"] = expected == net
            out.append(data)
        print_json(out)
        return
    for runtime in runtimes:
        snap = runtime.meter.snapshot()
        table = Table(title=f"meter {snap.meter_id}", show_header=False)
        table.add_column("what")
        table.add_column("value")
        for label, value in snapshot_rows(snap):
            table.add_row(label, value)
        console.print(table)
        recent = _recent(runtime, events)
        if recent:
            _print_events(recent)


def _recent(runtime: MeterRuntime, count: int) -> list[Any]:
    """The last ``count`` events of a meter (none for 0)."""
    events = runtime.meter.events_since(0, 10**9)
    return events[len(events) - count :] if count else []


def _print_events(events: list[Any]) -> None:
    table = Table()
    for column in ("seq", "time", "event", "detail"):
        table.add_column(column)
    for event in events:
        data = event_dict(event)
        table.add_row(str(event.seq), iso_time(event.time), data["code"], event_text(event))
    console.print(table)


@app.command("events")
@handle_errors
def events_cmd(
    meter_id: str = typer.Argument(..., help="The meter."),
    since: int = typer.Option(0, min=0, max=2**32 - 1, help="Events after this sequence number."),
    limit: int = typer.Option(100, min=1, max=100_000, help="At most this many."),
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
    as_json: bool = JsonOption,
) -> None:
    """A stopped meter's event log."""
    runtime = _open_stopped(config_path, meter_id, state_dir)
    events = runtime.meter.events_since(since, limit)
    if as_json:
        print_json([event_dict(e) for e in events])
    else:
        _print_events(events)


@app.command()
@handle_errors
def token(
    entry: str = typer.Argument(..., help="The 20-digit token, as typed on the keypad."),
    meter_id: str | None = typer.Option(None, "--meter", "-m", help="Default: the first meter."),
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
    as_json: bool = JsonOption,
) -> None:
    """Type an STS token on a stopped meter's keypad."""
    with _locked(config_path, state_dir):
        runtime = _open_stopped(config_path, meter_id, state_dir)
        outcome = runtime.enter_token(entry.replace(" ", "").replace("-", ""))
    if as_json:
        print_json(
            {
                "result": outcome.result.name.lower(),
                "status": outcome.status.name.lower(),
                "reason": outcome.reason,
                "detail": outcome.detail,
            }
        )
    else:
        console.print(
            f"{runtime.meter_id}: {outcome.status.name.lower()} ({outcome.result.name.lower()})"
            + (f": {outcome.detail}" if outcome.detail else "")
        )
    if not outcome.result.accepted:
        raise typer.Exit(1)


@app.command()
@handle_errors
def button(
    meter_id: str | None = typer.Option(None, "--meter", "-m", help="Default: the first meter."),
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
) -> None:
    """Press a stopped meter's button (reconnect from ready-for-reconnection)."""
    with _locked(config_path, state_dir):
        runtime = _open_stopped(config_path, meter_id, state_dir)
        result = runtime.press_button()
    console.print(f"{runtime.meter_id}: {result.name.lower()}")
    if not result.accepted:
        raise typer.Exit(1)


@app.command("console")
@handle_errors
def console_cmd(
    meter_id: str | None = typer.Argument(None, help="Default: the first meter."),
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
    speed: float | None = _speed_option("Clock speed (default: simulation.speed)."),
) -> None:
    """A meter's service console on stdin/stdout: one command per line, one JSON answer per line
    (topup TRANSFER AMOUNT | token DIGITS | button | tamper | show | events [SINCE] | quit)."""
    config = _fleet_config(config_path)
    directory = _state_dir(config, state_dir)
    meter = _meter(config, meter_id)
    with StateDirLock(directory):
        clock = AcceleratedClock(
            config.simulation.speed if speed is None else speed, resume_time(config, directory)
        )
        runtime = MeterRuntime.open(meter, clock, directory, config.simulation.step_seconds)
        sys.stdout.write('{"ready": true}\n')
        sys.stdout.flush()
        serve_console(runtime, sys.stdin, sys.stdout)
        runtime.save()


@app.command()
@handle_errors
def serve(
    config_path: Path = ConfigOption,
    state_dir: Path | None = StateDirOption,
    speed: float | None = _speed_option("Simulated seconds per real second."),
    modbus_host: str = typer.Option("127.0.0.1", help="Address the Modbus TCP listeners bind."),
    modbus_port: int = typer.Option(
        5020,
        min=0,
        max=65535,
        help="Modbus TCP port of the first gateway (up to 247 meters by unit id; the next "
        "gateways on the next ports unless the fleet file gives theirs; 0: free ports).",
    ),
    no_modbus_tcp: bool = typer.Option(False, "--no-modbus-tcp", help="No Modbus TCP gateways."),
    port_per_meter: int | None = typer.Option(
        None,
        min=0,
        max=65535,
        help="Also one listener per meter from this port (0: free ports).",
    ),
    serial: list[str] = typer.Option(
        [], "--serial", help="Modbus RTU on this serial device or pyserial URL (repeatable)."
    ),
    baud: int = typer.Option(9600, min=50, max=4_000_000, help="Serial baud rate."),
    parity: ParityChoice = typer.Option("N", help="Serial parity: N, E or O."),
    stopbits: int = typer.Option(1, min=1, max=2, help="Serial stop bits: 1 or 2."),
    pace: bool = typer.Option(False, "--pace", help="Answer at the pace of a real serial line."),
    strict_gaps: bool = typer.Option(
        False,
        "--strict-gaps",
        help="Discard a serial frame with a gap of more than 1.5 characters inside it.",
    ),
    response_delay: float = typer.Option(
        0.0, min=0.0, max=60.0, help="Seconds each meter waits before a serial answer."
    ),
    mqtt: str | None = typer.Option(
        None,
        help="MQTT broker URL (mqtt://host:port, mqtts://...?ca=FILE); meters log in as "
        "themselves.",
    ),
    mqtt_prefix: str = typer.Option(DEFAULT_PREFIX, help="MQTT topic prefix."),
    telemetry_interval: float = typer.Option(
        60.0, min=0.1, max=86400.0, help="Real seconds between telemetry messages."
    ),
    faults: str | None = typer.Option(
        None,
        "--faults",
        help="Faults every meter injects into its Modbus TCP and MQTT answers, instead of the "
        "fleet file's: key=value items of a [faults] table, e.g. "
        '"drop=0.05,delay=uniform:0.1:0.5,lose_ack=0.1,disconnect=0.01,corrupt=0.02" '
        "(docs/configuration.md#faults).",
    ),
    faults_seed: int | None = typer.Option(
        None,
        "--faults-seed",
        min=0,
        max=2**63 - 1,
        help="Seed of every meter's fault draws (instead of the file's or --faults' seed): "
        "the same requests meet the same faults.",
    ),
    integration: Integration = IntegrationOption,
    ready_json: bool = typer.Option(
        False,
        "--ready-json",
        help="Print one JSON line with the endpoints once serving: each gateway's name, host, "
        "port and meters with their unit ids (docs/register-map.md#addressing-a-fleet), the "
        "meters' faults, and the simulated time then with the clock's speed and the "
        'integration ("simulation": {"time", "speed", "integration"}); and one line with the '
        "faults injected when serving ends.",
    ),
) -> None:
    """Run the fleet and serve it over Modbus TCP, Modbus RTU and MQTT until Ctrl-C."""
    config = _fleet_config(config_path)
    directory = _state_dir(config, state_dir)
    if port_per_meter and port_per_meter + len(config.meters) - 1 > 65535:
        raise fail(
            f"--port-per-meter {port_per_meter}: {len(config.meters)} meters need ports up to "
            f"{port_per_meter + len(config.meters) - 1}, past 65535"
        )
    options = ServeOptions(
        modbus_host=modbus_host,
        modbus_port=None if no_modbus_tcp else modbus_port,
        port_per_meter=port_per_meter,
        serial=tuple(
            SerialLine(url, baud, parity, stopbits, pace, strict_gaps, response_delay)
            for url in serial
        ),
        broker=_option("--mqtt", lambda: BrokerSettings.parse_url(mqtt)) if mqtt else None,
        mqtt_prefix=_option("--mqtt-prefix", lambda: TopicScheme(mqtt_prefix).prefix),
        telemetry_interval=telemetry_interval,
        faults=_option("--faults", lambda: faults_from_text(faults)) if faults else None,
        faults_seed=faults_seed,
    )
    if options.broker is not None:
        mqtt_password_secret(config)  # refused before any meter is opened
    served: list[Endpoints] = []

    def ready(endpoints: Endpoints) -> None:
        served.append(endpoints)
        if ready_json:
            sys.stdout.write(json.dumps(endpoints.as_dict()) + "\n")
            sys.stdout.flush()
            return
        where = []
        if len(endpoints.gateways) == 1:
            where.append(f"Modbus TCP {endpoints.modbus_tcp}")
        elif endpoints.gateways:
            first, last = endpoints.gateways[0], endpoints.gateways[-1]
            where.append(
                f"Modbus TCP {len(endpoints.gateways)} gateways, {first.name} on "
                f"{endpoints.modbus_tcp} .. {last.name} on {last.host}:{last.port}"
            )
        where += [f"Modbus RTU {url}" for url in endpoints.serial]
        if endpoints.modbus_ports:
            where.append(f"{len(endpoints.modbus_ports)} per-meter Modbus ports")
        if endpoints.mqtt:
            where.append(f"MQTT {endpoints.mqtt}")
        console.print(
            f"serving {len(endpoints.meters)} meter(s): {'; '.join(where)} (Ctrl-C stops)"
        )

    with StateDirLock(directory):
        sim_speed = config.simulation.speed if speed is None else speed
        fleet = Fleet.from_config(
            config,
            AcceleratedClock(sim_speed, resume_time(config, directory)),
            directory,
            integration,
            save=False,  # the first save runs once serving: answering does not wait for it
        )
        try:
            asyncio.run(_serve(fleet, options, ready))
        finally:
            if ready_json and served and served[0].faults:
                summary = {"stopped": True, "faults": served[0].faults.as_dict()}
                sys.stdout.write(json.dumps(summary) + "\n")
                sys.stdout.flush()


async def _serve(fleet: Fleet, options: ServeOptions, ready: Callable[[Endpoints], None]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve_fleet(fleet, options, stop, ready)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@app.command("register-map")
def register_map(as_json: bool = JsonOption) -> None:
    """The Modbus register map: every value's table, address, type, scaler, unit and OBIS code
    (the same table docs/register-map.md is generated from)."""
    rows = registermap.table_as_json()
    if as_json:
        print_json(rows)
        return
    table = Table(title="Modbus register map (docs/register-map.md)")
    columns = ["name", "table", "address", "registers", "type", "scaler", "unit", "access", "obis"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[column]) if row[column] is not None else "" for column in columns))
    console.print(table)


# sub-apps

app.add_typer(rig_app, name="rig")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
