"""Operators' commands through the head-end, against simulated meters served over Modbus TCP in
a child process: `hes disconnect|reconnect METER --reason ... --wait`, `hes commands
list|show|cancel|dispatch`, and a head-end killed with SIGKILL at random points of a command's
life, which resumes each command so that it runs on the meter exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.hes import app
from headend.storage import open_database
from headend.storage.schema import MeterEvent
from protocols.readings import EventCode, RelayCause
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

FLEET = """
[simulation]
speed = 1
state_dir = "{state}"

[defaults]
auth_key = "00112233445566778899aabbccddeeff"

[[meters]]
id_prefix = "MTR-"
count = 2
modbus_unit = 1
"""


def hes(*args: str, db: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"HES_DB": db})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


@contextlib.contextmanager
def served(tmp_path: Path, db_url: str) -> Iterator[tuple[str, int]]:
    """Two meters served by `meter-sim serve`, registered in a fresh store; (db, port)."""
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET.format(state=tmp_path / "state"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.meter_sim", "serve", "--config", str(path),
         "--modbus-port", "0", "--ready-json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(json.loads(proc.stdout.readline())["modbus_tcp"].rsplit(":", 1)[1])
        assert hes("db", "upgrade", db=db_url)[0] == 0
        code, _, err = hes(
            "meters", "import", "--from-fleet", str(path),
            "--endpoint-base", f"tcp://127.0.0.1:{port}", db=db_url,
        )  # fmt: skip
        assert code == 0, err
        yield db_url, port
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def fleet(tmp_path: Path, db_url: str) -> Iterator[tuple[str, int]]:
    with served(tmp_path, db_url) as running:
        yield running


def test_disconnect_and_reconnect_through_the_store(fleet: tuple[str, int]) -> None:
    db, port = fleet
    code, out, err = hes("disconnect", "MTR-0001", "--reason", "tamper check", "--wait",
                         "--json", db=db)  # fmt: skip
    assert code == 0, err
    view = json.loads(out)
    assert (view["state"], view["sequence"]) == ("verified", 1)
    assert view["actor"].startswith("operator")
    assert [t["new"] for t in view["transitions"]] == [
        "queued", "sent", "acknowledged", "verified",
    ]  # fmt: skip
    code, out, _ = hes("read", f"tcp://127.0.0.1:{port}/1", "--json", db=db)
    assert json.loads(out)["output_state"] is False
    # queued without --wait, then sent by dispatch
    code, out, _ = hes("reconnect", "MTR-0001", "--reason", "cleared", db=db)
    assert code == 0
    assert "queued" in out
    code, out, _ = hes("reconnect", "MTR-0001", "--reason", "cleared", db=db)
    assert "on its way already" in out  # one reconnect in flight, not two
    code, out, err = hes("commands", "dispatch", "--json", db=db)
    assert code == 0, err
    assert [(v["kind"], v["state"]) for v in json.loads(out)] == [("reconnect", "verified")]
    code, out, _ = hes("commands", "list", "--meter", "MTR-0001", "--json", db=db)
    assert [(v["id"], v["state"]) for v in json.loads(out)] == [(2, "verified"), (1, "verified")]
    code, out, _ = hes("commands", "show", "2", "--json", db=db)
    assert json.loads(out)["transitions"][-1]["reason"].startswith("read back: the relay is")
    code, out, _ = hes("commands", "show", "2", db=db)
    assert out.startswith("command 2: reconnect MTR-0001 (sequence 2): verified")
    # a queued command can be cancelled; a verified one cannot
    hes("disconnect", "MTR-0002", "--reason", "oops", db=db)
    code, out, _ = hes("commands", "cancel", "3", "--reason", "wrong meter", db=db)
    assert code == 0
    assert "cancelled" in out
    code, _, err = hes("commands", "cancel", "1", "--reason", "late", db=db)
    assert code == 1
    assert "verified already" in err
    code, out, _ = hes("commands", "dispatch", db=db)
    assert (code, out.strip()) == (0, "no command was due")
    code, out, _ = hes("audit", "verify", db=db)
    assert code == 0, out


def test_an_unreachable_meter_leaves_the_command_on_its_way(db_url: str) -> None:
    assert hes("db", "upgrade", db=db_url)[0] == 0
    assert hes("meters", "add", "M-1", "--endpoint", "tcp://127.0.0.1:1/1", db=db_url)[0] == 0
    code, _, err = hes("disconnect", "M-1", "--reason", "x", "--wait", "--timeout", "1",
                       db=db_url)  # fmt: skip
    assert code == 4, err
    assert "still queued" in err
    code, out, _ = hes("commands", "show", "1", "--json", db=db_url)
    assert json.loads(out)["last_error"]


def _remote_relay_events(db: str) -> dict[int, int]:
    """The stored relay events of MTR-0001 that remote commands caused, counted by code."""

    async def count() -> dict[int, int]:
        database = await open_database(db)
        try:
            async with database.read() as session:
                rows = await session.execute(
                    select(MeterEvent.code, func.count())
                    .where(MeterEvent.meter_id == "MTR-0001")
                    .where(MeterEvent.a == int(RelayCause.REMOTE))
                    .group_by(MeterEvent.code)
                )
                return {int(code): int(n) for code, n in rows.all()}
        finally:
            await database.close()

    return asyncio.run(count())


def _states(db: str) -> list[tuple[int, str, str]]:
    _, out, _ = hes("commands", "list", "--meter", "MTR-0001", "--json", db=db)
    return [(v["sequence"], v["kind"], v["state"]) for v in reversed(json.loads(out))]


def _queued(path: str) -> int:
    """How many commands the SQLite file holds (read-only, cheap enough to poll)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM commands").fetchone()[0])


def test_sigkill_at_random_points_runs_each_command_once(tmp_path: Path) -> None:
    """On SQLite, where a killed writer is the harder case (two workers sharing PostgreSQL
    are tested in test_dispatcher)."""
    path = str(tmp_path / "kill.db")
    with served(tmp_path, f"sqlite:///{path}") as (db, _):
        _kill_rounds(db, path)


def _kill_rounds(db: str, path: str) -> None:
    rng = random.Random(11)
    kinds = ["disconnect", "reconnect"] * 3
    env = {**os.environ, "HES_DB": db}
    for n, kind in enumerate(kinds, start=1):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.hes", kind, "MTR-0001", "--reason", f"round {n}",
             "--wait", "--timeout", "1"],  # its claim holds 4 s after a kill
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # wait until the command is queued (or the process is done), then kill it at a
            # random moment of its life: before the send, on the wire, before the read-back
            deadline = time.monotonic() + 30
            while _queued(path) < n and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(10)
        if _queued(path) < n:  # killed before it was queued: ask again
            code, _, err = hes(kind, "MTR-0001", "--reason", f"round {n}", "--wait", db=db)
        else:
            code, _, err = hes("commands", "dispatch", db=db)
        assert code == 0, err
    states = _states(db)
    assert states == [(n, kind, "verified") for n, kind in enumerate(kinds, start=1)]
    assert hes("poll", "--once", db=db)[0] == 0
    events = _remote_relay_events(db)
    assert events == {
        EventCode.RELAY_DISCONNECTED: 3,  # once per disconnect
        EventCode.RELAY_READY_FOR_RECONNECTION: 3,  # once per reconnect (control mode 6)
    }
    assert hes("audit", "verify", db=db)[0] == 0
    with contextlib.closing(sqlite3.connect(path)) as conn:  # no half-written transaction
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
