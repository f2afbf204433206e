"""Batch simulation: a fleet's life run as fast as the CPU allows, under a manual clock."""

from __future__ import annotations

from dataclasses import dataclass

from meter_sim.fleet import Fleet
from protocols.clock import ManualClock


@dataclass(frozen=True, slots=True)
class BatchReport:
    simulated_seconds: float
    meters: int
    steps: int


def run_batch(
    fleet: Fleet, clock: ManualClock, duration: float, tick: float = 3600.0
) -> BatchReport:
    """Advance every meter of ``fleet`` by ``duration`` simulated seconds, ``tick`` at a time,
    saving the fleet at the end."""
    if duration < 0:
        raise ValueError("duration must not be negative")
    end = clock.now() + duration
    steps = 0
    while clock.now() < end:
        clock.set(min(clock.now() + tick, end))
        fleet.sync_all()
        steps += 1
    fleet.save_all()
    return BatchReport(duration, len(fleet), steps)
