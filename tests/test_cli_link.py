"""`hes read`, `hes credit`, `hes disconnect`, `hes reconnect` against simulated meters served
over Modbus TCP by another process (the CLI runs its own event loop)."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.hes_link import register_link_commands
from headend.broker import free_port
from headend.links.endpoint import masked_endpoint
from tests import test_modbus_rtu

ROOT = Path(__file__).resolve().parent.parent
pty_pair = test_modbus_rtu.pty_pair  # two connected pseudo-terminals (socat)
KEY = "00112233445566778899aabbccddeeff"

# Two meters on one listener; the process prints {"port": N} when it listens and stops when
# its stdin closes.
SERVER = """
import asyncio, json, sys
from protocols.clock import ManualClock
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime

async def main() -> None:
    clock = ManualClock(1_767_225_600.0)
    meters = [
        MeterRuntime.open(MeterConfig("CLI-0001", modbus_unit=1, initial_credit=100_000), clock),
        MeterRuntime.open(
            MeterConfig("CLI-0002", modbus_unit=2, auth_key=sys.argv[1], control_mode=4), clock
        ),
        MeterRuntime.open(
            MeterConfig(
                "CLI-0003", modbus_unit=3, currency="BHD", currency_scale=-3, initial_credit=1500
            ),
            clock,
        ),
    ]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with serve_tcp(meters) as service:
        print(json.dumps({"port": service.port}), flush=True)
        await stdin.read()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, KEY],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the simulator did not start"
        line = process.stdout.readline()
        assert line, f"the simulator exited with {process.wait()}"
        yield int(json.loads(line)["port"])
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    hes = typer.Typer()
    register_link_commands(hes)
    return hes


def run(app: typer.Typer, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def read_json(app: typer.Typer, endpoint: str) -> dict[str, object]:
    code, out, err = run(app, "read", endpoint, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_read_prints_a_table_and_json(app: typer.Typer, port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{port}/1"
    code, out, err = run(app, "read", endpoint)
    assert code == 0, err
    assert "CLI-0001" in out
    assert "1000.00 KES" in out  # 100,000 minor units with the meter's currency scale
    data = read_json(app, endpoint)
    assert data["meter_id"] == "CLI-0001"
    assert data["credit"] == 100_000
    assert data["currency"] == "KES"
    assert read_json(app, f"tcp://127.0.0.1:{port}/2")["meter_id"] == "CLI-0002"


def test_read_shows_amounts_with_the_meters_own_decimals(app: typer.Typer, port: int) -> None:
    code, out, err = run(app, "read", f"tcp://127.0.0.1:{port}/3")
    assert code == 0, err
    assert "1.500 BHD" in out  # 1,500 fils: the Bahraini dinar has three decimals
    data = read_json(app, f"tcp://127.0.0.1:{port}/3")
    assert (data["credit"], data["currency"], data["currency_scale"]) == (1500, "BHD", -3)


def test_credit_is_confirmed_and_applied_once(app: typer.Typer, port: int) -> None:
    endpoint = f"tcp://127.0.0.1:{port}/1"
    before = read_json(app, endpoint)
    code, out, err = run(app, "direct", "credit", endpoint, "--transfer", "1", "--amount", "2500")
    assert code == 0, err
    assert "ok (0)" in out
    after = read_json(app, endpoint)
    assert after["credit"] == before["credit"] + 2500  # type: ignore[operator]
    assert after["last_transfer"] == 1
    assert after["last_command_seq"] == before["last_command_seq"] + 1  # type: ignore[operator]
    code, out, err = run(
        app, "direct", "credit", endpoint, "--transfer", "1", "--amount", "2500", "--json"
    )
    assert code == 3, err  # the same transfer again: acknowledged, applied zero times
    assert json.loads(out)["result"]["code"] == 1  # duplicate
    assert err.strip() == (
        "error: nothing applied: meter CLI-0001 had applied transfer 1 before; "
        "it acknowledged it again and added no credit"
    )
    assert read_json(app, endpoint)["credit"] == after["credit"]


def test_credit_help_documents_the_exit_codes(app: typer.Typer) -> None:
    code, out, _ = run(app, "direct", "credit", "--help")
    assert code == 0
    assert "3 when the meter had applied this transfer number before" in " ".join(out.split())


def test_read_help_lists_every_scheme(app: typer.Typer) -> None:
    code, out, _ = run(app, "read", "--help")
    assert code == 0
    for scheme in ("tcp://", "rtu://", "mqtt://", "mqtts://"):
        assert scheme in out


def test_disconnect_and_reconnect_need_the_key_of_a_keyed_meter(
    app: typer.Typer, port: int
) -> None:
    endpoint = f"tcp://127.0.0.1:{port}/2"
    code, out, err = run(app, "direct", "disconnect", endpoint)
    assert code == 1
    assert "auth_failed" in out
    assert err.strip() == "error: meter CLI-0002 refused remote_disconnect: auth_failed"
    assert read_json(app, endpoint)["control_state"] == 1
    code, out, err = run(app, "direct", "disconnect", endpoint, "--key", KEY)
    assert code == 0, err
    assert "open (supply off), disconnected" in out  # the resulting relay state
    state = read_json(app, endpoint)
    assert (state["control_state"], state["output_state"]) == (0, False)
    code, out, err = run(app, "direct", "reconnect", endpoint, "--key", KEY, "--json")
    assert code == 0, err
    assert json.loads(out) == {
        "meter_id": "CLI-0002",
        "command": "remote_reconnect",
        "result": {"sequence": 2, "code": 0, "last_transfer": 0, "detail": ""},
        "output_state": True,
        "control_state": 1,
    }
    state = read_json(app, endpoint)  # mode 4: straight back on
    assert (state["control_state"], state["output_state"]) == (1, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("read", "tcp://127.0.0.1:1"), "cannot connect"),
        (("read", "ftp://127.0.0.1/1"), "unknown scheme"),
        (("read", "127.0.0.1:502"), "an endpoint looks like"),
        (("direct", "disconnect", "tcp://127.0.0.1:1/1", "--key", "zz"), "--key is hex"),
    ],
)
def test_errors_are_one_line_on_stderr(
    app: typer.Typer, port: int, args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(app, *args)
    assert code == 1
    assert out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_an_unreachable_meter_is_one_line_and_quick(app: typer.Typer, port: int) -> None:
    started = time.monotonic()
    code, _, err = run(app, "read", "tcp://127.0.0.1:1/1", "--timeout", "0.2")
    assert code == 1
    assert "cannot connect" in err
    assert time.monotonic() - started < 10


def test_no_password_is_printed(app: typer.Typer, port: int) -> None:
    code, out, err = run(app, "read", f"tcp://op:s3cret@127.0.0.1:{port}/1")
    assert code == 0, err
    assert f"CLI-0001 at tcp://op:***@127.0.0.1:{port}/1" in out
    assert "s3cret" not in out
    closed = f"mqtt://hes:s3cret@127.0.0.1:{free_port()}/CLI-0001"
    for args in (("read", closed, "--timeout", "1"), ("read", closed + "?keepalive=x")):
        code, out, err = run(app, *args)
        assert code == 1
        assert "hes:***@127.0.0.1" in err
        assert "s3cret" not in out + err


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("mqtt://hes:pw@h:1883/M1?prefix=phs", "mqtt://hes:***@h:1883/M1?prefix=phs"),
        ("mqtts://u:p@ss@h/M1", "mqtts://u:***@h/M1"),
        ("mqtt://hes:pw@h?ca=/a@b", "mqtt://hes:***@h?ca=/a@b"),
        ("mqtt://hes:pw@h:bad:port/M", "mqtt://hes:***@h:bad:port/M"),
        ("mqtt://hes@h/M1", "mqtt://hes@h/M1"),
        ("tcp://127.0.0.1:502/1", "tcp://127.0.0.1:502/1"),
        ("rtu:///dev/ttyUSB0?unit=1", "rtu:///dev/ttyUSB0?unit=1"),
        ("not an endpoint", "not an endpoint"),
    ],
)
def test_masked_endpoints(text: str, shown: str) -> None:
    assert masked_endpoint(text) == shown


