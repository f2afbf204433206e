"""Tokens vended by the head-end, entered on a simulated meter (MeterRuntime with a state file)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from headend.vending import (
    VendedToken,
    VendingKeyData,
    vend_clear_credit,
    vend_credit,
    vend_key_change,
    vend_power_limit,
)
from meter_sim.config import MeterConfig, StsConfig
from meter_sim.keypad import KeypadRefusal, key_data_from_config
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.cosem import OBIS_LIMITER, OBIS_TOKEN_GATEWAY, TokenStatus
from protocols.readings import EventCode

STS = StsConfig(vending_key="abababababababab", drn="00000000000")  # base date 2014
CONFIG = MeterConfig("KP-0001", credit_unit="energy", initial_credit=5_000, sts=STS)
OTHER_STS = StsConfig(vending_key="abababababababab", drn="0100000000008")
START = datetime(2026, 1, 1, tzinfo=UTC)


def open_meter(state_dir: Path, clock: ManualClock) -> MeterRuntime:
    return MeterRuntime.open(CONFIG, clock, state_dir)


def meter_key() -> VendingKeyData:
    """What the head-end's registry holds for the meter."""
    return key_data_from_config(STS)


def vend(wh: int, minutes: int, key: VendingKeyData | None = None) -> VendedToken:
    issued = START - timedelta(days=1) + timedelta(minutes=minutes)
    return vend_credit(key or meter_key(), wh, issued, rnd=7)


def credit(runtime: MeterRuntime) -> int:
    return runtime.snapshot().credit


def token_events(runtime: MeterRuntime) -> list[tuple[EventCode, int, int]]:
    return [
        (event.code, event.a, event.b)
        for event in runtime.events_since(0, 1000)
        if event.code in (EventCode.TOKEN_ACCEPTED, EventCode.TOKEN_REFUSED)
    ]


def test_a_vended_token_adds_exactly_its_amount_once_also_after_a_restart(tmp_path: Path) -> None:
    clock = ManualClock(START.timestamp())
    runtime = open_meter(tmp_path, clock)
    before = credit(runtime)
    token = vend(12_345, 0)  # 12.345 kWh is carried as 12.4 kWh
    assert token.wh == 12_400

    accepted = runtime.enter_token(token.formatted)
    assert accepted.result is ResultCode.OK
    assert accepted.status is TokenStatus.EXECUTION_OK
    assert credit(runtime) == before + 12_400
    assert runtime.read(OBIS_TOKEN_GATEWAY, 6) is TokenStatus.EXECUTION_OK

    again = runtime.enter_token(token.digits)
    assert again.result is ResultCode.TOKEN_REFUSED
    assert again.refusal == KeypadRefusal.USED
    assert credit(runtime) == before + 12_400

    restarted = open_meter(tmp_path, clock)  # a new runtime on the same state file
    assert credit(restarted) == before + 12_400
    after_restart = restarted.enter_token(token.digits)
    assert after_restart.refusal == KeypadRefusal.USED
    assert credit(restarted) == before + 12_400
    assert token_events(restarted) == [
        (EventCode.TOKEN_ACCEPTED, 0, 12_400),
        (EventCode.TOKEN_REFUSED, int(TokenStatus.VALIDATION_FAILED), int(KeypadRefusal.USED)),
        (EventCode.TOKEN_REFUSED, int(TokenStatus.VALIDATION_FAILED), int(KeypadRefusal.USED)),
    ]


def test_a_token_for_another_meter_is_refused(tmp_path: Path) -> None:
    runtime = open_meter(tmp_path, ManualClock(START.timestamp()))
    before = credit(runtime)
    foreign = vend(1_000, 0, key_data_from_config(OTHER_STS))
    outcome = runtime.enter_token(foreign.digits)
    assert outcome.result is ResultCode.TOKEN_REFUSED
    assert outcome.refusal == KeypadRefusal.FORMAT
    assert outcome.status is TokenStatus.AUTHENTICATION_FAILED
    assert runtime.read(OBIS_TOKEN_GATEWAY, 6) is TokenStatus.AUTHENTICATION_FAILED
    assert credit(runtime) == before


def test_a_token_sent_as_a_command_is_applied_once(tmp_path: Path) -> None:
    runtime = open_meter(tmp_path, ManualClock(START.timestamp()))
    before = credit(runtime)
    token = vend(2_000, 5)
    envelope = CommandEnvelope.signed(CONFIG.meter_id, 1, Command.enter_token(token.digits), None)
    assert runtime.execute(envelope).code is ResultCode.OK
    assert credit(runtime) == before + 2_000
    replay = CommandEnvelope.signed(CONFIG.meter_id, 2, Command.enter_token(token.digits), None)
    assert runtime.execute(replay).code is ResultCode.TOKEN_REFUSED
    assert credit(runtime) == before + 2_000


def test_after_a_key_change_old_key_tokens_are_refused_and_new_key_tokens_accepted(
    tmp_path: Path,
) -> None:
    clock = ManualClock(START.timestamp())
    runtime = open_meter(tmp_path, clock)
    old_key = meter_key()
    new_key = replace(old_key, krn=2, ti=7)
    first, second = vend_key_change(old_key, new_key)
    assert runtime.enter_token(first.digits).result is ResultCode.OK
    changed = runtime.enter_token(second.digits)
    assert changed.result is ResultCode.OK
    assert "revision 2" in changed.detail

    before = credit(runtime)
    stale = runtime.enter_token(vend(1_000, 30, old_key).digits)
    assert stale.refusal == KeypadRefusal.FORMAT
    assert credit(runtime) == before
    fresh = vend(1_000, 31, new_key)
    assert runtime.enter_token(fresh.digits).result is ResultCode.OK
    assert credit(runtime) == before + 1_000

    # the new key survives a restart; the old one stays refused
    restarted = open_meter(tmp_path, clock)
    assert restarted.enter_token(vend(500, 32, old_key).digits).refusal == KeypadRefusal.FORMAT
    assert restarted.enter_token(vend(500, 33, new_key).digits).result is ResultCode.OK
    assert restarted.enter_token(fresh.digits).refusal == KeypadRefusal.USED
    assert credit(restarted) == before + 1_500
    assert any(
        event.code is EventCode.KEY_CHANGED and (event.a, event.b) == (2, 7)
        for event in restarted.events_since(0, 1000)
    )


def test_a_management_token_reaches_the_meter_registers(tmp_path: Path) -> None:
    runtime = open_meter(tmp_path, ManualClock(START.timestamp()))
    token = vend_power_limit(meter_key(), 4_000, START - timedelta(hours=1), rnd=2)
    assert runtime.enter_token(token.digits).result is ResultCode.OK
    assert runtime.read(OBIS_LIMITER, 3) == 4_000  # threshold_active


def test_clear_credit_clears_only_the_electricity_register(tmp_path: Path) -> None:
    runtime = open_meter(tmp_path, ManualClock(START.timestamp()))
    before = credit(runtime)
    water = vend_clear_credit(meter_key(), START - timedelta(hours=2), register=1, rnd=1)
    outcome = runtime.enter_token(water.digits)
    assert outcome.result is ResultCode.TOKEN_REFUSED
    assert "only electricity" in outcome.detail
    assert credit(runtime) == before
    everything = vend_clear_credit(meter_key(), START - timedelta(hours=1), rnd=1)
    assert runtime.enter_token(everything.digits).result is ResultCode.OK
    assert credit(runtime) == 0
