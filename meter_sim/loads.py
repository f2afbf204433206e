"""Load models: the power a household draws at a moment, in whole watts.

A model is a pure function of time (the same moment always gives the same demand), so a meter's
consumption does not depend on how often it is advanced.

The models here are also piecewise constant, and say so: ``segment(t)`` gives the demand at
``t`` and the end of the segment it holds over (the first moment at which it may change). The
firmware's event-driven integration (``Meter.advance(..., integration="events")``) uses it to
integrate whole runs of steps at once; a model without ``segment`` is integrated step by step.
"""

from __future__ import annotations

import csv
import itertools
import math
import random
import zlib
from array import array
from bisect import bisect_right
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from meter_sim.config import LoadConfig, MeterConfig
from protocols.errors import ConfigError

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """splitmix64 finaliser: a fast, well-spread integer hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def unit_noise(seed: int, slot: int) -> float:
    """A deterministic number in [0, 1) for (seed, slot)."""
    return _mix(seed * 0x100000001B3 ^ slot) / 2**64


class LoadModel(Protocol):
    def demand(self, t: float) -> int:
        """Watts drawn at ``t`` (epoch seconds)."""
        ...


class SegmentedLoad(LoadModel, Protocol):
    def segment(self, t: float) -> tuple[int, float]:
        """``(demand(t), end)``: the demand is ``demand(t)`` at every moment of ``[t, end)``.
        ``end`` may come before the real change (never after it), never at or before ``t``;
        ``math.inf`` when the demand never changes."""
        ...


# A load may also offer, for whole seconds:
# * ``segments(start, stop) -> [(watts, end), ...]``: the segments that cover ``[start, stop)``
#   in order, each as ``segment`` gives it and beginning where the previous one ends (the
#   firmware then asks once per run instead of once per segment);
# * ``aligned(step, offset) -> bool`` and ``watt_seconds(start, stops) -> [int, ...]``: whether
#   every change of its demand falls on the grid of ``step`` on a clock ``offset`` ahead (no
#   step then spans a change), and its integral from ``start`` to each of ``stops``; the
#   firmware then takes a run's energy from the integral.


class ConstantLoad:
    def __init__(self, watts: int) -> None:
        if watts < 0:
            raise ConfigError("a constant load is at least 0 W")
        self.watts = watts

    def demand(self, t: float) -> int:
        return self.watts

    def segment(self, t: float) -> tuple[int, float]:
        return self.watts, math.inf

    def aligned(self, step: int, offset: int) -> bool:
        return True

    def watt_seconds(self, start: int, stops: list[int]) -> list[int]:
        return [self.watts * (stop - start) for stop in stops]


# Relative demand by hour of the day (mean 1.0): night base, morning and evening peaks.
_WEEKDAY_SHAPE = (
    0.45, 0.40, 0.38, 0.37, 0.38, 0.50, 0.95, 1.45, 1.30, 0.90, 0.80, 0.80,
    0.85, 0.80, 0.75, 0.80, 0.95, 1.30, 1.95, 2.20, 2.00, 1.60, 1.10, 0.70,
)  # fmt: skip
_WEEKEND_SHAPE = (
    0.50, 0.45, 0.40, 0.38, 0.38, 0.42, 0.55, 0.80, 1.20, 1.45, 1.40, 1.30,
    1.30, 1.20, 1.10, 1.10, 1.20, 1.45, 1.85, 2.00, 1.85, 1.50, 1.10, 0.75,
)  # fmt: skip
_SHAPE_MEAN = (sum(_WEEKDAY_SHAPE) * 5 + sum(_WEEKEND_SHAPE) * 2) / (24 * 7)
_SPIKE_CHANCE = 0.04
_SPIKE_SIZE = 3.0  # an appliance draws 3 to 6 times the mean
_BASE_SHARE = 1 - _SPIKE_CHANCE * _SPIKE_SIZE * 1.5  # so that the long-run mean is mean_watts


def _slot_base(shape: tuple[float, ...], slot: int) -> float:
    """The day's shape at the start of a slot of the day, interpolated between the hours."""
    hour, rest = divmod(slot * ResidentialLoad.SLOT, 3600)
    frac = rest / 3600
    return shape[hour] * (1 - frac) + shape[(hour + 1) % 24] * frac


