from __future__ import annotations

import asyncio
import io
import json
from dataclasses import replace
from pathlib import Path

import aiomqtt
import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from cli.meter_sim import LIVE_ROWS, _run_realtime, app, live_view
from meter_sim.config import default_fleet, load_fleet, new_password_secret
from meter_sim.fleet import Fleet
from meter_sim.lock import StateDirLock
from meter_sim.serve import ServeOptions, serve_fleet
from protocols.clock import ManualClock
from protocols.errors import ConfigError
from protocols.mqtt import BrokerSettings, TopicScheme, meter_password
from protocols.units import decimal_text
from tests.mqtt_broker import BrokerFactory

runner = CliRunner()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_init_run_show_events(workdir: Path) -> None:
    result = runner.invoke(app, ["init", "-n", "2", "--initial-credit", "5000"])
    assert result.exit_code == 0, result.output
    assert (workdir / "meter-sim.toml").exists()
    again = runner.invoke(app, ["init"])
    assert again.exit_code == 1
    assert "exists" in again.output

    result = runner.invoke(app, ["run", "--for", "2d", "--batch", "--json"])
    assert result.exit_code == 0, result.output
    meters = json.loads(result.output)
    assert [m["meter_id"] for m in meters] == ["MTR-0001", "MTR-0002"]
    assert all(m["energy_import_wh"] > 0 for m in meters)
    for meter in meters:
        assert sum(meter["energy_rates_wh"]) == meter["energy_import_wh"]

    result = runner.invoke(app, ["show", "MTR-0001", "--json"])
    assert result.exit_code == 0, result.output
    (shown,) = json.loads(result.output)
    assert shown["energy_import_wh"] == meters[0]["energy_import_wh"]
    assert shown["conservation_ok"] is True

    result = runner.invoke(app, ["show", "MTR-0002"])
    assert result.exit_code == 0
    assert "energy import" in result.output

    result = runner.invoke(app, ["events", "MTR-0001", "--json"])
    assert result.exit_code == 0
    codes = [e["code"] for e in json.loads(result.output)]
    assert "low_credit" in codes
    assert "credit_exhausted" in codes


def test_a_batch_run_is_the_same_with_either_integration(workdir: Path) -> None:
    fleet = (
        '[simulation]\nstart = 1767225600.5\nstate_dir = "var/{way}"\n'
        "[defaults]\ninitial_credit = 3000\n[[meters]]\ncount = 3\n"
    )
    printed = {}
    for way in ("fixed", "events"):
        (workdir / f"{way}.toml").write_text(fleet.format(way=way))
        args = ["run", "-c", f"{way}.toml", "--for", "1d", "--batch", "--json"]
        result = runner.invoke(app, [*args, "--integration", way])
        assert result.exit_code == 0, result.output
        printed[way] = json.loads(result.output)
        events = runner.invoke(app, ["events", "-c", f"{way}.toml", "MTR-0001", "--json"])
        assert events.exit_code == 0, events.output
        printed[f"{way} events"] = json.loads(events.output)
    assert printed["events"] == printed["fixed"]
    assert printed["events events"] == printed["fixed events"]
    assert any(e["code"] == "credit_exhausted" for e in printed["events events"])
    refused = runner.invoke(app, ["run", "-c", "events.toml", "--for", "1h", "--batch",
                                  "--integration", "exact"])  # fmt: skip
    assert refused.exit_code == 2
    assert "--integration" in refused.output


def test_errors_are_one_line_and_exit_1(workdir: Path) -> None:
    result = runner.invoke(app, ["show", "MTR-0001"])
    assert result.exit_code == 1
    assert "has no state" in result.output

    (workdir / "bad.toml").write_text("[[meters]]\nid = 'X'\ncolour = 'red'\n")
    result = runner.invoke(app, ["run", "-c", "bad.toml", "--for", "1h", "--batch"])
    assert result.exit_code == 1
    assert "unknown key" in result.output

    result = runner.invoke(app, ["run", "--batch"])
    assert result.exit_code == 1
    assert "--batch needs --for" in result.output

    result = runner.invoke(app, ["run", "--for", "soon", "--batch"])
    assert result.exit_code == 2


def test_offline_commands_refuse_a_running_fleet(workdir: Path) -> None:
    assert runner.invoke(app, ["run", "--for", "1h", "--batch"]).exit_code == 0
    with StateDirLock(workdir / "var" / "meters"):
        result = runner.invoke(app, ["button", "-m", "MTR-0001"])
    assert result.exit_code == 1
    assert "in use by process" in result.output


def test_button_needs_credit(workdir: Path) -> None:
    (workdir / "fleet.toml").write_text(
        "[[meters]]\nid = 'B-1'\ninitial_credit = 10\nfriendly_hours = []\nfriendly_days = []\n"
        "load = { model = 'constant', watts = 2000 }\n"
    )
    assert runner.invoke(app, ["run", "-c", "fleet.toml", "--for", "2h", "--batch"]).exit_code == 0
    result = runner.invoke(app, ["button", "-c", "fleet.toml"])
    assert result.exit_code == 1
    assert "refused_by_state" in result.output


