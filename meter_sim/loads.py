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
import zlib
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


# A load may also offer ``segments(start, stop) -> [(watts, end), ...]`` (whole seconds): the
# segments that cover ``[start, stop)`` in order, each as ``segment`` gives it and beginning
# where the previous one ends; the firmware then asks once per run instead of once per segment.


class ConstantLoad:
    def __init__(self, watts: int) -> None:
        if watts < 0:
            raise ConfigError("a constant load is at least 0 W")
        self.watts = watts

    def demand(self, t: float) -> int:
        return self.watts

    def segment(self, t: float) -> tuple[int, float]:
        return self.watts, math.inf


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
_SPIKE_BITS = 16  # the low bits of a slot's hash decide a spike, the high ones give the noise
_SPIKE_MASK = (1 << _SPIKE_BITS) - 1
_SPIKE_BELOW = round(_SPIKE_CHANCE * (1 << _SPIKE_BITS))
_NOISE_SPAN = float(1 << (64 - _SPIKE_BITS))


def _slot_base(shape: tuple[float, ...], slot: int) -> float:
    """The day's shape at the start of a slot of the day, interpolated between the hours."""
    hour, rest = divmod(slot * ResidentialLoad.SLOT, 3600)
    frac = rest / 3600
    return shape[hour] * (1 - frac) + shape[(hour + 1) % 24] * frac


class ResidentialLoad:
    """A seeded synthetic household: daily and weekly shape, with noise per five-minute slot
    and occasional appliance spikes (kettle, iron) lasting a slot.

    The demand is constant over each slot (local time, aligned to the hour): the shape is
    interpolated at the slot's start, and one hash of (seed, slot) gives both the noise and
    whether an appliance runs. The last slot computed is kept, so asking again within it costs
    a comparison.
    """

    SLOT = 300

    def __init__(self, mean_watts: int, seed: int, timezone_minutes: int = 0) -> None:
        if mean_watts < 0:
            raise ConfigError("a residential load's mean is at least 0 W")
        self.mean_watts = mean_watts
        self.seed = seed
        self.offset = timezone_minutes * 60
        self._scale = mean_watts * _BASE_SHARE / _SHAPE_MEAN
        self._slot: int | None = None
        self._watts = 0

    def demand(self, t: float) -> int:
        slot = math.floor((t + self.offset) / self.SLOT)
        if slot != self._slot:
            self._watts = self._slot_watts(slot)
            self._slot = slot
        return self._watts

    def segment(self, t: float) -> tuple[int, float]:
        slot = math.floor((t + self.offset) / self.SLOT)
        if slot != self._slot:
            self._watts = self._slot_watts(slot)
            self._slot = slot
        return self._watts, (slot + 1) * self.SLOT - self.offset

    def segments(self, start: int, stop: int) -> list[tuple[int, int]]:
        """``segment(t)`` for every slot that ``[start, stop)`` (whole seconds) touches, in
        order: ``[(watts, end), ...]``, each slot beginning where the one before ends. One call
        for a run of slots, with the hash inlined (the event-driven integration's hot loop)."""
        offset = self.offset
        size = self.SLOT
        first = (start + offset) // size
        last = (stop - 1 + offset) // size
        seed = self.seed * 0x100000001B3
        scale = self._scale
        out: list[tuple[int, int]] = []
        for slot in range(first, last + 1):
            if slot == self._slot:
                out.append((self._watts, (slot + 1) * size - offset))
                continue
            # _mix(seed ^ slot), inlined
            mixed = ((seed ^ slot) + 0x9E3779B97F4A7C15) & _MASK64
            mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
            mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
            mixed ^= mixed >> 31
            day, index = divmod(slot, _SLOTS_A_DAY)
            noise = 0.75 + 0.5 * ((mixed >> _SPIKE_BITS) / _NOISE_SPAN)
            watts = scale * _SLOT_BASE[(day + 3) % 7 >= 5][index] * noise
            if mixed & _SPIKE_MASK < _SPIKE_BELOW:
                watts += self.mean_watts * _SPIKE_SIZE * (1 + unit_noise(self.seed ^ 0xA5A5, slot))
            out.append((max(0, round(watts)), (slot + 1) * size - offset))
        return out

    def _slot_watts(self, slot: int) -> int:
        day, index = divmod(slot, _SLOTS_A_DAY)
        base = _SLOT_BASE[(day + 3) % 7 >= 5][index]  # 1970-01-01 was a Thursday
        mixed = _mix(self.seed * 0x100000001B3 ^ slot)
        noise = 0.75 + 0.5 * ((mixed >> _SPIKE_BITS) / _NOISE_SPAN)
        watts = self._scale * base * noise
        if mixed & _SPIKE_MASK < _SPIKE_BELOW:  # an appliance for this slot
            watts += self.mean_watts * _SPIKE_SIZE * (1 + unit_noise(self.seed ^ 0xA5A5, slot))
        return max(0, round(watts))


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