def test_credit_help_says_what_a_transfer_number_is(app: typer.Typer) -> None:
    direct = typer.main.get_group(app).commands["direct"]
    command = direct.commands["credit"]  # type: ignore[attr-defined]
    (transfer,) = [p for p in command.params if p.name == "transfer"]
    assert getattr(transfer, "help", None) == (
        "Transfer number, greater than the last transfer applied."
    )


# A meter on unit 1 of an RTU line (one end of a pty pair); the process prints "ready" once it
# serves and stops when its stdin closes.
RTU_SERVER = """
import asyncio, sys
from protocols.clock import ManualClock
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_rtu
from meter_sim.runtime import MeterRuntime

async def main() -> None:
    meter = MeterRuntime.open(MeterConfig("RTU-0001", modbus_unit=1), ManualClock(1.8e9))
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with serve_rtu([meter], sys.argv[1], baudrate=9600):
        print("ready", flush=True)
        await stdin.read()

asyncio.run(main())
"""


@pytest.fixture
def rtu_line(pty_pair: tuple[str, str]) -> Iterator[str]:
    """The master's end of a line with a meter on unit 1."""
    process = subprocess.Popen(
        [sys.executable, "-c", RTU_SERVER, pty_pair[0]],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 30)
        assert ready, "the RTU simulator did not start"
        assert process.stdout.readline().strip() == "ready"
        yield pty_pair[1]
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def test_a_missing_rtu_unit_ends_within_the_time_out(app: typer.Typer, rtu_line: str) -> None:
    code, out, err = run(app, "read", f"rtu://{rtu_line}?unit=1", "--json")
    assert code == 0, err
    assert json.loads(out)["meter_id"] == "RTU-0001"
    started = time.monotonic()
    code, out, err = run(app, "read", f"rtu://{rtu_line}?unit=9", "--timeout", "1")
    elapsed = time.monotonic() - started
    assert code == 1
    assert out == ""
    assert "no answer" in err
    assert len(err.strip().splitlines()) == 1
    assert 0.9 <= elapsed < 1.6  # the time-out is the whole command's, retries included