@pytest.mark.parametrize("speed", ["0", "-5"])
def test_a_speed_that_is_not_positive_is_refused(workdir: Path, speed: str) -> None:
    result = runner.invoke(app, ["run", "--for", "1h", "--speed", speed])
    assert result.exit_code == 2
    assert "--speed" in result.output
    assert not (workdir / "var" / "meters" / "MTR-0001.json").exists()


def test_init_writes_a_fresh_mqtt_password_secret(workdir: Path) -> None:
    assert runner.invoke(app, ["init", "one.toml"]).exit_code == 0
    assert runner.invoke(app, ["init", "two.toml"]).exit_code == 0
    secrets = [load_fleet(workdir / name).mqtt_password_secret for name in ("one.toml", "two.toml")]
    assert all(s is not None and len(s) == 64 for s in secrets)
    assert secrets[0] != secrets[1]


def test_serving_mqtt_without_a_secret_is_refused(workdir: Path) -> None:
    (workdir / "fleet.toml").write_text("[[meters]]\nid = 'A'\n[[meters]]\nid = 'B'\n")
    for config in (["-c", "fleet.toml"], []):
        result = runner.invoke(app, ["serve", *config, "--mqtt", "mqtt://127.0.0.1:1"])
        assert result.exit_code == 1, result.output
        (line,) = result.output.strip().splitlines()
        assert "have no mqtt_password" in line
        assert "password_secret" in line
    assert not (workdir / "var").exists(), "nothing was opened"


@pytest.mark.mqtt
async def test_served_meters_log_in_with_passwords_from_the_fleet_secret(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    secret = new_password_secret()
    config = replace(default_fleet(2), mqtt_password_secret=secret)
    ids = [meter.meter_id for meter in config.meters]
    broker = broker_factory({m: meter_password(m, None, secret) for m in ids})
    fleet = Fleet.from_config(config, ManualClock(), tmp_path / "state")
    options = ServeOptions(modbus_port=None, broker=BrokerSettings(broker.host, broker.port))
    stop = asyncio.Event()
    topics = TopicScheme()
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username="hes",
        password=broker.headend_password,
        identifier="hes-secret-test",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{topics.base}/+/state", qos=1)
        serving = asyncio.create_task(serve_fleet(fleet, options, stop))
        online: set[str] = set()
        try:
            async with asyncio.timeout(15):
                async for message in client.messages:
                    if b"online" in bytes(message.payload):  # type: ignore[arg-type]
                        online.add(message.topic.value.split("/")[-2])
                    if online == set(ids):
                        break
        finally:
            stop.set()
            await serving
    assert online == set(ids)


def _rendered(table: Table) -> str:
    out = Console(file=io.StringIO(), width=160, record=True)
    out.print(table)
    return out.export_text()


def test_the_live_view_shows_time_energy_credit_and_relay(tmp_path: Path) -> None:
    clock = ManualClock(1_767_225_600.0)
    fleet = Fleet.from_config(default_fleet(2, initial_credit=12_345), clock, tmp_path)
    clock.advance(7200)
    fleet.sync_all()
    text = _rendered(live_view(fleet))
    assert "2026-01-01 02:00:00 simulated, 2 meter(s)" in text
    for meter_id, runtime in fleet.runtimes.items():
        snap = runtime.meter.snapshot()
        row = next(line for line in text.splitlines() if meter_id in line)
        assert decimal_text(snap.energy_import_wh, -3) in row
        assert f"{decimal_text(snap.credit, -2)} KES" in row
        assert "connected" in row


def test_a_large_fleet_is_summed_up_in_the_live_view(tmp_path: Path) -> None:
    config = default_fleet(LIVE_ROWS + 1, initial_credit=100)
    fleet = Fleet.from_config(config, ManualClock(), tmp_path)
    text = _rendered(live_view(fleet))
    assert "MTR-0001" not in text
    assert f"{LIVE_ROWS + 1} connected" in text
    assert f"{(LIVE_ROWS + 1) * 100 // 100}.{(LIVE_ROWS + 1) * 100 % 100:02d} KES" in text


@pytest.mark.parametrize("terminal", [True, False])
async def test_the_live_view_appears_only_on_a_terminal(tmp_path: Path, terminal: bool) -> None:
    out = io.StringIO()
    screen = Console(file=out, force_terminal=terminal, width=120)
    fleet = Fleet.from_config(default_fleet(1), ManualClock(), tmp_path)
    await _run_realtime(fleet, 0.05, screen)
    assert ("simulated, 1 meter(s)" in out.getvalue()) is terminal
    if not terminal:
        assert out.getvalue() == ""


def test_run_prints_no_live_view_when_stdout_is_not_a_terminal(workdir: Path) -> None:
    result = runner.invoke(app, ["run", "--for", "1h", "--speed", "36000"])
    assert result.exit_code == 0, result.output
    assert "simulated" not in result.output
    assert "3 meter(s)" in result.output


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_serve_options_refuse_a_telemetry_flood(interval: float) -> None:
    with pytest.raises(ConfigError, match="telemetry interval"):
        ServeOptions(telemetry_interval=interval)
