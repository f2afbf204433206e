"""A live meter: the sans-IO firmware, the clock that drives it and its state file.

Adapters (Modbus datastore, MQTT agent, CLI) call this, never the firmware's state directly:
every read first advances the meter to the clock's now, and every command is persisted before
it is acknowledged, so a kill -9 never loses an acknowledged top-up. Async callers use the
``*_async`` methods: the state is taken on the event loop and written and fsynced in a worker
thread, and the call returns once it is durable. While that write is in flight the meter
already holds the command's outcome, so an async reader that could show it (a result block, a
read request's reply, an event) first awaits :meth:`MeterRuntime.settled`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meter_sim.config import MeterConfig
from meter_sim.firmware import Integration, Meter, TokenEntryResult
from meter_sim.loads import load_for
from meter_sim.statedb import FleetStore, MeterStore, PreparedState
from protocols.clock import Clock, ManualClock
from protocols.commands import CommandEnvelope, CommandResult
from protocols.errors import StateFileError, ValidationError
from protocols.obis import Obis
from protocols.readings import Event, MeterSnapshot, ProfileRow

log = logging.getLogger(__name__)


class MeterRuntime:
    def __init__(
        self,
        config: MeterConfig,
        clock: Clock,
        meter: Meter,
        store: MeterStore | None = None,
        step_seconds: int = 60,
        *,
        integration: Integration = "fixed",
    ) -> None:
        self.config = config
        self.clock = clock
        self.meter = meter
        self.store = store
        self.step_seconds = step_seconds
        #: how sync() integrates (meter_sim.firmware.Meter.advance): the results are the same
        self.integration: Integration = integration
        #: held by the *_async commands from executing until the outcome is on disk
        self._persisting = asyncio.Lock()

    @classmethod
    def open(
        cls,
        config: MeterConfig,
        clock: Clock,
        state_dir: Path | None = None,
        step_seconds: int = 60,
    ) -> MeterRuntime:
        """Restore the meter from its state in ``state_dir``, or create it there.

        A corrupt or unreadable state raises StateFileError: the meter does not start.
        Without ``state_dir`` the meter keeps its state in memory only.
        """
        store = FleetStore(state_dir).meter(config.meter_id) if state_dir else None
        state = store.fleet.load_many([config.meter_id]).get(config.meter_id) if store else None
        runtime = cls.restore(config, clock, store, state, step_seconds)
        runtime.save()
        return runtime

    @classmethod
    def restore(
        cls,
        config: MeterConfig,
        clock: Clock,
        store: MeterStore | None,
        state: dict[str, Any] | None,
        step_seconds: int = 60,
        *,
        integration: Integration = "fixed",
    ) -> MeterRuntime:
        """The meter powered up at ``clock``'s now from ``state`` as loaded from ``store`` (a
        new meter when None), not yet saved; StateFileError when the state does not fit it."""
        now = clock.now()
        load = load_for(config)
        if state is not None:
            try:
                meter = Meter.from_state(config, state, now, load)
            except (KeyError, TypeError, ValueError, ValidationError) as exc:
                where = store.path if store is not None else "the saved state"
                raise StateFileError(
                    f"{where} (meter {config.meter_id}): state does not fit this meter: {exc}"
                ) from exc
            log.info("meter %s restored", config.meter_id)
        else:
            meter = Meter(config, now, load)
        return cls(config, clock, meter, store, step_seconds, integration=integration)

    @classmethod
    def open_stopped(cls, config: MeterConfig, state_dir: Path) -> MeterRuntime:
        """A meter that is not running, as saved: its clock stands at the moment of the save,
        so an offline command (a token typed on a stopped meter, a look at its registers)
        neither power-cycles it nor lets time pass."""
        store = FleetStore(state_dir).meter(config.meter_id)
        state = store.fleet.load_many([config.meter_id]).get(config.meter_id)
        if state is None:
            raise StateFileError(
                f"meter {config.meter_id} has no state in {state_dir}: run the fleet first"
            )
        load = load_for(config)
        try:
            meter = Meter.from_state(config, state, None, load)
        except (KeyError, TypeError, ValueError, ValidationError) as exc:
            raise StateFileError(
                f"{store.path} (meter {config.meter_id}): state does not fit this meter: {exc}"
            ) from exc
        return cls(config, ManualClock(meter.true_time), meter, store)

    @property
    def meter_id(self) -> str:
        return self.config.meter_id

    def now(self) -> int:
        return int(self.meter.meter_time)

    def sync(self) -> None:
        self.meter.advance(self.clock.now(), self.step_seconds, self.integration)

    def snapshot(self) -> MeterSnapshot:
        self.sync()
        return self.meter.snapshot()

    def read(self, obis: Obis, attribute: int = 2) -> Any:
        self.sync()
        return self.meter.read(obis, attribute)

    def execute(self, envelope: CommandEnvelope) -> CommandResult:
        self.sync()
        result = self.meter.execute(envelope)
        self.save()
        self._log_command(envelope, result)
        return result

    async def execute_async(self, envelope: CommandEnvelope) -> CommandResult:
        """:meth:`execute` with its save off the event loop; returns once the state is on disk.
        Commands to one meter run one at a time."""
        async with self._persisting:
            self.sync()
            result = self.meter.execute(envelope)
            await self.save_async()
        self._log_command(envelope, result)
        return result

    async def settled(self) -> None:
        """Return once no command's outcome is still on its way to disk: what is read right
        after, without an await in between, shows no command result the meter could still lose
        to a power cut."""
        if self._persisting.locked():
            async with self._persisting:
                pass

    def _log_command(self, envelope: CommandEnvelope, result: CommandResult) -> None:
        log.info(
            "meter %s command %s seq %d: %s",
            self.meter_id,
            envelope.command.code.name,
            envelope.sequence,
            result.code.name,
        )

    def last_result(self) -> CommandResult:
        return self.meter.last_result

    def enter_token(self, digits: str, method: int = 1) -> TokenEntryResult:
        self.sync()
        outcome = self.meter.enter_token(digits, method)
        self.save()
        return outcome

    async def enter_token_async(self, digits: str, method: int = 1) -> TokenEntryResult:
        """:meth:`enter_token` with its save off the event loop; returns once it is on disk."""
        async with self._persisting:
            self.sync()
            outcome = self.meter.enter_token(digits, method)
            await self.save_async()
        return outcome

    def press_button(self) -> Any:
        result = self.meter.press_button(self.clock.now())
        self.save()
        return result

    def events_since(self, seq: int, limit: int = 100) -> list[Event]:
        self.sync()
        return self.meter.events_since(seq, limit)

    def events_between(self, start: int, end: int) -> list[Event]:
        self.sync()
        return self.meter.events_between(start, end)

    def profile_between(self, start: int, end: int) -> list[ProfileRow]:
        self.sync()
        return self.meter.profile_between(start, end)

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        self.meter.listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self.meter.listeners:
                self.meter.listeners.remove(callback)

        return unsubscribe

    def save(self) -> None:
        if self.store is not None:
            self.store.save(self.meter.to_state())

    def prepare_save(self) -> PreparedState | None:
        """The meter's state as of now, ready to be encoded and written in another thread."""
        return self.store.prepare(self.meter.to_state()) if self.store is not None else None

    async def save_async(self) -> None:
        """Save without blocking the event loop: the state is taken here, written and fsynced in
        a worker thread; returns once it is durable."""
        prepared = self.prepare_save()
        if prepared is not None and self.store is not None:
            await asyncio.to_thread(self.store.write, prepared)
