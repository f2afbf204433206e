"""The meter side of STS: the keypad's rules, key changes, rollover, non-volatile state."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from headend.vending import (
    VendingKeyData,
    vend_clear_credit,
    vend_clear_tamper,
    vend_credit,
    vend_key_change,
    vend_phase_unbalance_limit,
    vend_power_limit,
)
from meter_sim.config import StsConfig
from meter_sim.keypad import (
    AddCredit,
    ClearCredit,
    ClearTamper,
    KeyChange,
    KeyChangePending,
    KeypadDecision,
    KeypadRefusal,
    SetPhaseUnbalanceLimit,
    SetPowerLimit,
    StsKeypad,
    TestToken,
    key_data_from_config,
)
from protocols.cosem import TokenStatus
from protocols.errors import ConfigError, StateFileError
from protocols.sts import CreditToken

VUDK = "abababababababab"
CONFIG = StsConfig(vending_key=VUDK, drn="00000000000", base_date=1993)  # PAN A of the vectors
OTHER = StsConfig(vending_key=VUDK, drn="0100000000008", base_date=1993)
START = datetime(2004, 3, 1, 8, 0, tzinfo=UTC)
NOW = START.timestamp() + 86_400.0


def key_of(config: StsConfig, **changes: int) -> VendingKeyData:
    return replace(key_data_from_config(config), **changes)  # type: ignore[arg-type]


def credit(wh: int, minutes: int, config: StsConfig = CONFIG, **changes: int) -> str:
    moment = START + timedelta(minutes=minutes)
    return vend_credit(key_of(config, **changes), wh, moment, rnd=3).digits


def enter(keypad: StsKeypad, digits: str, now: float = NOW) -> KeypadDecision:
    decision = keypad.evaluate(digits, now)
    keypad.commit(decision)
    return decision


def test_key_data_from_config_matches_the_reference_key() -> None:
    assert key_data_from_config(CONFIG).decoder_key() == 0xE653341F9D5BF36F
    assert key_data_from_config(OTHER).decoder_key() == 0xE94023262E9993C2


def test_a_credit_token_is_accepted_once() -> None:
    keypad = StsKeypad(CONFIG)
    digits = credit(12_300, 0)
    first = enter(keypad, digits)
    assert first.status is TokenStatus.VALIDATION_OK
    assert first.refusal is None
    assert first.accepted
    assert first.action == AddCredit(wh=12_300, subclass=0)
    assert isinstance(first.token, CreditToken)
    again = enter(keypad, digits)
    assert again.status is TokenStatus.VALIDATION_FAILED
    assert again.refusal is KeypadRefusal.USED
    assert again.action is None
    assert keypad.tid_memory == (first.token.tid,)


def test_the_reference_vector_is_accepted_by_the_meter_of_pan_a() -> None:
    decision = StsKeypad(CONFIG).evaluate("2371 6100 5011 8319 4197", NOW)
    assert decision.action == AddCredit(wh=100, subclass=0)


def test_evaluate_changes_nothing() -> None:
    keypad = StsKeypad(CONFIG)
    digits = credit(1000, 0)
    assert keypad.evaluate(digits, NOW) == keypad.evaluate(digits, NOW)
    assert keypad.tid_memory == ()
    assert keypad.to_state() == StsKeypad(CONFIG).to_state()


def test_a_token_for_another_meter_is_refused() -> None:
    keypad = StsKeypad(CONFIG)
    decision = enter(keypad, credit(1000, 0, OTHER))
    assert decision.refusal is KeypadRefusal.FORMAT
    assert decision.status is TokenStatus.AUTHENTICATION_FAILED
    assert decision.token is None
    assert keypad.tid_memory == ()


@pytest.mark.parametrize("text", ["", "1234", "2371610050118319419x", "99999999999999999999"])
def test_malformed_input_is_a_format_failure(text: str) -> None:
    decision = StsKeypad(CONFIG).evaluate(text, NOW)
    assert decision.status is TokenStatus.FORMAT_FAILURE
    assert decision.refusal is KeypadRefusal.FORMAT


def test_old_tokens_are_refused_once_the_memory_is_full() -> None:
    keypad = StsKeypad(CONFIG)
    early = credit(100, 0)
    # while the memory is not full, an older unused token is accepted
    assert enter(keypad, credit(100, 500)).accepted
    assert enter(keypad, credit(100, 1)).accepted
    for minute in range(2, 2 + StsKeypad.tid_memory_size):
        assert enter(keypad, credit(100, 1000 + minute)).accepted
    assert len(keypad.tid_memory) == StsKeypad.tid_memory_size
    decision = enter(keypad, early)
    assert decision.refusal is KeypadRefusal.OLD
    assert decision.status is TokenStatus.VALIDATION_FAILED
    # the oldest remembered TIDs were evicted: 500 is now older than the oldest
    assert enter(keypad, credit(100, 500)).refusal is KeypadRefusal.OLD
    assert enter(keypad, credit(100, 1000 + 5)).refusal is KeypadRefusal.USED
    assert enter(keypad, credit(100, 5000)).accepted


def test_key_expiry_number() -> None:
    config = StsConfig(vending_key=VUDK, drn="00000000000", ken=88, base_date=1993)
    keypad = StsKeypad(config)
    # TID 5871715 (2004-03-01 13:55) >> 16 == 89 > 88; the head-end refuses to vend it,
    # so the token is made with a key data that claims KEN 255
    late = vend_credit(key_of(config, ken=255), 100, datetime(2004, 3, 1, 13, 55, tzinfo=UTC))
    decision = keypad.evaluate(late.digits, NOW)
    assert decision.refusal is KeypadRefusal.KEY_EXPIRED
    early = vend_credit(key_of(config), 100, datetime(2003, 6, 1, tzinfo=UTC))
    assert keypad.evaluate(early.digits, NOW).accepted
    assert keypad.key_expiry == 88


def test_other_credit_subclasses_are_refused() -> None:
    decision = StsKeypad(CONFIG).evaluate("42502136492215507402", NOW)  # water, PAN A
    assert decision.refusal is KeypadRefusal.FORMAT
    assert decision.status is TokenStatus.VALIDATION_FAILED


def test_management_tokens() -> None:
    keypad = StsKeypad(CONFIG)
    key = key_of(CONFIG)
    moment = START + timedelta(days=2)
    cases = [
        (vend_power_limit(key, 5000, moment, rnd=1), SetPowerLimit(5000)),
        (vend_clear_credit(key, moment, last_tid=None, rnd=1, register=1), ClearCredit(1)),
        (vend_clear_tamper(key, moment + timedelta(minutes=2), rnd=1), ClearTamper()),
        (
            vend_phase_unbalance_limit(key, 800, moment + timedelta(minutes=3), rnd=1),
            SetPhaseUnbalanceLimit(800),
        ),
    ]
    # the first two share a minute: the second would be refused as USED
    assert enter(keypad, cases[0][0].digits).action == cases[0][1]
    assert enter(keypad, cases[1][0].digits).refusal is KeypadRefusal.USED
    for vended, action in cases[2:]:
        assert enter(keypad, vended.digits).action == action
    retried = vend_clear_credit(key, moment, last_tid=cases[0][0].tid, rnd=1, register=1)
    assert enter(keypad, retried.digits).action == ClearCredit(1)


def test_test_tokens_are_accepted_and_not_remembered() -> None:
    keypad = StsKeypad(CONFIG)
    for _ in range(2):
        decision = enter(keypad, "56493153725450313471")
        assert decision.action == TestToken(control=(1 << 36) - 1, manufacturer=0)
    assert keypad.tid_memory == ()


def test_key_change_then_old_key_tokens_are_refused_and_new_key_tokens_accepted() -> None:
    keypad = StsKeypad(CONFIG)
    new_key = key_of(CONFIG, ti=2, krn=2)
    first, second = vend_key_change(key_of(CONFIG), new_key)
    assert enter(keypad, first.digits).action == KeyChangePending(NOW)
    assert keypad.key_change_pending
    assert keypad.key_revision == 1
    done = enter(keypad, second.digits, NOW + 60)
    assert done.action == KeyChange(
        key_revision=2, key_type=2, tariff_index=2, key_expiry=255, rollover=False, base_date=1993
    )
    assert (keypad.key_revision, keypad.tariff_index, keypad.key_type) == (2, 2, 2)
    assert keypad.to_state()["pending"] is None
    old = enter(keypad, credit(500, 10))
    assert old.refusal is KeypadRefusal.FORMAT
    assert old.status is TokenStatus.AUTHENTICATION_FAILED
    new = enter(keypad, credit(500, 10, ti=2, krn=2))
    assert new.action == AddCredit(500)
    # the key change tokens themselves no longer decode (they were made under the old key)
    assert keypad.evaluate(first.digits, NOW).refusal is KeypadRefusal.FORMAT


def test_the_tid_memory_survives_a_key_change_without_rollover() -> None:
    keypad = StsKeypad(CONFIG)
    used = credit(100, 0)
    assert enter(keypad, used).accepted
    first, second = vend_key_change(key_of(CONFIG), key_of(CONFIG, krn=2))
    enter(keypad, first.digits)
    enter(keypad, second.digits)
    again = vend_credit(key_of(CONFIG, krn=2), 100, START, rnd=3)
    assert enter(keypad, again.digits).refusal is KeypadRefusal.USED


def test_second_half_without_a_recent_first_half_is_incomplete() -> None:
    keypad = StsKeypad(CONFIG)
    first, second = vend_key_change(key_of(CONFIG), key_of(CONFIG, ti=3))
    decision = enter(keypad, second.digits)
    assert decision.refusal is KeypadRefusal.KEY_CHANGE_INCOMPLETE
    assert decision.status is TokenStatus.VALIDATION_FAILED
    enter(keypad, first.digits, NOW)
    late = keypad.evaluate(second.digits, NOW + StsKeypad.key_change_window + 1)
    assert late.refusal is KeypadRefusal.KEY_CHANGE_INCOMPLETE
    assert keypad.evaluate(second.digits, NOW + 5).accepted
    assert keypad.tariff_index == 1


def test_rollover_clears_the_tid_memory_and_moves_the_base_date() -> None:
    keypad = StsKeypad(CONFIG)
    assert enter(keypad, credit(100, 0)).accepted
    rolled = key_of(CONFIG, krn=2, base_date=2014)
    first, second = vend_key_change(key_of(CONFIG), rolled)
    enter(keypad, first.digits)
    done = enter(keypad, second.digits)
    assert isinstance(done.action, KeyChange)
    assert done.action.rollover
    assert done.action.base_date == 2014
    assert keypad.base_date == 2014
    assert keypad.tid_memory == ()
    # a token issued in 2025 under the 2014 base date
    token = vend_credit(rolled, 700, datetime(2025, 1, 1, tzinfo=UTC), rnd=0)
    assert enter(keypad, token.digits).action == AddCredit(700)
    assert enter(keypad, token.digits).refusal is KeypadRefusal.USED


def test_no_rollover_past_the_last_base_date() -> None:
    config = StsConfig(vending_key=VUDK, drn="00000000000", base_date=2035)
    keypad = StsKeypad(config)
    first, _ = vend_key_change(key_of(config), key_of(config, krn=2, base_date=2035))
    assert keypad.evaluate(first.digits, NOW).accepted
    # forge a rollover first half under this key (vending refuses to make one)
    from protocols.sts import NewKey, encode_token

    forged = NewKey(0x1234, krn=2, kt=2, ti=1, rollover=True).tokens()[0]
    digits = encode_token(forged, key_of(config).decoder_key())
    assert keypad.evaluate(digits, NOW).refusal is KeypadRefusal.FORMAT


def test_state_round_trip_through_json() -> None:
    keypad = StsKeypad(CONFIG)
    for minute in range(3):
        enter(keypad, credit(100, minute))
    first, second = vend_key_change(key_of(CONFIG), key_of(CONFIG, krn=3))
    enter(keypad, first.digits)
    enter(keypad, second.digits)
    enter(keypad, credit(100, 9, krn=3))
    next_first, next_second = vend_key_change(key_of(CONFIG, krn=3), key_of(CONFIG, krn=4))
    enter(keypad, next_first.digits, NOW + 7)  # a pending first half is kept too

    state = json.loads(json.dumps(keypad.to_state()))
    restored = StsKeypad(CONFIG, state)
    assert restored.to_state() == keypad.to_state()
    assert restored.tid_memory == keypad.tid_memory
    assert restored.key_revision == 3
    assert restored.key_change_pending
    assert restored.evaluate(credit(100, 1, krn=3), NOW).refusal is KeypadRefusal.USED
    assert enter(restored, next_second.digits, NOW + 8).accepted
    assert restored.key_revision == 4


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"version": 99, "tids": [], "installed": None, "pending": None},
        {"version": 1, "tids": "x", "installed": None, "pending": None},
        {"version": 1, "tids": [3, 2], "installed": None, "pending": None},
        {"version": 1, "tids": [], "installed": {"key": "zz"}, "pending": None},
        {"version": 1, "tids": [], "installed": None, "pending": {"ken_high": 99}},
        {
            "version": 1,
            "tids": [],
            "installed": {"key": "00", "krn": 1, "kt": 2, "ti": 1, "ken": 1, "base_date": 1},
            "pending": None,
        },
    ],
)
def test_corrupt_state_is_a_state_file_error(state: dict[str, object]) -> None:
    with pytest.raises(StateFileError):
        StsKeypad(CONFIG, state)


def test_bad_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        StsKeypad(StsConfig(vending_key="xyz", drn="00000000000"))
    with pytest.raises(ConfigError):
        StsKeypad(StsConfig(vending_key=VUDK, drn="00000000001"))


def test_a_dkga04_meter() -> None:
    config = StsConfig(
        vending_key="abababababababab949494949494949401234567",
        drn="00000000000",
        sgc=123457,
        base_date=1993,
    )
    keypad = StsKeypad(config)
    assert keypad.evaluate("15697331168573253829", NOW).action == AddCredit(100)
