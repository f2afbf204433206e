"""What operators see: `hes poll --once`, `hes status`, `hes meters show`, `hes readings`,
against simulated meters served over Modbus TCP in a child process."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.hes import app
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

FLEET = """
[simulation]
speed = 1
start = "2026-03-02T00:00:00Z"
state_dir = "{state}"

[[meters]]
id_prefix = "MTR-"
count = 2
modbus_unit = 1
"""


@dataclass(frozen=True, slots=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, env: dict[str, str]) -> Done:
    """`hes ARGS` in this process, with ``env`` as its environment additions."""
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return Done(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A two-meter fleet served by `meter-sim serve` in real time; (fleet file, port)."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET.format(state=tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.meter_sim", "serve", "--config", str(fleet),
         "--modbus-port", "0", "--ready-json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        yield fleet, int(ready["modbus_tcp"].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def test_poll_status_show_and_export(served: tuple[Path, int], db_url: str, tmp_path: Path) -> None:
    fleet, port = served
    env = {"HES_DB": db_url}
    assert run("db", "upgrade", env=env).returncode == 0
    base = f"tcp://127.0.0.1:{port}"
    imported = run("meters", "import", "--from-fleet", str(fleet), "--endpoint-base", base,
                   env=env)  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    first = run("poll", "--once", "--json", env=env)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["read"], summary["failed"]) == (2, 0)
    # the simulator's clock started in March: every reading is flagged for clock skew
    assert summary["flagged"] == 2
    status = json.loads(run("status", "--json", env=env).stdout)
    assert status["meters"] == 2
    assert status["by_health"] == {"online": 2}
    assert status["by_relay"] == {"connected": 2}
    assert status["never_read"] == []
    shown = run("meters", "show", "MTR-0001", "--json", env=env)
    story = json.loads(shown.stdout)
    assert story["health"]["health"] == "online"
    assert story["latest"]["relay"] == "connected"
    assert "clock_skew" in story["flagged"][0]["flags"]
    assert "meter clock" in story["flagged"][0]["flag_reason"]
    text = run("meters", "show", "MTR-0001", env=env)
    assert "MTR-0001" in text.stdout
    assert "online" in text.stdout
    exported = run("readings", "MTR-0001", "--since", "2026-03-01", "--until", "2026-03-03",
                   "--readings", "--csv", env=env)  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 1
    assert rows[0]["meter_time"].startswith("2026-03-02T")
    assert rows[0]["flags"] == "clock_skew"


def test_a_meter_that_does_not_answer_fails_the_round(tmp_path: Path) -> None:
    env = {"HES_DB": f"sqlite:///{tmp_path / 'hes.db'}"}
    assert run("db", "upgrade", env=env).returncode == 0
    add = run("meters", "add", "GHOST", "--endpoint", "tcp://127.0.0.1:1/1", env=env)
    assert add.returncode == 0
    done = run("poll", "--once", "--deadline", "1", env=env)
    assert done.returncode == 1
    assert "GHOST:" in done.stdout
    assert "read 0, failed 1" in done.stdout
    status = json.loads(run("status", "--json", env=env).stdout)
    assert status["by_health"] == {"degraded": 1}
    assert status["never_read"] == ["GHOST"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["readings", "M", "--since", "yesterday"], "not a time"),
        (["readings", "M", "--since", "2026-03-02", "--until", "2026-03-01"], "must be after"),
        (["readings", "NOPE"], "no meter 'NOPE' is registered"),
        (["meters", "show", "NOPE"], "no meter 'NOPE' is registered"),
        (["poll", "--once", "--meter", "NOPE"], "not registered or retired: NOPE"),
        (["status", "--stale", "soon"], "not a duration"),
    ],
)
def test_wrong_inputs(tmp_path: Path, args: list[str], message: str) -> None:
    env = {"HES_DB": f"sqlite:///{tmp_path / 'hes.db'}"}
    assert run("db", "upgrade", env=env).returncode == 0
    done = run(*args, env=env)
    assert done.returncode != 0
    assert message in done.stderr
