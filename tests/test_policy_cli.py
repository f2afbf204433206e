"""`hes policy explain` and `hes policy dry-run` over stored readings: the decision, its reason,
and nothing changed."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime

from typer.testing import CliRunner

from cli.hes import app
from headend.domain.validation import Findings
from headend.storage import open_database
from headend.storage.readings import reading_row, store_readings
from protocols.disconnect import ControlState
from protocols.readings import MeterSnapshot
from tests.databases import db_url, postgres_server
from tests.test_domain_readings import SNAP, T0

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()


def hes(db: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--db", db])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


async def _store(db_url: str, *snapshots: MeterSnapshot) -> None:
    db = await open_database(db_url)
    try:
        async with db.begin() as session:
            now = datetime.now(UTC)
            await store_readings(
                session, [reading_row(s, Findings(), now, "poll") for s in snapshots]
            )
    finally:
        await db.close()


def test_explain_and_dry_run(db_url: str) -> None:
    assert hes(db_url, "db", "upgrade")[0] == 0
    assert (
        hes(
            db_url, "tariffs", "add", "NIGHT", "--price", "2500", "--friendly-hours", "18:00-06:00"
        )[0]
        == 0
    )
    for n in (1, 2, 3):
        add = ["meters", "add", f"M-{n}", "--endpoint", f"tcp://127.0.0.1:1/{n}", "--tariff"]
        assert hes(db_url, *add, "NIGHT")[0] == 0
    asyncio.run(
        _store(
            db_url,
            replace(SNAP, meter_id="M-1", time=T0, credit=100),
            replace(SNAP, meter_id="M-1", time=T0 + 900, credit=0),  # exhausted at T0+900
            replace(SNAP, meter_id="M-2", time=T0, credit=5000),
            replace(
                SNAP,
                meter_id="M-3",
                time=T0,
                credit=300,
                control_mode=2,
                control_state=ControlState.DISCONNECTED,
            ),
        )
    )
    noon = "2026-01-01T12:00Z"  # two days of credit gone, outside the friendly hours
    code, out = hes(db_url, "policy", "explain", "M-1", "--at", noon, "--json")
    assert code == 0, out
    decision = json.loads(out)
    assert (decision["action"], decision["relay"]) == ("disconnect", "connected")
    evening = "2026-01-01T19:00Z"
    code, out = hes(db_url, "policy", "explain", "M-1", "--at", evening)
    assert out.strip() == (
        "M-1: wait: out of credit, but it is a friendly period (until 2026-01-02T06:00:00+00:00)"
    )
    early = "2026-01-01T00:20Z"  # within the grace hour after exhaustion (friendly too)
    assert "wait" in hes(db_url, "policy", "explain", "M-1", "--at", early, "--grace", "0s")[1]
    code, out = hes(db_url, "policy", "dry-run", "--at", noon, "--json")
    planned = {row["meter_id"]: row["action"] for row in json.loads(out)}
    assert planned == {"M-1": "disconnect", "M-3": "reconnect"}  # M-2 has nothing to do
    every = json.loads(hes(db_url, "policy", "dry-run", "--at", noon, "--all", "--json")[1])
    assert [row["meter_id"] for row in every] == ["M-1", "M-2", "M-3"]
    code, out = hes(db_url, "policy", "explain", "NOPE")
    assert code == 1
    assert "no active meter 'NOPE'" in out
