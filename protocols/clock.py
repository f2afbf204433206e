"""Injected time: a real clock, an accelerated simulated clock, and a manual clock for tests.

All return seconds since the Unix epoch (UTC) as a float. No I/O: the simulator and the
head-end both take a :class:`Clock`, so neither the firmware nor a head-end service reads the
time itself; it is told the time by whoever drives it.
"""

from __future__ import annotations

import time
from typing import Protocol

from protocols.errors import ConfigError


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> float:
        return time.time()


class AcceleratedClock:
    """Simulated time that runs ``speed`` times faster than real time from ``start``.

    ``speed=3600`` runs an hour per real second: a month of a fleet's life in about 12 minutes.
    """

    def __init__(self, speed: float = 1.0, start: float | None = None) -> None:
        if not speed > 0:
            raise ConfigError(f"the clock speed must be positive, got {speed!r}")
        self.speed = speed
        self._start = time.time() if start is None else start
        self._origin = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._origin) * self.speed


def clock_speed(clock: Clock) -> float:
    """Clock seconds per real second (an accelerated clock's leases and back-offs stretch)."""
    return float(getattr(clock, "speed", 1.0))


class ManualClock:
    """Time that moves only when told to; for tests and batch simulations."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start

    def now(self) -> float:
        return self._now

    def set(self, value: float) -> None:
        self._now = value

    def advance(self, seconds: float) -> float:
        self._now += seconds
        return self._now
