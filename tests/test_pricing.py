"""Pricing a payment: the split's order (debt, fee, service charge, energy), inclusive VAT
rounded half up on integers, flat / time-of-use / block energy, minimum and maximum vend, and
the tariff's JSON definition read back the same (older definitions too)."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headend.domain.pricing import (
    AmountOutOfBounds,
    Code,
    NotPriceable,
    Situation,
    cost_milli,
    energy_for,
    receipt_text,
    split,
    vat_included,
)
from headend.domain.registry import (
    Block,
    TariffRecord,
    parse_block,
    parse_percent,
    tariff_document,
    tariff_from,
)
from protocols.errors import ValidationError

FLAT = TariffRecord("FLAT", "KES", -2, (2500,), 5000, 1000)
TOU = TariffRecord("TOU", "KES", -2, (2500, 1200), 5000, 1000)
BLOCK = TariffRecord(
    "BLOCK",
    "KES",
    -2,
    (3000,),
    5000,
    1000,
    blocks=(Block(50_000, 1200), Block(200_000, 2000)),
    fee=3000,
    service_charge=20000,
    vat_bp=1600,
    debt_share_bp=2500,
    min_vend=1000,
    max_vend=5_000_000,
)
ENERGY = Situation(credit_unit="energy")
TOKEN = Situation(credit_unit="energy", step_wh=100)


@pytest.mark.parametrize(
    ("gross", "rate", "tax"),
    [
        (11600, 1600, 1600),  # 116.00 incl. 16 % holds 16.00
        (100, 1600, 14),  # 13.79 -> 14
        (3000, 1600, 414),  # 413.79 -> 414
        (7, 1600, 1),  # 0.965 -> 1
        (3, 1600, 0),  # 0.41 -> 0
        (105, 500, 5),  # exactly 5
        (21, 500, 1),  # exactly 1.0
        (1, 10000, 1),  # 0.5 rounds up
        (0, 1600, 0),
        (5000, 0, 0),
    ],
)
def test_vat_inside_an_inclusive_amount_rounds_half_up(gross: int, rate: int, tax: int) -> None:
    assert vat_included(gross, rate) == tax


@given(st.integers(0, 10**12), st.integers(0, 10_000))
def test_vat_is_the_nearest_integer_to_the_exact_share(gross: int, rate: int) -> None:
    exact = Fraction(gross * rate, 10_000 + rate)
    tax = vat_included(gross, rate)
    assert exact - Fraction(1, 2) < tax <= exact + Fraction(1, 2)
    assert 0 <= tax <= gross


def test_flat_energy_for_a_meter_counting_energy() -> None:
    result = split(FLAT, 10000, ENERGY)  # 100.00 at 25.00/kWh
    assert (result.wh, result.credit_amount, result.credit_value, result.change_out) == (
        4000,
        4000,
        10000,
        0,
    )
    odd = split(FLAT, 1001, ENERGY)  # 10.01 buys 400.4 Wh: 400 Wh for 10.00, 0.01 held
    assert (odd.wh, odd.credit_value, odd.change_out) == (400, 1000, 1)
    again = split(FLAT, 1001, Situation(credit_unit="energy", change=1))
    assert (again.wh, again.change_in, again.change_out) == (400, 1, 2)


def test_a_money_meter_is_credited_all_the_energy_money() -> None:
    result = split(TOU, 10000, Situation())
    assert (result.credit_unit, result.credit_amount, result.credit_value) == (
        "money",
        10000,
        10000,
    )
    assert result.wh == 4000  # what it buys at rate 1; the meter applies its own rates


def test_a_token_takes_whole_tenths_of_a_kwh() -> None:
    result = split(FLAT, 1001, TOKEN)
    assert (result.wh, result.credit_value, result.change_out) == (400, 1000, 1)
    small = split(FLAT, 24, TOKEN)  # 0.24 buys 9.6 Wh: no whole 0.1 kWh, all held as change
    assert (small.wh, small.credit_value, small.change_out) == (0, 0, 24)


def test_the_split_of_a_block_tariff_payment() -> None:
    result = split(BLOCK, 100_000, Situation(debt=5000, credit_unit="energy", step_wh=100))
    assert result.document() == {
        "amount": 100_000,
        "debt_recovered": 5000,  # 25 % would be 250.00: the debt is 50.00
        "fee": 3000,
        "service_charge": 20000,
        "tax": 414 + 2759 + 9931,
        "energy_gross": 72000,
        "energy_net": 62069,
        "change_in": 0,
        "change_out": 69,
        "credit_unit": "energy",
        "credit_value": 62000,  # 50 kWh at 12.00 + 1 kWh at 20.00
        "credit_amount": 51000,
        "wh": 51000,
    }


@pytest.mark.parametrize(
    ("month_wh", "money", "wh"),
    [
        (0, 60000, 50000),  # exactly the first block
        (0, 60002, 50001),  # into the second
        (40000, 12000, 10000),  # the rest of the first block
        (50000, 2000, 1000),  # the second block's price
        (200_000, 3000, 1000),  # beyond the last block: the tariff's price
        (0, 60000 + 300_000 + 3000, 201_000),  # through every block
    ],
)
def test_block_energy_follows_the_month(month_wh: int, money: int, wh: int) -> None:
    assert energy_for(BLOCK, month_wh, money) == wh


@given(st.integers(0, 400_000), st.integers(0, 10**7))
def test_energy_bought_never_costs_more_than_the_money(month_wh: int, money: int) -> None:
    wh = energy_for(BLOCK, month_wh, money)
    assert cost_milli(BLOCK, month_wh, wh) <= money * 1000
    assert cost_milli(BLOCK, month_wh, wh + 1) > money * 1000


def test_the_service_charge_comes_from_the_months_first_payments() -> None:
    first = split(BLOCK, 15000, Situation())
    assert (first.fee, first.service_charge, first.energy_gross) == (3000, 12000, 0)
    second = split(BLOCK, 15000, Situation(service_paid=12000))
    assert (second.fee, second.service_charge, second.energy_gross) == (3000, 8000, 4000)
    third = split(BLOCK, 15000, Situation(service_paid=20000))
    assert (third.service_charge, third.energy_gross) == (0, 12000)


def test_debt_takes_its_share_and_never_more_than_is_owed() -> None:
    assert split(BLOCK, 40000, Situation(debt=100_000)).debt_recovered == 10000
    assert split(BLOCK, 40000, Situation(debt=1)).debt_recovered == 1
    assert split(BLOCK, 40000, Situation()).debt_recovered == 0


@pytest.mark.parametrize(
    ("amount", "why"), [(999, "minimum"), (5_000_001, "maximum"), (0, "positive")]
)
def test_amounts_outside_the_vend_limits_are_refused(amount: int, why: str) -> None:
    with pytest.raises(AmountOutOfBounds, match=why) as caught:
        split(BLOCK, amount, Situation())
    assert caught.value.code is Code.AMOUNT_OUT_OF_BOUNDS


def test_free_energy_cannot_be_sold_as_energy() -> None:
    free = TariffRecord("FREE", "KES", -2, (0,), 0, 0)
    with pytest.raises(NotPriceable) as caught:
        split(free, 1000, ENERGY)
    assert caught.value.code is Code.NOT_VENDABLE
    assert split(free, 1000, Situation()).credit_amount == 1000


@given(
    st.integers(1, 10**9),
    st.integers(0, 10**7),
    st.integers(0, 30000),
    st.integers(0, 500_000),
    st.integers(0, 999),
    st.sampled_from([1, 100]),
    st.sampled_from(["money", "energy"]),
)
def test_every_split_adds_up(
    amount: int, debt: int, paid: int, month: int, change: int, step: int, unit: str
) -> None:
    tariff = TariffRecord(
        "T", "KES", -2, (3000,), 0, 0, blocks=BLOCK.blocks, fee=3000, service_charge=20000,
        vat_bp=1600, debt_share_bp=2500,
    )  # fmt: skip
    situation = Situation(
        debt, paid, month, change, "energy" if unit == "energy" else "money", step
    )
    s = split(tariff, amount, situation)
    assert s.amount == s.debt_recovered + s.fee + s.service_charge + s.energy_gross
    assert s.energy_net + s.change_in == s.credit_value + s.change_out
    assert min(s.debt_recovered, s.fee, s.service_charge, s.tax, s.credit_value, s.wh) >= 0
    assert s.change_out >= 0
    assert s.wh % (step if unit == "energy" else 1) == 0
    assert s.debt_recovered <= debt


def test_a_tariff_definition_round_trips_and_old_ones_still_read() -> None:
    document = tariff_document(BLOCK)
    again = tariff_from(
        "BLOCK", currency="KES", currency_scale=-2, low_threshold=5000, critical_threshold=1000,
        document=document,
    )  # fmt: skip
    assert again == BLOCK
    old = {"prices": [2500, 1200], "calendar": {"friendly_hours": [[1080, 1440]]}}
    tou = tariff_from(
        "TOU", currency="KES", currency_scale=-2, low_threshold=5000, critical_threshold=1000,
        document=old,
    )  # fmt: skip
    assert (tou.kind, tou.fee, tou.vat_bp, tou.max_vend, tou.blocks) == ("tou", 0, 0, None, ())
    assert tariff_document(FLAT) == {
        "prices": [2500],
        "calendar": tariff_document(FLAT)["calendar"],
    }


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"prices": (1, 2), "blocks": (Block(100, 1),)}, "one --price"),
        ({"blocks": (Block(100, 1), Block(100, 2))}, "each above"),
        ({"vat_bp": 10001}, "basis points"),
        ({"fee": -1}, "fee"),
        ({"min_vend": 500, "max_vend": 100}, "max_vend"),
    ],
)
def test_bad_tariffs_are_refused(kwargs: dict, why: str) -> None:  # type: ignore[type-arg]
    values = {"prices": (2500,)} | kwargs
    with pytest.raises(ValidationError, match=why):
        TariffRecord("T", "KES", -2, low_threshold=0, critical_threshold=0, **values)


def test_percent_and_block_options_parse_exactly() -> None:
    assert parse_percent("16", "--vat") == 1600
    assert parse_percent("7.5", "--vat") == 750
    assert parse_block("50:1200") == (50000, 1200)
    assert parse_block("0.5:900") == (500, 900)
    for bad in ("x", "16.001", "101"):
        with pytest.raises(ValidationError, match="--vat"):
            parse_percent(bad, "--vat")
    with pytest.raises(ValidationError, match="--block"):
        parse_block("50")


def test_the_receipt_lists_every_line() -> None:
    answer = {
        "receipt": 7,
        "paid_at": "2026-03-01T12:00:00+00:00",
        "channel": "COUNTER-1",
        "reference": "R-1",
        "account": "A-1",
        "meter": "STS-1",
        "tariff": "BLOCK",
        "currency": "KES",
        "currency_scale": -2,
        "split": split(
            BLOCK, 100_000, Situation(debt=5000, credit_unit="energy", step_wh=100)
        ).document(),
        "token": "34266232369846536054",
        "delivery": {"kind": "token", "number": 1, "state": "issued"},
    }
    text = receipt_text(answer)
    for line in (
        "RECEIPT 00000007",
        "amount paid 1000.00 KES",
        "fee         30.00 KES",
        "service     200.00 KES",
        "debt        50.00 KES",
        "VAT incl.   131.04 KES",
        "credit      51.000 kWh (620.00 KES)",
        "change held 0.69 KES",
        "TOKEN       3426 6232 3698 4653 6054",
    ):
        assert line in text.splitlines(), line
    assert receipt_text(answer, "reversed").endswith("REVERSED\n")