class ResidentialLoad:
    """A seeded synthetic household: daily and weekly shape, with noise per five-minute slot
    and occasional appliance spikes (kettle, iron) lasting a slot.

    The demand is constant over each slot (local time, aligned to the hour): the shape is
    interpolated at the slot's start, times a noise factor, plus an appliance now and then.
    A day's slots are drawn together, from a random generator seeded by (seed, day) (Python's
    Mersenne Twister, whose ``random()`` sequence for a seed Python keeps from version to
    version), into a table of the watt-seconds from the day's start to each slot's start; the
    last two days drawn are kept, so a demand costs a look-up and so does the energy between
    any two moments (:meth:`watt_seconds`).
    """

    SLOT = 300

    def __init__(self, mean_watts: int, seed: int, timezone_minutes: int = 0) -> None:
        if mean_watts < 0:
            raise ConfigError("a residential load's mean is at least 0 W")
        self.mean_watts = mean_watts
        self.seed = seed
        self.offset = timezone_minutes * 60
        self._scale = mean_watts * _BASE_SHARE / _SHAPE_MEAN
        self._days: dict[int, array[int]] = {}

    def _table(self, day: int) -> array[int]:
        """Watt-seconds from the start of local ``day`` to the start of each of its slots
        (and to its end): ``_SLOTS_A_DAY + 1`` entries."""
        table = self._days.get(day)
        if table is not None:
            return table
        draw = random.Random((self.seed << 32) ^ (day & _MASK64)).random
        scale = self._scale
        spike = self.mean_watts * _SPIKE_SIZE
        size = self.SLOT
        # every term is >= 0 (a mean of at least 0 W, a positive shape, draws in [0, 1)), so
        # no slot's watts round below 0; scale * base is what ``scale * base * x`` multiplies
        # first, so taking it from a table changes no bit
        weekend = (day + 3) % 7 >= 5  # 1970-01-01 was a Thursday
        slots: list[int] = []
        append = slots.append
        for scaled in (scale * base for base in _SLOT_BASE[weekend]):
            watts = scaled * (0.75 + 0.5 * draw())
            if draw() < _SPIKE_CHANCE:  # an appliance for this slot
                watts += spike * (1 + draw())
            append(round(watts) * size)
        table = array("q", itertools.accumulate(slots, initial=0))
        if len(self._days) >= 2:
            del self._days[next(iter(self._days))]
        self._days[day] = table
        return table

    def demand(self, t: float) -> int:
        day, index = divmod(math.floor((t + self.offset) / self.SLOT), _SLOTS_A_DAY)
        table = self._table(day)
        return (table[index + 1] - table[index]) // self.SLOT

    def segment(self, t: float) -> tuple[int, float]:
        slot = math.floor((t + self.offset) / self.SLOT)
        day, index = divmod(slot, _SLOTS_A_DAY)
        table = self._table(day)
        return (table[index + 1] - table[index]) // self.SLOT, (slot + 1) * self.SLOT - self.offset

    def segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``segment(t)`` for every slot that ``[start, stop)`` (whole seconds) touches, in
        order: ``[(watts, end), ...]``, each slot beginning where the one before ends."""
        offset = self.offset
        size = self.SLOT
        out: list[tuple[int, int]] = []
        for slot in range((start + offset) // size, (stop - 1 + offset) // size + 1):
            day, index = divmod(slot, _SLOTS_A_DAY)
            table = self._table(day)
            out.append(((table[index + 1] - table[index]) // size, (slot + 1) * size - offset))
        return out

    def aligned(self, step: int, offset: int) -> bool:
        """Whether every slot boundary is a multiple of ``step`` on a clock ``offset`` seconds
        ahead of true time (and no step spans two slots): then the steps of that grid draw
        exactly the energy :meth:`watt_seconds` integrates."""
        return self.SLOT % step == 0 and (offset - self.offset) % step == 0

    def watt_seconds(self, start: int, stops: list[int]) -> list[int]:
        """The energy drawn from ``start`` to each of ``stops`` (whole seconds, each at or
        after ``start``)."""
        size = self.SLOT
        first, since = divmod(start + self.offset, 86400)
        table = self._days.get(first) or self._table(first)
        index, into = divmod(since, size)
        origin = table[index] + (table[index + 1] - table[index]) * into // size if into else 0
        if not into:
            origin = table[index]
        out: list[int] = []
        for stop in stops:
            day, until = divmod(stop + self.offset, 86400)
            if day != first:
                out.append(self._across(first, since, day, until))
                continue
            index, into = divmod(until, size)
            upto = table[index]
            if into:
                upto += (table[index + 1] - upto) * into // size
            out.append(upto - origin)
        return out

    def _across(self, first: int, since: int, last: int, until: int) -> int:
        """Watt-seconds from ``since`` of local day ``first`` to ``until`` of a later day."""
        total = self._table(first)[-1] - self._within(first, since)
        for day in range(first + 1, last):
            total += self._table(day)[-1]
        return total + self._within(last, until)

    def _within(self, day: int, second: int) -> int:
        """Watt-seconds from the start of local ``day`` to its ``second``."""
        table = self._table(day)
        index, into = divmod(second, self.SLOT)
        if not into:
            return table[index]
        return table[index] + (table[index + 1] - table[index]) * into // self.SLOT


class CsvLoad:
    """Replay of a CSV of ``timestamp,watts`` rows (ISO-8601 or epoch seconds), held step-wise.
    Moments past the last row wrap around to the first, so a day's recording repeats."""

    def __init__(self, path: Path) -> None:
        self.path = path
        times: list[float] = []
        watts: list[int] = []
        try:
            with path.open(newline="") as handle:
                for number, row in enumerate(csv.reader(handle), start=1):
                    if not row or row[0].startswith("#"):
                        continue
                    if number == 1 and not _looks_numeric_time(row[0]):
                        continue  # a header
                    if len(row) < 2:
                        raise ConfigError(f"{path}:{number}: expected timestamp,watts")
                    times.append(_parse_timestamp(row[0], path, number))
                    try:
                        value = int(row[1])
                    except ValueError as exc:
                        raise ConfigError(
                            f"{path}:{number}: watts {row[1]!r} is not an integer"
                        ) from exc
                    if value < 0:
                        raise ConfigError(f"{path}:{number}: watts must be >= 0")
                    watts.append(value)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from exc
        if len(times) < 2:
            raise ConfigError(f"{path}: a load CSV needs at least two rows")
        if any(b <= a for a, b in itertools.pairwise(times)):
            raise ConfigError(f"{path}: timestamps must increase")
        self.times = times
        self.watts = watts
        self.span = times[-1] - times[0] + (times[-1] - times[-2])

    def demand(self, t: float) -> int:
        start = self.times[0]
        offset = (t - start) % self.span
        index = bisect_right(self.times, start + offset) - 1
        return self.watts[max(index, 0)]

    def segment(self, t: float) -> tuple[int, float]:
        start = self.times[0]
        offset = (t - start) % self.span
        index = max(bisect_right(self.times, start + offset) - 1, 0)
        following = self.times[index + 1] if index + 1 < len(self.times) else start + self.span
        # float rounding of the wrap-around must not carry the end past the real change
        gap = following - (start + offset)
        return self.watts[index], t + max(gap - _CSV_MARGIN, gap / 2)


