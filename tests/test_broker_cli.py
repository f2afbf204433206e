"""`hes broker config` and `hes broker run`: a secured Mosquitto for a fleet, written by one
command and run by another, with meters and the head-end logging in over TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.hes import app
from headend.broker import (
    LocalBroker,
    choose_broker,
    configured_listeners,
    free_port,
    meter_passwords,
    probe,
)
from headend.links.mqtt import MqttLinkHub
from meter_sim.mqtt_agent import AgentOptions, MeterAgent
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.errors import ConfigError
from protocols.mqtt import BrokerSettings, TopicScheme, meter_password
from tests.mqtt_broker import TEST_KEY, RuntimeFactory

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parent.parent
M1, M2 = "MTR-0001", "MTR-0002"
EXPLICIT = "an-explicit-password"
SECRET = "5e" * 32
FLEET = f"""
[mqtt]
password_secret = "{SECRET}"

[[meters]]
id = "{M1}"

[[meters]]
id = "{M2}"
mqtt_password = "{EXPLICIT}"
"""
OPTIONS = AgentOptions(
    telemetry_interval=60, backoff_initial=0.05, backoff_max=0.2, meter_secret=SECRET
)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    return path


def _config(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["broker", "config", *args])
    return result.exit_code, result.stdout, result.stderr


@asynccontextmanager
async def _running(
    directory: Path, stop: signal.Signals = signal.SIGTERM
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`hes broker run DIRECTORY` as a child process, once it says it listens; stopped with
    ``stop`` (SIGTERM, or SIGINT as Ctrl-C sends) afterwards, which must end it cleanly."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.hes",
        "broker",
        "run",
        str(directory),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"mosquitto listening on "), line
        yield process
        process.send_signal(stop)
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_tls_only_broker_serves_meters_and_the_head_end(
    tmp_path: Path, fleet: Path, make_runtime: RuntimeFactory, mosquitto_path: Path
) -> None:
    directory = tmp_path / "broker"
    tls_port = free_port()
    code, stdout, stderr = _config(
        "--fleet", str(fleet), "--out", str(directory), "--tls", "--tls-port", str(tls_port)
    )
    assert (code, stderr) == (0, "")
    headend_file = directory / "headend.url"
    assert str(headend_file) in stdout
    assert (headend_file.stat().st_mode & 0o777) == 0o600
    headend = BrokerSettings.parse_url(headend_file.read_text().strip())
    assert (headend.tls, headend.port, headend.username) == (True, tls_port, "hes")
    assert headend.password is not None
    derived = meter_password(M1, None, SECRET)
    for secret in (headend.password, derived, EXPLICIT):
        assert secret not in stdout  # no password on the terminal unless asked
    assert configured_listeners(directory) == [("127.0.0.1", tls_port)]  # plain is closed
    ca = directory / "tls" / "ca.pem"
    assert f"meter-sim serve --mqtt 'mqtts://127.0.0.1:{tls_port}?ca={ca}'" in stdout

    runtimes = [make_runtime(M1), make_runtime(M2, mqtt_password=EXPLICIT)]
    key = bytes.fromhex(TEST_KEY)
    async with _running(directory):
        plain = BrokerSettings(headend.host, tls_port, "hes", headend.password)
        assert not (await probe(plain)).answered  # plain MQTT is refused
        agents = [MeterAgent(rt, headend, TopicScheme(), OPTIONS) for rt in runtimes]
        tasks = [asyncio.create_task(agent.run()) for agent in agents]
        try:
            for agent in agents:
                await asyncio.wait_for(agent.connected.wait(), 10)
            async with MqttLinkHub(headend) as hub:
                assert (await hub.link(M1).read_snapshot()).meter_id == M1
                envelope = CommandEnvelope.signed(M2, 1, Command.credit_transfer(1, 250), key)
                assert (await hub.link(M2).execute(envelope, 10)).code is ResultCode.OK
        finally:
            for agent in agents:
                agent.stop()
            await asyncio.gather(*tasks)
    assert runtimes[1].snapshot().last_transfer == 1


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
async def test_keep_plain_keeps_both_listeners(
    tmp_path: Path, fleet: Path, mosquitto_path: Path, stop: signal.Signals
) -> None:
    directory = tmp_path / "broker"
    port, tls_port = free_port(), free_port()
    code, stdout, _ = _config(
        "--fleet", str(fleet), "--out", str(directory), "--tls", "--keep-plain",
        "--port", str(port), "--tls-port", str(tls_port), "--show-meter-passwords",
    )  # fmt: skip
    assert code == 0
    assert f"{M2} {EXPLICIT}" in stdout.splitlines()  # asked for
    headend = BrokerSettings.parse_url((directory / "headend.url").read_text().strip())
    assert headend.port == tls_port
    async with _running(directory, stop):
        assert (await probe(headend)).accepted
        plain = BrokerSettings(headend.host, port, "hes", headend.password)
        assert (await probe(plain)).accepted
        meter = plain.login(M2, EXPLICIT)
        assert (await probe(meter, client_id=M2)).accepted
        assert not (await probe(meter, client_id=M1)).accepted  # its own client id only


def test_a_plain_broker_and_its_security_file(tmp_path: Path, fleet: Path) -> None:
    directory = tmp_path / "broker"
    port = free_port()
    code, _, _ = _config("--fleet", str(fleet), "--out", str(directory), "--port", str(port))
    assert code == 0
    assert configured_listeners(directory) == [("127.0.0.1", port)]
    assert not (directory / "tls").exists()
    security = json.loads((directory / "dynamic-security.json").read_text())
    clients = {c["username"]: c for c in security["clients"]}
    assert set(clients) == {M1, M2, "hes"}
    assert (clients[M1]["clientid"], clients[M2]["clientid"]) == (M1, M2)
    assert "clientid" not in clients["hes"]
    assert (directory / "dynamic-security.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep-plain"], "--keep-plain only applies with --tls"),
        (["--port", "70000"], "--port is a TCP port"),
        (["--tls", "--tls-port", "0"], "--tls-port is a TCP port"),
        (["--tls", "--port", "1884"], "with --tls it is closed"),
        (["--tls", "--keep-plain", "--port", "8883"], "cannot share port 8883"),
        (["--days", "0"], "--days is at least 1"),
    ],
)
def test_bad_options_get_one_line_and_write_nothing(
    tmp_path: Path, fleet: Path, args: list[str], message: str
) -> None:
    directory = tmp_path / "broker"
    code, stdout, stderr = _config("--fleet", str(fleet), "--out", str(directory), *args)
    assert code != 0
    assert stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert message in stderr
    assert "Traceback" not in stderr
    assert not directory.exists()


def test_a_configuration_is_not_replaced_unless_forced(tmp_path: Path, fleet: Path) -> None:
    directory = tmp_path / "broker"
    args = ["--fleet", str(fleet), "--out", str(directory), "--port", str(free_port())]
    assert _config(*args)[0] == 0
    first = (directory / "headend.url").read_text()
    code, _, stderr = _config(*args)
    assert code != 0
    assert "--force" in stderr
    assert (directory / "headend.url").read_text() == first
    assert _config(*args, "--force")[0] == 0
    assert (directory / "headend.url").read_text() != first  # a new head-end password


def test_a_fleet_without_meters_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("[simulation]\n")
    code, _, stderr = _config("--fleet", str(empty), "--out", str(tmp_path / "broker"))
    assert code != 0
    assert "no meters" in stderr


def test_a_fleet_without_a_password_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET.replace(f'password_secret = "{SECRET}"', ""))
    code, _, stderr = _config("--fleet", str(path), "--out", str(tmp_path / "broker"))
    assert code == 1
    assert "need [mqtt] password_secret" in stderr
    assert not (tmp_path / "broker").exists()


def test_run_without_a_configuration_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["broker", "run", str(tmp_path / "nothing")])
    assert result.exit_code != 0
    assert "hes broker config" in result.stderr
    assert "Traceback" not in result.stderr


def test_meter_passwords_explicit_wins_else_derived_from_the_secret() -> None:
    passwords = meter_passwords({M1: None, M2: EXPLICIT}, "fleet-secret")
    assert passwords == {M1: meter_password(M1, None, "fleet-secret"), M2: EXPLICIT}
    assert passwords[M1] != meter_passwords([M1], "another-secret")[M1]


def _required(function: object, name: str) -> bool:
    parameter = inspect.signature(function).parameters[name]  # type: ignore[arg-type]
    return parameter.default is inspect.Parameter.empty


def _required_field(cls: type, name: str) -> bool:
    (found,) = [f for f in dataclasses.fields(cls) if f.name == name]
    return found.default is dataclasses.MISSING and found.default_factory is dataclasses.MISSING


async def test_no_code_path_derives_a_password_without_a_secret(
    tmp_path: Path, make_runtime: RuntimeFactory
) -> None:
    assert _required(meter_password, "secret")
    assert _required(meter_passwords, "secret")
    assert _required(choose_broker, "secret")
    assert _required_field(LocalBroker, "meter_secret")
    assert _required_field(AgentOptions, "meter_secret")
    refused = "MTR-0001 has no mqtt_password and there is no password secret"
    with pytest.raises(ConfigError, match=refused):
        meter_passwords({M1: None, M2: EXPLICIT}, None)
    with pytest.raises(ConfigError, match=refused):
        LocalBroker(tmp_path / "broker", [M1], meter_secret=None)
    with pytest.raises(ConfigError, match=refused):
        await choose_broker("local", tmp_path / "local", [M1], secret=None)
    assert not (tmp_path / "broker").exists()
    assert not (tmp_path / "local").exists()
    settings = BrokerSettings("127.0.0.1", free_port())
    with pytest.raises(ConfigError, match=refused):
        MeterAgent(make_runtime(M1), settings, None, AgentOptions(meter_secret=None))
    explicit = MeterAgent(
        make_runtime(M2, mqtt_password=EXPLICIT), settings, None, AgentOptions(meter_secret=None)
    )
    assert explicit.broker.password == EXPLICIT
    assert meter_passwords({M2: EXPLICIT}, None) == {M2: EXPLICIT}


def test_run_on_a_port_in_use_fails_with_one_line(
    tmp_path: Path, fleet: Path, mosquitto_path: Path
) -> None:
    directory = tmp_path / "broker"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert _config("--fleet", str(fleet), "--out", str(directory), "--port", str(port))[0] == 0
        done = subprocess.run(
            [sys.executable, "-m", "cli.hes", "broker", "run", str(directory)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1
    assert "in use" in ours[0]
    assert "Traceback" not in done.stderr
