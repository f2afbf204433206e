"""Many meters in one process, advanced together under one clock."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator

# imported now, not on the first save: a save under load must not need a descriptor to import
from concurrent.futures import ThreadPoolExecutor  # noqa: F401
from pathlib import Path

from meter_sim.config import FleetConfig
from meter_sim.firmware import Integration
from meter_sim.runtime import MeterRuntime
from meter_sim.statedb import FleetStore, PreparedState
from protocols.clock import AcceleratedClock, Clock, SystemClock
from protocols.errors import StateFileError

log = logging.getLogger(__name__)
CLOCK_FILE = "clock.json"
#: real seconds of work on the event loop (advancing meters, taking their states) between two
#: yields to it, so a request waits at most about this long behind a tick or a save
SLICE_SECONDS = 0.005


def _write(prepared: Iterable[PreparedState | None]) -> None:
    """Commit prepared states, one transaction per state database."""
    by_store: dict[FleetStore, list[PreparedState]] = {}
    for item in prepared:
        if item is not None:
            by_store.setdefault(item.store.fleet, []).append(item)
    for store, items in by_store.items():
        store.write(items)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a bulk construction (a fleet's meters and
    their states): every full collection it would start on the way walks every object built so
    far, which took ~40 % of opening 10,000 meters."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def keep_for_good() -> None:
    """Move every object alive now out of the cyclic garbage collector's view (``gc.freeze``):
    done once a fleet is open, and again once it is served.

    The meters' objects live as long as the process, but each full collection walks them all
    (about 1 s at 10,000 meters), on the event loop, whenever enough new objects have survived
    (a fleet save's taken states do): no request could be answered meanwhile. Frozen, they are
    still freed by reference counting; only cycles among them would outlive the process's need.
    """
    gc.freeze()


def resume_time(config: FleetConfig, state_dir: Path, clock: Clock | None = None) -> float:
    """Where a fleet's simulated time starts: ``simulation.start`` if set, else the later of
    the time its last run saved and ``clock``'s now (the wall clock by default), so a run after
    a batch run continues from it.

    A clock file that cannot be read or does not hold a time raises StateFileError, as a
    corrupt meter state file does: the fleet must not restart earlier than its meters' time.
    """
    if config.simulation.start is not None:
        return config.simulation.start
    now = (clock or SystemClock()).now()
    saved = read_clock_file(state_dir / CLOCK_FILE)
    return now if saved is None else max(now, saved)


def read_clock_file(path: Path) -> float | None:
    """The simulated time a fleet's last run saved; None when it never saved one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: corrupt clock file: {exc}") from exc
    saved = document.get("time") if isinstance(document, dict) else None
    if not isinstance(saved, int | float) or isinstance(saved, bool):
        saved = -1.0
    if not (math.isfinite(saved) and saved >= 0):
        raise StateFileError(f'{path}: corrupt clock file: no "time" in epoch seconds')
    return float(saved)


class Fleet:
    def __init__(
        self,
        config: FleetConfig,
        clock: Clock,
        runtimes: dict[str, MeterRuntime],
        save_interval: float | None = None,
        state_dir: Path | None = None,
        *,
        integration: Integration = "fixed",
    ) -> None:
        self.config = config
        #: how the meters integrate (``Meter.advance``), as they were opened
        self.integration: Integration = integration
        self.clock = clock
        self.runtimes = runtimes
        self.save_interval = (
            config.simulation.save_seconds if save_interval is None else save_interval
        )
        self.state_dir = state_dir
        #: periodic saves that failed since the last one that succeeded
        self.save_failures = 0
        #: whether every meter was saved since it was opened (else :meth:`run` saves at once)
        self.saved = True

    @classmethod
    def from_config(
        cls,
        config: FleetConfig,
        clock: Clock | None = None,
        state_dir: Path | None = None,
        integration: Integration = "fixed",
        *,
        save: bool = True,
    ) -> Fleet:
        """Open every meter of ``config``; ``state_dir`` defaults to ``simulation.state_dir``.

        The meters are saved as powered up, in one transaction, unless ``save`` is False: then
        :meth:`run` saves them first thing (a server that answers before; a meter killed before
        that save starts again from its state before, as after any power cut, and every command
        it acknowledged was saved with it).

        Without a clock, an accelerated one at ``simulation.speed`` starts at
        ``simulation.start``, or where the fleet's last run left off, or now. ``integration``
        is how the meters integrate (``Meter.advance``); both ways give the same states.
        """
        sim = config.simulation
        directory = state_dir if state_dir is not None else Path(sim.state_dir)
        if clock is None:
            clock = AcceleratedClock(sim.speed, resume_time(config, directory))
        store = FleetStore(directory)
        with gc_paused():
            states = store.load_many([meter.meter_id for meter in config.meters])
            runtimes = {
                meter.meter_id: MeterRuntime.restore(
                    meter,
                    clock,
                    store.meter(meter.meter_id),
                    states.get(meter.meter_id),
                    sim.step_seconds,
                    integration=integration,
                )
                for meter in config.meters
            }
            del states
            fleet = cls(config, clock, runtimes, state_dir=directory, integration=integration)
            if save:
                _write(rt.prepare_save() for rt in runtimes.values())
            fleet.saved = save
            # before the collector resumes: its first collections would walk every meter built
            keep_for_good()
        return fleet

    def __len__(self) -> int:
        return len(self.runtimes)

    def sync_all(self) -> None:
        for runtime in self.runtimes.values():
            runtime.sync()

    def save_all(self) -> None:
        """Save every meter that changed since its last save, in one transaction, and the
        fleet's time."""
        _write(rt.prepare_save() for rt in self.runtimes.values())
        self._write_clock(self.clock.now())
        self.saved = True

    async def save_all_async(self) -> None:
        """:meth:`save_all` off the event loop: the meters' states are taken and encoded on the
        loop in slices of SLICE_SECONDS (the other requests are answered in between), then
        checksummed, compared with what is stored and committed in one transaction in a worker
        thread. The garbage collector waits meanwhile: the states in flight hold no cycles, and
        ten thousand of them surviving would start a collection of everything younger than the
        fleet."""
        with gc_paused():
            taken: list[PreparedState | None] = []
            clock = time.perf_counter
            until = clock() + SLICE_SECONDS
            for runtime in self.runtimes.values():
                taken.append(runtime.prepare_save())
                if clock() >= until:
                    await asyncio.sleep(0)
                    until = clock() + SLICE_SECONDS
            now = self.clock.now()

            def write() -> None:
                _write(taken)
                self._write_clock(now)

            await asyncio.to_thread(write)
        self.saved = True

    def _write_clock(self, now: float) -> None:
        if self.state_dir is not None:
            clock_file = self.state_dir / CLOCK_FILE
            tmp = clock_file.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps({"time": now}))
                tmp.replace(clock_file)
            except OSError as exc:
                raise StateFileError(f"{clock_file}: cannot save the fleet's time: {exc}") from exc

    async def periodic_save(self) -> float:
        """Save every meter off the event loop; returns the real seconds until the next save.

        A save that fails (no file descriptor left, a full disk) is logged and retried sooner,
        1, 2, 4 ... s later up to the save interval, and never ends the fleet: meters keep
        serving from memory, and a command is still only acknowledged once its own save
        succeeded."""
        try:
            await self.save_all_async()
        except (StateFileError, OSError) as exc:
            self.save_failures += 1
            retry = min(self.save_interval, float(2 ** min(self.save_failures - 1, 10)))
            log.error(
                "saving the fleet failed (%d time(s) in a row), retrying in %.1f s: %s",
                self.save_failures,
                retry,
                exc,
            )
            return retry
        if self.save_failures:
            log.warning("the fleet saved again after %d failed attempt(s)", self.save_failures)
            self.save_failures = 0
        return self.save_interval

    def final_save(self, attempts: int = 3, pause: float = 0.5) -> None:
        """Advance every meter to now and save it, on this thread (it must complete even when
        the caller is being cancelled), retried ``attempts`` times; the last StateFileError is
        raised when every attempt failed."""
        self.sync_all()
        for attempt in range(1, attempts + 1):
            try:
                self.save_all()
            except StateFileError as exc:
                log.error("the last save failed (attempt %d of %d): %s", attempt, attempts, exc)
                if attempt == attempts:
                    raise
                time.sleep(pause * attempt)
            else:
                if attempt > 1:
                    log.warning("the last save succeeded at attempt %d", attempt)
                return

    async def run(self, stop: asyncio.Event, final_save: bool = True) -> None:
        """Advance every meter each tick and save them all periodically, until ``stop`` is set;
        then save once more unless ``final_save`` is False (the caller saves, e.g. once its
        listeners have given back their descriptors).

        Meters are advanced in slices of SLICE_SECONDS so that a large fleet never blocks the
        event loop for long: the Modbus and MQTT adapters keep answering during a tick.
        """
        tick = self.config.simulation.tick_seconds
        next_save = time.monotonic() + (self.save_interval if self.saved else 0.0)
        try:
            while not stop.is_set():
                started = time.monotonic()
                until = time.perf_counter() + SLICE_SECONDS
                for runtime in self.runtimes.values():
                    runtime.sync()
                    if time.perf_counter() >= until:
                        await asyncio.sleep(0)
                        until = time.perf_counter() + SLICE_SECONDS
                if time.monotonic() >= next_save:
                    next_save = time.monotonic() + await self.periodic_save()
                elapsed = time.monotonic() - started
                if elapsed > tick:
                    log.warning("a fleet tick took %.2f s (tick is %.2f s)", elapsed, tick)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(tick - elapsed, 0.0))
        finally:
            if final_save:
                self.final_save()
