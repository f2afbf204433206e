"""The README's demo, end to end: simulator process, broker, head-end; every check holds."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from headend.broker import find_mosquitto
from headend.demo import DemoOptions, run_demo


class ListReporter:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def section(self, title: str) -> None:
        self.lines.append(f"## {title}")

    def note(self, text: str) -> None:
        self.lines.append(text)

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.lines.append(f"table {title}: {len(rows)} rows")


@pytest.mark.slow
@pytest.mark.mqtt
def test_demo_holds_every_check(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    reporter = ListReporter()
    options = DemoOptions(meters=2, broker_url="local", workdir=tmp_path, hours=12)
    result = asyncio.run(run_demo(options, reporter))
    failed = [what for what, ok in result.checks if not ok]
    assert result.mqtt
    assert not failed, "\n".join(reporter.lines)
    assert len(result.checks) >= 46
    assert (tmp_path / "simulator.log").exists()
    assert any("a local broker was asked for" in line for line in reporter.lines)
    # the head-end's part: every one of its claims is a check that held
    checks = [what for what, _ in result.checks]
    for claim in (
        "the fleet file's meters were registered in a fresh store",
        "MTR-0001 was marked unreachable while its line was down",
        "its health changes were stored: unreachable, then online when it came back",
        "the poller read every meter after its restart and stored its events",
        "LOW-1's top-up was read by the poller before the ingest came back",
        "every meter has contiguous intervals for the whole period (no hole)",
        "every meter's intervals run from before the serve to its last poll",
        "the audit chain verifies",
        "the policy waited for the friendly period to end before cutting supply",
        "EVE-2 (protected) was never cut off, though out of credit",
        "exactly one disconnect and one reconnect for EVE-1",
        "one low-credit notice for EVE-1",
        # the payments story
        "the wallet's payment was accepted (201) and delivered to PAY-1 over Modbus",
        "the identical repeat got 200 and the first answer, unchanged",
        "the bank's retry after its time-out made one payment, delivered once",
        "the reversal before delivery cancelled the transfer: nothing of it reached the meter",
        "the agent's payment for PAY-2 was delivered once its line was back",
        "the kiosk's token was keyed in, accepted by the meter and confirmed by the head-end",
        "a reprint gives the same token, never a new one",
        "the auto-debit mandate paid once when PAY-3 crossed its low threshold, and the credit "
        "was delivered over MQTT",
        "every payment has one receipt, numbered without a gap, written as text and PDF",
        "the wallet's settlement file reconciles: one payment matched, one missing in the ledger",
        "every ledger balance equals the sum of its postings",
        "the payments' audit chain verifies, the ledger's transactions included",
    ):
        assert claim in checks, claim
    for meter in ("PAY-1", "PAY-2", "PAY-3", "KEY-1"):
        assert any(c.startswith(f"{meter}: the credit the ledger confirmed") for c in checks), meter
    receipts = sorted(p.name for p in (tmp_path / "receipts").iterdir())
    assert len(receipts) == 12
    assert receipts[0] == "receipt-00000001.pdf"
    assert (tmp_path / "receipts" / "receipt-00000001.pdf").read_bytes().startswith(b"%PDF")
    assert "TOKEN" in (tmp_path / "kiosk-slip.txt").read_text()
    assert (tmp_path / "wallet-settlement.csv").exists()
    assert any(c.startswith("it was backfilled on its return") for c in checks)
    assert any(c.startswith("the restarts stored nothing twice") for c in checks)
    assert (tmp_path / "hes.db").exists()
    assert "table hes serve's counters: 6 rows" in reporter.lines


@pytest.mark.slow
def test_demo_runs_on_modbus_alone(tmp_path: Path) -> None:
    """Without a broker the head-end's day runs the poller alone; a store left in the work
    directory (here not even a database) is replaced by a fresh one."""
    (tmp_path / "hes.db").write_text("not a database")
    reporter = ListReporter()
    options = DemoOptions(meters=1, mqtt=False, workdir=tmp_path, hours=8, supply=False)
    result = asyncio.run(run_demo(options, reporter))
    failed = [what for what, ok in result.checks if not ok]
    assert not result.mqtt
    assert not failed, "\n".join(reporter.lines)
    assert "## Remote disconnect and reconnect (Modbus)" in reporter.lines
    assert any(line.startswith("## Reconciliation") for line in reporter.lines)
    assert "no MQTT broker: no ingest to restart" in reporter.lines
    assert "the audit chain verifies" in [what for what, _ in result.checks]


@pytest.mark.slow
def test_demo_runs_again_on_its_kept_workdir(tmp_path: Path) -> None:
    """A second run on the same work directory tells the same story and holds every check,
    in about the time of the first (the old meters' spent credit and top-ups do not carry)."""
    options = DemoOptions(meters=1, mqtt=False, workdir=tmp_path, hours=0, supply=False)
    first = asyncio.run(run_demo(options, ListReporter()))
    assert first.ok
    reporter = ListReporter()
    second = asyncio.run(run_demo(options, reporter))
    failed = [what for what, ok in second.checks if not ok]
    assert not failed, "\n".join(reporter.lines)
    assert len(second.checks) == len(first.checks)
    assert any("a fresh fleet" in line for line in reporter.lines)
