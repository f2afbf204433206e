"""Pure rules for what meters report: validation flags, gap estimates, health, poll slots."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headend.domain.health import Health, after_read
from headend.domain.schedule import next_due, retry_delay, slot
from headend.domain.validation import (
    CheckedInterval,
    Findings,
    Flag,
    Limits,
    Previous,
    check_intervals,
    estimate_gap,
    validate_reading,
    validate_registers,
)
from protocols.disconnect import ControlState
from protocols.errors import ValidationError
from protocols.readings import MeterSnapshot, ProfileRow, StatusFlag

T0 = 1_767_225_600
LIMITS = Limits(max_power_w=3600, clock_tolerance_s=60)  # 1 Wh per second at most

SNAP = MeterSnapshot(
    meter_id="M-1", time=T0, energy_import_wh=1000, energy_rates_wh=(600, 400, 0, 0), power_w=500,
    voltage_dv=2300, current_ma=2000, power_factor_milli=990, frequency_chz=5000, credit=100,
    emergency_credit=0, debt=0, credit_unit=2, currency="KES", currency_scale=-2,
    low_credit_threshold=10, control_state=ControlState.CONNECTED, control_mode=6,
    status=StatusFlag.IN_CREDIT, last_event_seq=1, last_transfer=0, last_command_seq=0,
)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "previous", "now", "flags"),
    [
        ({}, None, T0, Flag(0)),
        ({}, Previous(T0 - 100, 950), T0, Flag(0)),
        ({}, Previous(T0 - 100, 1001), T0, Flag.ENERGY_BACKWARDS),
        ({}, Previous(T0 - 10, 900), T0, Flag.IMPLAUSIBLE_JUMP),  # 100 Wh in 10 s
        ({}, Previous(T0 + 5, 1000), T0, Flag.TIME_BACKWARDS),
        ({"energy_rates_wh": (600, 300, 0, 0)}, None, T0, Flag.RATES_DO_NOT_SUM),
        ({}, None, T0 + 61, Flag.CLOCK_SKEW),
        ({}, None, T0 - 60, Flag(0)),
        (
            {"energy_rates_wh": (0, 0, 0, 0)},
            Previous(T0 - 1, 0),
            T0 + 3600,
            Flag.RATES_DO_NOT_SUM | Flag.CLOCK_SKEW | Flag.IMPLAUSIBLE_JUMP,
        ),
    ],
)
def test_reading_findings(
    change: dict[str, object], previous: Previous | None, now: int, flags: Flag
) -> None:
    snapshot = replace(SNAP, **change)  # type: ignore[arg-type]
    found = validate_reading(snapshot, previous, now, LIMITS)
    assert found.flags == flags
    assert len(found.reasons) == bin(flags).count("1")
    assert (found.reason is None) == (flags == 0)
    by_values = validate_registers(
        snapshot.time,
        snapshot.energy_import_wh,
        list(snapshot.energy_rates_wh),
        previous=previous,
        head_end_time=now,
        limits=LIMITS,
    )
    assert by_values == found


def test_a_reason_names_the_numbers() -> None:
    found = validate_reading(SNAP, Previous(T0 - 100, 1200), T0, LIMITS)
    assert found.reason == "energy register went back 200 Wh since the previous reading"


def _rows(*items: tuple[int, int, int]) -> list[ProfileRow]:
    """(end time, register, interval energy)"""
    return [ProfileRow(t, reg, wh, 100, 1) for t, reg, wh in items]


def test_contiguous_intervals_are_clean_and_a_repeat_is_skipped() -> None:
    rows = _rows((T0 + 900, 10, 10), (T0 + 1800, 25, 15), (T0 + 2700, 25, 0))
    checked, gaps = check_intervals(rows, 900, None, LIMITS)
    assert [c.start for c in checked] == [T0, T0 + 900, T0 + 1800]
    assert all(c.findings.flags == 0 for c in checked)
    assert gaps == []
    again, _ = check_intervals(rows, 900, checked[-1], LIMITS)
    assert again == []


def test_a_gap_a_mismatch_and_a_jump_are_flagged() -> None:
    last = CheckedInterval(T0, 900, 10, 10, 100, 1, Findings())
    rows = _rows(
        (T0 + 1800, 30, 20),  # the interval after `last`: clean
        (T0 + 4500, 60, 10),  # three intervals later: a gap of two
        (T0 + 5400, 65, 9),  # register moved 5, interval says 9
        (T0 + 6300, 5000, 4935),  # 4935 Wh in 900 s > 900 Wh
    )
    checked, gaps = check_intervals(rows, 900, last, LIMITS)
    assert [c.findings.flags for c in checked] == [
        Flag(0),
        Flag.GAP_BEFORE,
        Flag.INTERVAL_MISMATCH,
        Flag.IMPLAUSIBLE_JUMP,
    ]
    assert gaps == [(T0 + 1800, T0 + 2700)]
    estimates = estimate_gap(checked[0], checked[1])
    assert [e.start for e in estimates] == [T0 + 1800, T0 + 2700]
    assert [e.energy_wh for e in estimates] == [10, 10]  # 60 - 10 - 30 = 20 over two
    assert all(e.estimated and e.findings.flags == Flag.ESTIMATED for e in estimates)


@given(
    missing=st.integers(1, 200),
    energy=st.integers(0, 10**7),
    after_wh=st.integers(0, 1000),
    start_register=st.integers(0, 10**9),
)
def test_estimates_spread_exactly_what_the_register_moved(
    missing: int, energy: int, after_wh: int, start_register: int
) -> None:
    before = CheckedInterval(T0, 900, 1, start_register, 0, 0, Findings())
    after_start = T0 + (missing + 1) * 900
    after = CheckedInterval(
        after_start, 900, after_wh, start_register + energy + after_wh, 0, 0, Findings()
    )
    estimates = estimate_gap(before, after)
    assert len(estimates) == missing
    assert sum(e.energy_wh for e in estimates) == energy
    assert max(e.energy_wh for e in estimates) - min(e.energy_wh for e in estimates) <= 1
    assert estimates[-1].register_wh == after.register_wh - after.energy_wh


def test_no_estimate_across_a_register_that_went_back() -> None:
    before = CheckedInterval(T0, 900, 1, 100, 0, 0, Findings())
    after = CheckedInterval(T0 + 2700, 900, 1, 50, 0, 0, Findings())
    assert estimate_gap(before, after) == []
    assert estimate_gap(before, before) == []


@pytest.mark.parametrize(
    ("health", "failures", "ok", "expected", "count", "changed"),
    [
        (Health.UNKNOWN, 0, True, Health.ONLINE, 0, True),
        (Health.ONLINE, 0, True, Health.ONLINE, 0, False),
        (Health.ONLINE, 0, False, Health.DEGRADED, 1, True),
        (Health.DEGRADED, 1, False, Health.DEGRADED, 2, False),
        (Health.DEGRADED, 2, False, Health.UNREACHABLE, 3, True),
        (Health.UNREACHABLE, 7, False, Health.UNREACHABLE, 8, False),
        (Health.UNREACHABLE, 8, True, Health.ONLINE, 0, True),
        (Health.UNKNOWN, 0, False, Health.DEGRADED, 1, True),
    ],
)
def test_health_table(
    health: Health, failures: int, ok: bool, expected: Health, count: int, changed: bool
) -> None:
    new, new_count, change = after_read(health, failures, ok, "timed out")
    assert (new, new_count, change is not None) == (expected, count, changed)
    if change is not None:
        assert (change.old, change.new) == (health, expected)


def test_slots_spread_a_fleet_over_the_interval() -> None:
    interval = 900.0
    offsets = sorted(slot(f"MTR-{n:05d}", interval) for n in range(10_000))
    assert all(0 <= o < interval for o in offsets)
    buckets = [0] * 10
    for offset in offsets:
        buckets[int(offset // 90)] += 1
    assert min(buckets) > 850  # about 1,000 per tenth of the interval
    assert slot("MTR-00001", interval) == slot("MTR-00001", interval)
    due = next_due("MTR-00001", interval, T0)
    assert T0 < due <= T0 + interval
    assert next_due("MTR-00001", interval, due) == due + interval


@pytest.mark.parametrize(
    ("attempt", "draw", "delay"), [(0, 0.0, 0.5), (1, 0.5, 1.5), (10, 0.999, 29.985)]
)
def test_retry_delays(attempt: int, draw: float, delay: float) -> None:
    assert retry_delay(attempt, 1.0, 30.0, draw) == pytest.approx(delay)


@pytest.mark.parametrize("args", [(-1, 1.0, 2.0, 0.0), (0, 1.0, 2.0, 1.0), (0, 0.0, 1.0, 0.1)])
def test_bad_retry_arguments(args: tuple[int, float, float, float]) -> None:
    with pytest.raises(ValidationError):
        retry_delay(*args)
