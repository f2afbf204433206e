"""`hes serve` and `hes poll` refusals (one line, non-zero, nothing stored), structured JSON
log lines, and the accelerated head-end clock of --clock-speed/--clock-start/--clock-at."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli.hes_serve import make_clock
from headend.storage import open_database
from headend.storage.database import head_revision
from protocols.clock import AcceleratedClock, SystemClock
from protocols.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def _hes(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.hes", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_serve_refuses_a_schema_that_is_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    result = _hes("serve", "--db", url)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: database schema is at nothing (empty database), this hes needs "
        f"{head_revision()}: run 'hes db upgrade'"
    )
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--clock-start", "2026-01-01T00:00Z"], "--clock-start and --clock-at need --clock-speed"),
        (["--clock-speed", "60", "--clock-start", "New Year"], "not an ISO 8601 time"),
        (["--clock-speed", "60", "--clock-at", "2026-01-01T00:00Z"], "--clock-at needs"),
        (["--mqtt", "http://127.0.0.1"], "mqtt:// or mqtts://"),
        (["--lease", "5", "--deadline", "10"], "must be longer than --deadline"),
    ],
)
def test_bad_options_are_one_line_and_store_nothing(
    tmp_path: Path, args: list[str], says: str
) -> None:
    db_path = tmp_path / "hes.db"
    result = _hes("serve", "--db", f"sqlite:///{db_path}", *args)
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert says in lines[0]
    assert not db_path.exists()


def test_poll_takes_the_same_clock_options(tmp_path: Path) -> None:
    result = _hes("poll", "--once", "--db", f"sqlite:///{tmp_path / 'x.db'}",
                  "--clock-speed", "60", "--clock-start", "soon")  # fmt: skip
    assert result.returncode == 1
    assert "not an ISO 8601 time" in result.stderr
    assert "--clock-at" in _hes("poll", "--help").stdout


def test_log_json_writes_one_object_per_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hes.db'}"

    async def migrate() -> None:
        db = await open_database(url, check=False)
        try:
            await db.upgrade()
        finally:
            await db.close()

    asyncio.run(migrate())
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.hes", "serve", "--db", url, "--log-json", "-v",
         "--worker", "w-json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        ready = json.loads(process.stdout.readline())
        assert ready == {
            "event": "ready",
            "worker": "w-json",
            "meters": 0,
            "database": url,
            "metrics_port": None,
            "mqtt": None,
            "api_port": None,
        }
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    records = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert records
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"] == "serving 0 meter(s) as worker w-json" for r in records)


def test_the_accelerated_clock_runs_from_its_anchor() -> None:
    clock, speed = make_clock(None, None)
    assert isinstance(clock, SystemClock)
    assert speed == 1.0
    an_hour_ago = datetime.fromtimestamp(time.time() - 3600, UTC).isoformat()
    clock, speed = make_clock(60, "2026-01-01T00:00Z", an_hour_ago)
    assert isinstance(clock, AcceleratedClock)
    assert speed == 60
    start = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    # an hour of real time at 60x since the anchor: 60 simulated hours past the start
    assert abs(clock.now() - (start + 60 * 3600)) < 60 * 5
    naive, _ = make_clock(2, "2026-01-01T00:00")  # no zone: UTC
    assert abs(naive.now() - start) < 2 * 5
    with pytest.raises(ConfigError):
        make_clock(None, None, an_hour_ago)
