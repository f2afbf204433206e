"""Many meters in one process, advanced together under one clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from meter_sim.config import FleetConfig
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock, Clock

log = logging.getLogger(__name__)
CLOCK_FILE = "clock.json"


def resume_time(config: FleetConfig, state_dir: Path) -> float:
    """Where a fleet's simulated time starts: ``simulation.start`` if set, else the later of
    the time its last run saved and now (so a run after a batch run continues from it)."""
    if config.simulation.start is not None:
        return config.simulation.start
    now = time.time()
    try:
        saved = float(json.loads((state_dir / CLOCK_FILE).read_text())["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return now
    return max(now, saved)


class Fleet:
    def __init__(
        self,
        config: FleetConfig,
        clock: Clock,
        runtimes: dict[str, MeterRuntime],
        save_interval: float = 30.0,
        state_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.runtimes = runtimes
        self.save_interval = save_interval
        self.state_dir = state_dir

    @classmethod
    def from_config(
        cls, config: FleetConfig, clock: Clock | None = None, state_dir: Path | None = None
    ) -> Fleet:
        """Open every meter of ``config``; ``state_dir`` defaults to ``simulation.state_dir``.

        Without a clock, an accelerated one at ``simulation.speed`` starts at
        ``simulation.start``, or where the fleet's last run left off, or now.
        """
        sim = config.simulation
        directory = state_dir if state_dir is not None else Path(sim.state_dir)
        if clock is None:
            clock = AcceleratedClock(sim.speed, resume_time(config, directory))
        runtimes = {
            meter.meter_id: MeterRuntime.open(meter, clock, directory, sim.step_seconds)
            for meter in config.meters
        }
        return cls(config, clock, runtimes, state_dir=directory)

    def __len__(self) -> int:
        return len(self.runtimes)

    def sync_all(self) -> None:
        for runtime in self.runtimes.values():
            runtime.sync()

    def save_all(self) -> None:
        for runtime in self.runtimes.values():
            runtime.save()
        if self.state_dir is not None:
            clock_file = self.state_dir / CLOCK_FILE
            tmp = clock_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"time": self.clock.now()}))
            tmp.replace(clock_file)

    async def run(self, stop: asyncio.Event) -> None:
        """Advance every meter each tick and save them all periodically, until ``stop`` is set.

        Meters are advanced in slices so that a large fleet never blocks the event loop for
        long: the Modbus and MQTT adapters keep answering during a tick.
        """
        tick = self.config.simulation.tick_seconds
        last_save = time.monotonic()
        try:
            while not stop.is_set():
                started = time.monotonic()
                for index, runtime in enumerate(self.runtimes.values()):
                    runtime.sync()
                    if index % 50 == 49:
                        await asyncio.sleep(0)
                if time.monotonic() - last_save >= self.save_interval:
                    self.save_all()
                    last_save = time.monotonic()
                elapsed = time.monotonic() - started
                if elapsed > tick:
                    log.warning("a fleet tick took %.2f s (tick is %.2f s)", elapsed, tick)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(tick - elapsed, 0.0))
        finally:
            self.sync_all()
            self.save_all()
