from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ValidationError
from protocols.units import Energy, Money, ScalerUnit, Unit, decimal_text


def test_money_parse_and_print_exactly() -> None:
    assert Money.parse("12.50", "KES") == Money(1250, "KES")
    assert Money.parse("7", "KES") == Money(700, "KES")
    assert Money.parse("-0.05", "USD") == Money(-5, "USD")
    assert Money.parse("1500", "JPY", exponent=0) == Money(1500, "JPY", 0)
    assert str(Money(1250, "KES")) == "12.50 KES"
    assert str(Money(-5, "USD")) == "-0.05 USD"
    assert str(Money(1500, "JPY", 0)) == "1500 JPY"


@pytest.mark.parametrize("bad", ["12.505", "1e3", "", "12,50", "abc", "0.1.2"])
def test_money_parse_refuses(bad: str) -> None:
    with pytest.raises(ValidationError):
        Money.parse(bad, "KES")


def test_money_is_never_a_float() -> None:
    with pytest.raises(ValidationError):
        Money(12.5, "KES")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Money(100, "kes")
    with pytest.raises(ValidationError):
        Money(1, "KES") + Money(1, "USD")
    assert Money(150, "KES") - Money(50, "KES") == Money(100, "KES")
    assert -Money(3, "KES") == Money(-3, "KES")


def test_energy() -> None:
    assert Energy.parse_kwh("12.5") == Energy(12500)
    assert Energy.parse_kwh("0.001") == Energy(1)
    assert str(Energy(1234567)) == "1234.567 kWh"
    for bad in ("1.0001", "-1", "x"):
        with pytest.raises(ValidationError):
            Energy.parse_kwh(bad)
    with pytest.raises(ValidationError):
        Energy(1.5)  # type: ignore[arg-type]


def test_scaler_unit_renders_exact_decimals() -> None:
    assert ScalerUnit(-1, Unit.VOLT).render(2301) == "230.1 V"
    assert ScalerUnit(-3, Unit.AMPERE).render(5) == "0.005 A"
    assert ScalerUnit(3, Unit.WATT_HOUR).render(2) == "2000 Wh"
    assert ScalerUnit(-2, Unit.COUNT).render(-150) == "-1.50"
    with pytest.raises(ValidationError):
        ScalerUnit(200, Unit.WATT)


@given(st.integers(-(10**15), 10**15), st.integers(0, 4))
def test_money_text_round_trip(minor: int, exponent: int) -> None:
    money = Money(minor, "EUR", exponent)
    amount = str(money).split()[0]
    assert Money.parse(amount, "EUR", exponent) == money


@given(st.integers(-(10**12), 10**12), st.integers(-6, 0))
def test_decimal_text_is_exact(value: int, scaler: int) -> None:
    from decimal import Decimal

    assert Decimal(decimal_text(value, scaler)) == Decimal(value).scaleb(scaler)
