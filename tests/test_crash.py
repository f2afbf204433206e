"""A meter process killed with SIGKILL during a burst of top-ups keeps every acknowledged one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from meter_sim.config import load_fleet
from meter_sim.runtime import MeterRuntime
from protocols.readings import EventCode

FLEET = """
[simulation]
speed = 60
state_dir = "{state}"

[[meters]]
id = "CRASH-1"
initial_credit = 1000
load = {{ model = "constant", watts = 500 }}
"""

BURST = 150
AMOUNT = 100


def _start(config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.meter_sim", "console", "--config", str(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None
    ready = proc.stdout.readline()
    assert json.loads(ready) == {"ready": True}, ready + (proc.stderr.read() if proc.stderr else "")
    return proc


def _accepted_transfers(config: Path) -> list[int]:
    fleet = load_fleet(config)
    runtime = MeterRuntime.open_stopped(fleet.meters[0], Path(fleet.simulation.state_dir))
    events = runtime.meter.events_since(0, 10**6)
    return [e.a for e in events if e.code is EventCode.TOPUP_ACCEPTED]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_during_topup_burst(tmp_path: Path, seed: int) -> None:
    config = tmp_path / "fleet.toml"
    config.write_text(FLEET.format(state=tmp_path / "state"))
    proc = _start(config)
    assert proc.stdin is not None
    assert proc.stdout is not None
    kill_after = random.Random(seed).randint(1, BURST - 1)
    for transfer in range(1, BURST + 1):
        proc.stdin.write(f"topup {transfer} {AMOUNT}\n")
    proc.stdin.flush()
    acknowledged = []
    for _ in range(kill_after):
        answer = json.loads(proc.stdout.readline())
        assert answer["result"] == "ok", answer
        acknowledged.append(answer["transfer"])
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    assert proc.returncode == -signal.SIGKILL

    applied = _accepted_transfers(config)
    assert applied[: len(acknowledged)] == acknowledged, "an acknowledged top-up was lost"
    assert len(applied) == len(set(applied)), "a top-up was applied twice"
    assert applied == list(range(1, len(applied) + 1))

    # The head-end retries everything it is not sure of: each transfer lands exactly once.
    proc = _start(config)
    out, err = proc.communicate(
        "".join(f"topup {t} {AMOUNT}\n" for t in range(1, BURST + 1)) + "quit\n", timeout=60
    )
    assert proc.returncode == 0, err
    results = [json.loads(line)["result"] for line in out.splitlines()]
    assert results.count("ok") == BURST - len(applied)
    applied = _accepted_transfers(config)
    assert applied == list(range(1, BURST + 1))

    fleet = load_fleet(config)
    meter = MeterRuntime.open_stopped(fleet.meters[0], Path(fleet.simulation.state_dir)).meter
    assert meter.topups_total == BURST * AMOUNT
    assert meter.initial_credit + meter.topups_total - meter.charges_total == meter.balances.net
    codes = [e.code for e in meter.events_since(0, 10**6)]
    assert EventCode.POWER_DOWN in codes
    assert codes[codes.index(EventCode.POWER_DOWN) + 1] is EventCode.POWER_UP