_CSV_MARGIN = 1e-3  # s: far above the rounding of epoch seconds, far below a recording's rows


def _looks_numeric_time(text: str) -> bool:
    return text.strip()[:1].isdigit()


def _parse_timestamp(text: str, path: Path, number: int) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{path}:{number}: not a timestamp: {text!r}") from exc
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def load_for(config: MeterConfig) -> LoadModel:
    """The load model a meter's configuration asks for (a CSV load reads its file here, once).

    Whoever builds a :class:`~meter_sim.firmware.Meter` builds its load with this and hands it
    over: the firmware opens no file.
    """
    return make_load(config.load, config.meter_id, config.timezone_minutes)


def make_load(config: LoadConfig, meter_id: str, timezone_minutes: int = 0) -> LoadModel:
    if config.model == "constant":
        return ConstantLoad(config.watts)
    if config.model == "residential":
        seed = config.seed if config.seed is not None else zlib.crc32(meter_id.encode())
        return ResidentialLoad(config.mean_watts, seed, timezone_minutes)
    if config.model == "csv":
        if not config.csv_path:
            raise ConfigError("load.model = 'csv' needs load.csv_path")
        return CsvLoad(Path(config.csv_path))
    raise ConfigError(f"unknown load model {config.model!r}")


_SLOTS_A_DAY = 86400 // ResidentialLoad.SLOT
#: the shape at each slot's start, weekdays (False) and weekends (True)
_SLOT_BASE = {
    weekend: tuple(_slot_base(shape, slot) for slot in range(_SLOTS_A_DAY))
    for weekend, shape in ((False, _WEEKDAY_SHAPE), (True, _WEEKEND_SHAPE))
}
