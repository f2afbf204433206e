"""The service console: one JSON answer a line; bad lines are refused and change nothing."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.console import handle_line, serve_console
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock
from protocols.commands import U32_MAX


@pytest.fixture
def runtime(tmp_path: Path) -> MeterRuntime:
    config = MeterConfig("CON-1", initial_credit=1000, load=LoadConfig(model="constant", watts=0))
    return MeterRuntime.open(config, ManualClock(), tmp_path)


def test_a_session(runtime: MeterRuntime) -> None:
    out = io.StringIO()
    serve_console(runtime, ["topup 1 500", "topup 1 500", "show", "events", "quit", "show"], out)
    answers = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [a.get("result") for a in answers[:2]] == ["ok", "duplicate"]
    assert answers[2]["credit"] == 1500
    codes = [event[2] for event in answers[3]["events"]]
    assert codes.count("topup_accepted") == 1
    assert len(answers) == 4, "nothing is read after quit"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("", "empty command"),
        ("topup", "usage: topup"),
        ("topup 1", "usage: topup"),
        ("topup one 5", "usage: topup"),
        ("topup 1 -5", "usage: topup"),
        ("topup 1 2.5", "usage: topup"),
        ("topup 0 5", "transfer"),
        ("topup 1 99999999999", "amount"),
        ("token", "usage: token"),
        ("events abc", "usage: events"),
        ("events -1", "usage: events"),
        ("events 1 2", "usage: events"),
        ("fly away", "unknown command"),
    ],
)
def test_bad_lines_are_refused_and_change_nothing(
    runtime: MeterRuntime, line: str, message: str
) -> None:
    before = runtime.meter.to_state()
    answer = handle_line(runtime, line)
    assert answer is not None
    assert message in answer["error"]
    assert runtime.meter.to_state() == before


def test_a_token_on_a_meter_without_a_keypad(runtime: MeterRuntime) -> None:
    answer = handle_line(runtime, "token 12345678901234567890")
    assert answer == {
        "result": "not_supported",
        "status": "execution_failed",
        "detail": "this meter has no STS decoder",
    }


def test_at_the_top_of_the_sequence_range_a_topup_is_refused_until_a_key_change(
    tmp_path: Path, runtime: MeterRuntime
) -> None:
    runtime.meter.last_seq = U32_MAX
    runtime.save()
    before = runtime.meter.to_state()
    answer = handle_line(runtime, "topup 1 500")
    assert answer == {
        "error": f"meter CON-1 has used its last command sequence number ({U32_MAX}): "
        "give it a new auth_key (a key change restarts the sequence from 0)"
    }
    assert runtime.meter.to_state() == before
    rekeyed = MeterRuntime.open(
        replace(runtime.config, auth_key="00" * 16), ManualClock(), tmp_path
    )
    answer = handle_line(rekeyed, "topup 1 500")
    assert answer is not None
    assert (answer["result"], answer["credit"]) == ("ok", 1500)
    assert rekeyed.meter.last_seq == 1
