"""Validation of what meters report, the way meter-data management does it.

Every stored reading and interval carries the flags found here with their reasons; nothing is
dropped silently and nothing suspicious is accepted silently. Estimated intervals (a gap the
meter can no longer fill, spread from the cumulative register) are marked as such and kept apart
from actual reads. Pure: integers in, integers and text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag
from typing import Final

from protocols.errors import ValidationError
from protocols.readings import MeterSnapshot, ProfileRow


class Flag(IntFlag):
    """Why a stored value is suspect (``flags`` column of readings and intervals)."""

    ENERGY_BACKWARDS = 1 << 0  # the register is below an earlier reading
    IMPLAUSIBLE_JUMP = 1 << 1  # more energy than the meter can pass in the time elapsed
    RATES_DO_NOT_SUM = 1 << 2  # the rate registers do not add up to the total
    CLOCK_SKEW = 1 << 3  # the meter's clock is off the head-end's by more than allowed
    GAP_BEFORE = 1 << 4  # intervals are missing before this one
    TIME_BACKWARDS = 1 << 5  # the meter's time is before an earlier reading's
    INTERVAL_MISMATCH = 1 << 6  # an interval's energy differs from its register difference
    ESTIMATED = 1 << 7  # not read: spread from the cumulative register across a gap


NO_FLAGS: Final = Flag(0)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a meter can physically do, and how far its clock may drift."""

    max_power_w: int = 24_000  # e.g. a 100 A single-phase supply at 240 V
    clock_tolerance_s: int = 300

    def __post_init__(self) -> None:
        if self.max_power_w <= 0 or self.clock_tolerance_s < 0:
            raise ValidationError("max_power_w is positive and clock_tolerance_s not negative")

    def max_energy_wh(self, seconds: int) -> int:
        """The most energy (Wh, rounded up) the supply can pass in ``seconds``."""
        return -(-max(seconds, 0) * self.max_power_w // 3600)


@dataclass(frozen=True, slots=True)
class Findings:
    flags: Flag = NO_FLAGS
    reasons: tuple[str, ...] = ()

    def add(self, flag: Flag, reason: str) -> Findings:
        return Findings(self.flags | flag, (*self.reasons, reason))

    @property
    def reason(self) -> str | None:
        """The reasons as one text for the ``flag_reason`` column (None when clean)."""
        return "; ".join(self.reasons) or None


@dataclass(frozen=True, slots=True)
class Previous:
    """What the store already holds for a meter: its latest reading's time and register."""

    meter_time: int
    energy_import_wh: int


def validate_reading(
    snapshot: MeterSnapshot, previous: Previous | None, head_end_time: int, limits: Limits
) -> Findings:
    """Findings for one snapshot against the meter's previous stored reading and the
    head-end's clock (both in seconds since the epoch)."""
    return validate_registers(
        snapshot.time,
        snapshot.energy_import_wh,
        snapshot.energy_rates_wh,
        previous=previous,
        head_end_time=head_end_time,
        limits=limits,
    )


def validate_registers(
    meter_time: int,
    energy_import_wh: int,
    energy_rates_wh: Sequence[int],
    *,
    previous: Previous | None,
    head_end_time: int,
    limits: Limits,
) -> Findings:
    """:func:`validate_reading` of a reading given by the values it checks: the meter's time,
    its import register and its rate registers."""
    found = Findings()
    rates = sum(energy_rates_wh)
    if rates != energy_import_wh:
        found = found.add(
            Flag.RATES_DO_NOT_SUM,
            f"rate registers sum to {rates} Wh, the total is {energy_import_wh} Wh",
        )
    skew = meter_time - head_end_time
    if abs(skew) > limits.clock_tolerance_s:
        found = found.add(
            Flag.CLOCK_SKEW,
            f"meter clock {'ahead' if skew > 0 else 'behind'} by {abs(skew)} s "
            f"(allowed {limits.clock_tolerance_s} s)",
        )
    if previous is None:
        return found
    elapsed = meter_time - previous.meter_time
    if elapsed < 0:
        found = found.add(
            Flag.TIME_BACKWARDS, f"meter time {-elapsed} s before the previous reading's"
        )
    delta = energy_import_wh - previous.energy_import_wh
    if delta < 0:
        found = found.add(
            Flag.ENERGY_BACKWARDS,
            f"energy register went back {-delta} Wh since the previous reading",
        )
    elif delta > limits.max_energy_wh(elapsed):
        found = found.add(
            Flag.IMPLAUSIBLE_JUMP,
            f"{delta} Wh in {max(elapsed, 0)} s is above the {limits.max_power_w} W the "
            "supply can pass",
        )
    return found


@dataclass(frozen=True, slots=True)
class CheckedInterval:
    """A load-profile interval ready to store: ``start`` = its end minus the period."""

    start: int
    period: int
    energy_wh: int
    register_wh: int
    credit: int
    status: int
    findings: Findings
    estimated: bool = False


def check_intervals(
    rows: list[ProfileRow],
    period: int,
    last_stored: CheckedInterval | None,
    limits: Limits,
) -> tuple[list[CheckedInterval], list[tuple[int, int]]]:
    """Validate profile rows (oldest first) after the last stored interval.

    Returns the checked intervals and the gaps ``(first missing start, last missing start)``
    between consecutive intervals (including the one before the first row)."""
    if period <= 0:
        raise ValidationError("an interval period is positive")
    checked: list[CheckedInterval] = []
    gaps: list[tuple[int, int]] = []
    before = last_stored
    for row in sorted(rows, key=lambda r: r.time):
        start = row.time - period
        if before is not None and start <= before.start:
            continue  # stored already (a repeat read), or older than what is stored
        found = Findings()
        if before is not None:
            expected = before.start + period
            if start > expected:
                gaps.append((expected, start - period))
                found = found.add(
                    Flag.GAP_BEFORE, f"{(start - expected) // period} interval(s) missing before"
                )
            delta = row.energy_import_wh - before.register_wh
            if delta < 0:
                found = found.add(Flag.ENERGY_BACKWARDS, f"register went back {-delta} Wh")
            elif start == expected and delta != row.interval_wh:
                found = found.add(
                    Flag.INTERVAL_MISMATCH,
                    f"interval {row.interval_wh} Wh, register moved {delta} Wh",
                )
        if row.interval_wh < 0:
            found = found.add(Flag.ENERGY_BACKWARDS, f"negative interval {row.interval_wh} Wh")
        elif row.interval_wh > limits.max_energy_wh(period):
            found = found.add(
                Flag.IMPLAUSIBLE_JUMP,
                f"{row.interval_wh} Wh in {period} s is above {limits.max_power_w} W",
            )
        interval = CheckedInterval(
            start, period, row.interval_wh, row.energy_import_wh, row.credit, row.status, found
        )
        checked.append(interval)
        before = interval
    return checked, gaps


def estimate_gap(before: CheckedInterval, after: CheckedInterval) -> list[CheckedInterval]:
    """Estimated intervals for the gap between two actual ones: the register's movement across
    the gap, less the later interval's own energy, spread evenly (exact in whole Wh: the
    remainder goes to the earliest intervals). Empty when there is no gap or the register went
    back (nothing sound to spread)."""
    period = before.period
    missing = (after.start - before.start) // period - 1
    if missing <= 0:
        return []
    energy = after.register_wh - after.energy_wh - before.register_wh
    if energy < 0:
        return []
    share, remainder = divmod(energy, missing)
    estimates: list[CheckedInterval] = []
    register = before.register_wh
    for n in range(missing):
        wh = share + (1 if n < remainder else 0)
        register += wh
        estimates.append(
            CheckedInterval(
                start=before.start + (n + 1) * period,
                period=period,
                energy_wh=wh,
                register_wh=register,
                credit=before.credit,
                status=before.status,
                findings=Findings(
                    Flag.ESTIMATED, (f"estimated: {energy} Wh spread over {missing} intervals",)
                ),
                estimated=True,
            )
        )
    return estimates
