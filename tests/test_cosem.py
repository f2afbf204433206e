"""The COSEM object model: attributes by index, refusals, profile buffers, emergency credit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CHARGE,
    OBIS_CLOCK,
    OBIS_EMERGENCY_CREDIT,
    OBIS_ENERGY_IMPORT,
    OBIS_EVENT_LOG,
    OBIS_LIMITER,
    OBIS_LOAD_PROFILE,
    OBIS_POWER,
    OBIS_SERIAL,
    OBIS_TOKEN_CREDIT,
    OBIS_TOKEN_GATEWAY,
    Account,
    AccountStatus,
    Charge,
    Clock,
    CosemObject,
    Credit,
    CreditStatus,
    CreditStatusBit,
    CreditType,
    CreditUnit,
    Data,
    Limiter,
    PaymentMode,
    ProfileGeneric,
    Register,
    TokenGateway,
    TokenStatus,
    energy_register,
    index_objects,
)
from protocols.errors import CommandRefused, ValidationError
from protocols.units import ScalerUnit, Unit


def _profile(entries: int = 4) -> ProfileGeneric:
    return ProfileGeneric(
        OBIS_LOAD_PROFILE,
        capture_objects=("time", "energy"),
        capture_period=900,
        profile_entries=entries,
    )


# -- attributes by index ----------------------------------------------------------------------


def test_register_attributes_by_index() -> None:
    reg = energy_register(OBIS_ENERGY_IMPORT, 1234)
    assert reg.CLASS_ID == 3
    assert reg.get(1) == OBIS_ENERGY_IMPORT
    assert reg.get(2) == 1234
    assert reg.get(3) == ScalerUnit(0, Unit.WATT_HOUR)
    assert reg.attributes() == {
        "logical_name": OBIS_ENERGY_IMPORT,
        "value": 1234,
        "scaler_unit": ScalerUnit(0, Unit.WATT_HOUR),
    }
    reg.reset()
    assert reg.get(2) == 0


@pytest.mark.parametrize(
    ("obj", "count"),
    [
        (Data(OBIS_SERIAL, "X1"), 2),
        (Register(OBIS_POWER, 5, ScalerUnit(0, Unit.WATT)), 3),
        (Clock(OBIS_CLOCK), 4),
        (_profile(), 8),
        (Limiter(OBIS_LIMITER), 6),
        (Account(OBIS_ACCOUNT), 11),
        (Credit(OBIS_TOKEN_CREDIT, CreditType.TOKEN), 8),
        (Charge(OBIS_CHARGE), 6),
        (TokenGateway(OBIS_TOKEN_GATEWAY), 6),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, CosemObject) else str(v),
)
def test_attribute_index_bounds(obj: CosemObject, count: int) -> None:
    assert len(obj.ATTRIBUTES) == count
    assert obj.get(1) == obj.logical_name
    for index in range(1, count + 1):
        assert obj.get(index) == getattr(obj, obj.ATTRIBUTES[index - 1])
    for bad in (0, -1, count + 1):
        with pytest.raises(ValidationError):
            obj.get(bad)


def test_class_ids() -> None:
    assert Data(OBIS_SERIAL, "").CLASS_ID == 1
    assert Clock(OBIS_CLOCK).CLASS_ID == 8
    assert _profile().CLASS_ID == 7
    assert Limiter(OBIS_LIMITER).CLASS_ID == 71
    assert Account(OBIS_ACCOUNT).CLASS_ID == 111
    assert Credit(OBIS_TOKEN_CREDIT, CreditType.TOKEN).CLASS_ID == 112
    assert Charge(OBIS_CHARGE).CLASS_ID == 113
    assert TokenGateway(OBIS_TOKEN_GATEWAY).CLASS_ID == 115


def test_clock_attributes() -> None:
    clock = Clock(OBIS_CLOCK, time=1_767_225_600, time_zone=180, status=0)
    assert clock.get(2) == 1_767_225_600
    assert clock.get(3) == 180
    assert clock.get(4) == 0


def test_limiter_defaults_and_attributes() -> None:
    limiter = Limiter(OBIS_LIMITER, threshold_active=3000, min_over_threshold_duration=30)
    assert limiter.get(2) == OBIS_POWER  # monitored value
    assert limiter.get(3) == 3000
    assert limiter.get(5) == 30
    assert Limiter(OBIS_LIMITER).threshold_active == 0  # off by default


def test_account_composite_attributes() -> None:
    account = Account(OBIS_ACCOUNT, currency_name="KES", currency_scale=-2)
    assert account.get(2) == (PaymentMode.PREPAYMENT, AccountStatus.ACTIVE)
    assert account.get(11) == ("KES", -2, CreditUnit.MONETARY)
    energy = Account(
        OBIS_ACCOUNT, currency_name="Wh", currency_scale=0, credit_unit=CreditUnit.CONSUMPTION
    )
    assert energy.get(11) == ("Wh", 0, 1)


def test_account_status_bits() -> None:
    account = Account(OBIS_ACCOUNT)
    account.current_credit_status = 1 << CreditStatusBit.LOW_CREDIT
    assert account.has_status(CreditStatusBit.LOW_CREDIT)
    assert not account.has_status(CreditStatusBit.IN_CREDIT)
    assert account.get(4) == 2


def test_account_close_and_activate() -> None:
    account = Account(OBIS_ACCOUNT, status=AccountStatus.NEW)
    account.activate_account()
    assert account.status is AccountStatus.ACTIVE
    account.close_account()
    assert account.status is AccountStatus.CLOSED
    with pytest.raises(CommandRefused):
        account.activate_account()
    assert account.status is AccountStatus.CLOSED


def test_token_gateway_defaults() -> None:
    gateway = TokenGateway(OBIS_TOKEN_GATEWAY)
    assert gateway.get(6) is TokenStatus.RECEIVED
    assert gateway.get(2) == ""


def test_index_objects_refuses_duplicates() -> None:
    a = energy_register(OBIS_ENERGY_IMPORT)
    b = energy_register(OBIS_ENERGY_IMPORT)
    with pytest.raises(ValidationError):
        index_objects([a, b])
    table = index_objects([a, Data(OBIS_SERIAL, "S")])
    assert table[OBIS_ENERGY_IMPORT] is a
    assert set(table) == {OBIS_ENERGY_IMPORT, OBIS_SERIAL}


# -- profile generic ----------------------------------------------------------------------------


def test_profile_needs_one_entry() -> None:
    with pytest.raises(ValidationError):
        _profile(entries=0)


def test_profile_is_a_bounded_ring_buffer() -> None:
    profile = _profile(entries=3)
    for t in range(1, 6):
        profile.capture((t * 900, t))
    assert profile.entries_in_use == 3
    assert profile.get(7) == 3
    assert profile.get(8) == 3
    assert list(profile) == [(2700, 3), (3600, 4), (4500, 5)]  # the oldest fell out
    profile.reset()
    assert profile.entries_in_use == 0


def test_profile_refuses_a_row_of_the_wrong_width() -> None:
    profile = _profile()
    with pytest.raises(ValidationError):
        profile.capture((1, 2, 3))
    assert profile.entries_in_use == 0


def test_profile_initial_buffer_is_bounded() -> None:
    from collections import deque

    profile = ProfileGeneric(
        OBIS_EVENT_LOG,
        capture_objects=("time", "x"),
        capture_period=0,
        profile_entries=2,
        buffer=deque([(1, 1), (2, 2), (3, 3)]),
    )
    assert list(profile) == [(2, 2), (3, 3)]
    profile.capture((4, 4))
    assert list(profile) == [(3, 3), (4, 4)]


def test_select_range_inclusive_and_oldest_first() -> None:
    profile = _profile(entries=10)
    for t in (900, 1800, 2700, 3600):
        profile.capture((t, t // 900))
    assert profile.select_range(1800, 2700) == [(1800, 2), (2700, 3)]
    assert profile.select_range(901, 1799) == []
    assert profile.select_range(0, 10_000) == list(profile)
    assert profile.select_range(3000, 1000) == []


@settings(max_examples=100)
@given(
    times=st.lists(st.integers(0, 10_000), max_size=30),
    entries=st.integers(1, 12),
    start=st.integers(0, 10_000),
    span=st.integers(0, 5_000),
)
def test_select_range_property(times: list[int], entries: int, start: int, span: int) -> None:
    profile = _profile(entries=entries)
    rows = [(t, n) for n, t in enumerate(times)]
    for row in rows:
        profile.capture(row)
    kept = rows[-entries:] if rows else []
    assert list(profile) == kept
    assert profile.select_range(start, start + span) == [
        row for row in kept if start <= row[0] <= start + span
    ]


# -- credit and emergency credit ------------------------------------------------------------------


def _emergency(status: CreditStatus = CreditStatus.SELECTABLE) -> Credit:
    return Credit(
        OBIS_EMERGENCY_CREDIT,
        CreditType.EMERGENCY,
        preset_credit_amount=2000,
        credit_status=status,
    )


def test_emergency_credit_invocation() -> None:
    credit = _emergency()
    assert credit.current_credit_amount == 0
    credit.invoke_credit()
    assert credit.credit_status is CreditStatus.IN_USE
    assert credit.current_credit_amount == 2000
    assert credit.get(7) is CreditStatus.IN_USE
    assert credit.get(2) == 2000


@pytest.mark.parametrize(
    "status",
    [CreditStatus.ENABLED, CreditStatus.INVOKED, CreditStatus.IN_USE, CreditStatus.CONSUMED],
)
def test_emergency_credit_only_from_selectable(status: CreditStatus) -> None:
    credit = _emergency(status)
    credit.current_credit_amount = 500
    with pytest.raises(CommandRefused):
        credit.invoke_credit()
    assert credit.credit_status is status
    assert credit.current_credit_amount == 500


def test_token_credit_cannot_be_invoked() -> None:
    credit = Credit(
        OBIS_TOKEN_CREDIT,
        CreditType.TOKEN,
        credit_status=CreditStatus.SELECTABLE,
        preset_credit_amount=100,
    )
    with pytest.raises(CommandRefused):
        credit.invoke_credit()
    assert credit.current_credit_amount == 0
    assert credit.credit_status is CreditStatus.SELECTABLE


def test_obis_names_match_design() -> None:
    assert str(OBIS_TOKEN_CREDIT) == "0.0.19.10.0.255"
    assert str(OBIS_EMERGENCY_CREDIT) == "0.0.19.10.1.255"
    assert str(OBIS_ACCOUNT) == "0.0.19.0.0.255"
    assert str(OBIS_LOAD_PROFILE) == "1.0.99.1.0.255"
    assert str(OBIS_EVENT_LOG) == "0.0.99.98.0.255"


def test_every_declared_method_exists() -> None:
    from protocols import cosem

    classes = [
        obj
        for obj in vars(cosem).values()
        if isinstance(obj, type)
        and issubclass(obj, cosem.CosemObject)
        and obj.__dict__.get("CLASS_ID")
    ]
    assert len(classes) >= 10
    for cls in classes:
        for name in cls.METHODS:
            assert callable(getattr(cls, name, None)), f"class {cls.CLASS_ID} lacks {name}"


def test_credit_and_account_methods() -> None:
    from protocols.cosem import (
        OBIS_ACCOUNT,
        OBIS_TOKEN_CREDIT,
        OBIS_TOKEN_GATEWAY,
        Account,
        AccountStatus,
        Credit,
        CreditType,
        TokenGateway,
        TokenStatus,
    )
    from protocols.errors import ValidationError

    credit = Credit(OBIS_TOKEN_CREDIT, CreditType.TOKEN, current_credit_amount=100)
    credit.update_amount(-30)
    assert credit.current_credit_amount == 70
    credit.set_amount_to_value(5)
    assert credit.current_credit_amount == 5
    with pytest.raises(ValidationError):
        credit.update_amount(1.5)  # type: ignore[arg-type]
    account = Account(OBIS_ACCOUNT, available_credit=9, aggregated_debt=3)
    account.reset_account()
    assert (account.status, account.available_credit, account.aggregated_debt) == (
        AccountStatus.NEW,
        0,
        0,
    )
    gateway = TokenGateway(OBIS_TOKEN_GATEWAY, token_status=TokenStatus.EXECUTION_OK)
    gateway.enter(" 12345678901234567890 ", 1000, method=1)
    assert (gateway.token, gateway.token_time, gateway.token_status) == (
        "12345678901234567890",
        1000,
        TokenStatus.RECEIVED,
    )
    with pytest.raises(ValidationError):
        gateway.enter("1", 1, method=7)
