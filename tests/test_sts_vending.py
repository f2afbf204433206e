"""Head-end vending: reproducible tokens, TID uniqueness, rounding, key changes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend.vending import (
    Rounding,
    VendingKeyData,
    next_tid,
    read_token,
    vend_clear_credit,
    vend_clear_tamper,
    vend_credit,
    vend_key_change,
    vend_phase_unbalance_limit,
    vend_power_limit,
)
from protocols.errors import ValidationError
from protocols.sts import (
    TID_LIMIT,
    ClearCreditToken,
    ClearTamperToken,
    CreditSubclass,
    CreditToken,
    KeyChangeToken1,
    KeyChangeToken2,
    NewKey,
    SetPhaseUnbalanceLimitToken,
    SetPowerLimitToken,
    TokenDecodeError,
    decode_token,
    time_from_tid,
)

KEY_A = VendingKeyData.create("abababababababab", "600727000000000009")
KEY_B = VendingKeyData.create("abababababababab", "000001000000000082")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def test_credit_reproduces_the_reference_vectors() -> None:
    first = vend_credit(KEY_A, 100, utc(2004, 3, 1, 13, 55), rnd=5)
    assert first.digits == "23716100501183194197"
    assert first.tid == 5871715
    assert first.wh == 100
    assert first.issued_at == utc(2004, 3, 1, 13, 55)
    assert first.formatted == "2371 6100 5011 8319 4197"
    second = vend_credit(KEY_B, 100, utc(2004, 3, 1, 14, 0, 42), rnd=5)
    assert second.digits == "67206107716095682372"


def test_management_tokens_reproduce_the_vectors() -> None:
    assert (
        vend_power_limit(KEY_A, 1000, utc(2004, 3, 28, 9, 1), rnd=5).digits
        == "50901894209860263092"
    )
    assert vend_clear_credit(KEY_A, utc(2004, 3, 28, 9, 15), rnd=5).digits == (
        "29511990995826640868"
    )
    assert vend_clear_tamper(KEY_A, utc(2004, 3, 28, 10, 0), rnd=5).digits == (
        "37037300014464855694"
    )
    assert vend_phase_unbalance_limit(KEY_A, 10, utc(2004, 3, 28, 10, 20), rnd=5).digits == (
        "30220533115430798647"
    )


def test_key_change_reproduces_the_vector() -> None:
    new = VendingKeyData.create("abababababababab", "600727000000000009", ti=2)
    first, second = vend_key_change(KEY_A, new)
    assert (first.digits, second.digits) == ("51638423060042734509", "15361891762113502242")
    assert first.tid is None
    assert first.issued_at is None
    assert isinstance(first.token, KeyChangeToken1)
    assert isinstance(second.token, KeyChangeToken2)
    assert not first.token.rollover
    assert NewKey.from_tokens(first.token, second.token).key == new.decoder_key()


def test_key_change_with_rollover_sets_the_bit() -> None:
    new = VendingKeyData.create("abababababababab", "600727000000000009", krn=2, base_date=2014)
    first, _ = vend_key_change(KEY_A, new)
    token = decode_token(first.digits, KEY_A.decoder_key())
    assert isinstance(token, KeyChangeToken1)
    assert token.rollover
    assert token.krn == 2
    assert first.fields()["rollover"] is True
    skip = VendingKeyData.create("abababababababab", "600727000000000009", base_date=2035)
    with pytest.raises(ValidationError, match="2014"):
        vend_key_change(KEY_A, skip)
    with pytest.raises(ValidationError, match="PAN"):
        vend_key_change(KEY_A, KEY_B)


def test_two_tokens_in_one_minute_get_consecutive_tids() -> None:
    moment = utc(2004, 3, 1, 13, 55, 10)
    first = vend_credit(KEY_A, 1000, moment, rnd=1)
    second = vend_credit(KEY_A, 1000, moment + timedelta(seconds=20), last_tid=first.tid, rnd=1)
    third = vend_clear_tamper(KEY_A, moment, last_tid=second.tid, rnd=1)
    assert (first.tid, second.tid, third.tid) == (5871715, 5871716, 5871717)
    assert second.issued_at == utc(2004, 3, 1, 13, 56)
    assert len({first.digits, second.digits, third.digits}) == 3
    # a later minute is used as is
    later = vend_credit(KEY_A, 1000, utc(2004, 3, 1, 15, 0), last_tid=third.tid, rnd=1)
    assert later.tid == 5871715 + 65


@settings(max_examples=50)
@given(st.lists(st.integers(0, 600), min_size=1, max_size=20))
def test_tids_strictly_increase_whatever_the_issue_times(offsets: list[int]) -> None:
    start = utc(2010, 6, 1)
    last: int | None = None
    for offset in offsets:  # seconds, in any order: a clock that jumps back included
        tid = next_tid(KEY_A, start + timedelta(seconds=offset), last)
        assert last is None or tid > last
        last = tid


def test_tid_limits() -> None:
    with pytest.raises(ValidationError):
        next_tid(KEY_A, utc(2025, 1, 1))  # past the 1993 base date's range
    with pytest.raises(ValidationError):
        next_tid(KEY_A, utc(2004, 1, 1), last_tid=TID_LIMIT - 1)
    with pytest.raises(ValidationError):
        next_tid(KEY_A, utc(2004, 1, 1), last_tid=-1)
    with pytest.raises(ValidationError, match="time zone"):
        next_tid(KEY_A, datetime(2004, 1, 1))
    expiring = VendingKeyData.create("abababababababab", "00000000000", ken=88)
    with pytest.raises(ValidationError, match="expired"):
        next_tid(expiring, utc(2004, 3, 1, 13, 55))  # TID 5871715 >> 16 == 89
    assert next_tid(expiring, utc(2003, 6, 1)) >> 16 <= 88
    on_2014 = VendingKeyData.create("abababababababab", "00000000000", base_date=2014)
    assert next_tid(on_2014, utc(2025, 1, 1)) == 11 * 365 * 1440 + 3 * 1440  # 3 leap days


def test_credit_rounding() -> None:
    moment = utc(2004, 3, 1)
    assert vend_credit(KEY_A, 150, moment, rnd=0).wh == 200  # up to the next 0.1 kWh
    assert vend_credit(KEY_A, 2_000_050, moment, rnd=0).wh == 2_000_400  # 1 kWh steps
    with pytest.raises(ValidationError, match=r"0\.1 kWh"):
        vend_credit(KEY_A, 150, moment, rnd=0, rounding=Rounding.EXACT)
    with pytest.raises(ValidationError, match="next one"):
        vend_credit(KEY_A, 2_000_100, moment, rnd=0, rounding=Rounding.EXACT)
    assert vend_credit(KEY_A, 2_000_400, moment, rnd=0, rounding=Rounding.EXACT).wh == 2_000_400
    for bad in (0, -100, 1_820_162_500):
        with pytest.raises(ValidationError):
            vend_credit(KEY_A, bad, moment, rnd=0)
    with pytest.raises(ValidationError):
        vend_power_limit(KEY_A, 20_001, moment, rounding=Rounding.EXACT)
    assert isinstance(vend_power_limit(KEY_A, 20_001, moment).token, SetPowerLimitToken)


def test_random_nibble() -> None:
    moment = utc(2004, 3, 1)
    drawn = {vend_credit(KEY_A, 100, moment).token for _ in range(64)}
    rnds = {token.rnd for token in drawn if isinstance(token, CreditToken)}
    assert len(rnds) > 1
    assert rnds <= set(range(16))
    with pytest.raises(ValidationError):
        vend_credit(KEY_A, 100, moment, rnd=16)


def test_read_token_returns_every_field() -> None:
    vended = read_token(KEY_A, "2371-6100-5011-8319-4197")
    assert vended.token == CreditToken(CreditSubclass.ELECTRICITY, 1, 5871715, 5)
    assert vended.fields() == {
        "token": "23716100501183194197",
        "formatted": "2371 6100 5011 8319 4197",
        "kind": "credit-electricity",
        "class": 0,
        "subclass": 0,
        "tid": 5871715,
        "rnd": 5,
        "base_date": 1993,
        "issued_at": "2004-03-01T13:55:00Z",
        "amount": 1,
        "unit": "0.1 kWh",
        "wh": 100,
        "kwh": "0.100",
    }
    water = read_token(KEY_A, "42502136492215507402")
    assert water.wh is None
    assert water.fields()["kind"] == "credit-water"
    clear = read_token(KEY_A, "29511990995826640868")
    assert clear.token == ClearCreditToken(0xFFFF, clear.tid or 0, 5)
    assert clear.fields()["register"] == 0xFFFF
    limit = read_token(KEY_A, "30220533115430798647")
    assert isinstance(limit.token, SetPhaseUnbalanceLimitToken)
    assert limit.fields()["watts"] == 10
    tamper = read_token(KEY_A, "37037300014464855694")
    assert isinstance(tamper.token, ClearTamperToken)
    assert tamper.fields()["pad"] == 0
    test = read_token(KEY_A, "56493153725450313471")
    assert test.fields()["control"] == (1 << 36) - 1
    with pytest.raises(TokenDecodeError):
        read_token(KEY_B, "23716100501183194197")


def test_dkga04_vending_round_trip() -> None:
    key = VendingKeyData.create(
        "abababababababab949494949494949401234567", "600727000000000009", sgc=123457
    )
    vended = vend_credit(key, 100, utc(2009, 1, 1, 8, 0), rnd=5)
    assert vended.digits == "15697331168573253829"
    assert read_token(key, vended.digits).token == vended.token
    assert time_from_tid(vended.tid or 0, 1993) == utc(2009, 1, 1, 8).timestamp()
