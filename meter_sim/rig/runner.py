"""Run a scenario on a serial line: the meters served over Modbus RTU with the rig's tap, the
timeline's steps at their times, and what the master did recorded for the expectations.

The meters live in memory (a rig starts them fresh from the scenario every run) under the
rig's clock, which runs at ``rig.speed`` and jumps forward when a step says so. A power cut
keeps the meter's state as it was at that moment and stops its time; the restore boots the
meter from that state, which logs power_down and power_up as after a real cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import serial
from msgspec import UNSET

from meter_sim.config import MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import ConstantLoad
from meter_sim.modbus_server import serve_rtu
from meter_sim.rig import scenario as sc
from meter_sim.rig.faults import RigLine
from meter_sim.runtime import MeterRuntime
from protocols.clock import Clock
from protocols.commands import CommandEnvelope, CommandResult
from protocols.errors import ConfigError
from protocols.readings import Event, EventCode

log = logging.getLogger(__name__)

#: the longest a run_down step may jump the clock (then it gives up and says so)
RUN_DOWN_LIMIT = 30 * 86400
_RUN_DOWN_STEP = 60


class RigClock:
    """Simulated time at ``speed`` times real time from ``start``, which steps can jump
    forward (never back)."""

    def __init__(self, speed: float, start: float) -> None:
        self.speed = speed
        self._start = start
        self._origin = time.monotonic()
        self._jumped = 0.0

    def now(self) -> float:
        return self._start + self._jumped + (time.monotonic() - self._origin) * self.speed

    def jump(self, seconds: float) -> None:
        self._jumped += max(0.0, seconds)


@dataclass(frozen=True, slots=True)
class SerialSettings:
    port: str  # a device path or a pyserial URL
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A command block the master wrote with cmd_go = 1, and what the meter made of it."""

    at: float
    meter_id: str
    envelope: CommandEnvelope
    result: CommandResult
    new: bool  # executed now (False: a retry answered from the meter's memory)

    @property
    def name(self) -> str:
        return self.envelope.command.code.name.lower()


@dataclass(slots=True)
class Record:
    """Everything a run saw, for the expectations and the reports."""

    scenario: sc.Scenario
    line: RigLine
    started: float = 0.0  # wall clock
    elapsed: float = 0.0
    commands: list[CommandRecord] = field(default_factory=list)
    steps: list[tuple[float, str]] = field(default_factory=list)
    topups_at_start: dict[str, int] = field(default_factory=dict)
    topups_at_end: dict[str, int] = field(default_factory=dict)
    applied: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # transfer, amount
    #: (meter id, real time) -> relay output on, sampled for relay expectations with `at`
    relay_samples: dict[tuple[str, float], bool] = field(default_factory=dict)
    relay_at_end: dict[str, bool] = field(default_factory=dict)
    events: dict[str, list[str]] = field(default_factory=dict)

    def unit(self, meter_id: str) -> int:
        return self.scenario.meter(meter_id).modbus_unit


def output_on(meter: Meter) -> bool:
    """Whether supply flows: the relay's output, or a welded contactor's."""
    return bool(meter.disconnect.output_state or meter.relay_welded)


def check_port(settings: SerialSettings) -> None:
    """ConfigError unless ``settings.port`` opens as a serial line the server can wait on (a
    device, a pty, or a pyserial URL with a file descriptor: not loop://)."""
    try:
        line = serial.serial_for_url(settings.port, do_not_open=True)
        line.baudrate = settings.baudrate
        line.open()
    except (serial.SerialException, ValueError, OSError) as exc:
        raise ConfigError(f"--serial {settings.port}: cannot open: {exc}") from exc
    try:
        line.fileno()
    except (io.UnsupportedOperation, AttributeError) as exc:
        raise ConfigError(
            f"--serial {settings.port}: this URL has no file descriptor to wait on; give a "
            "serial device or a pty (socat)"
        ) from exc
    finally:
        line.close()


class RigRuntime(MeterRuntime):
    """A meter of the rig: every command the master has it execute is recorded, and an armed
    power cut strikes right after the command it waits for."""

    on_command: Callable[[RigRuntime, CommandEnvelope, CommandResult, bool], None] | None = None

    async def execute_async(self, envelope: CommandEnvelope) -> CommandResult:
        before = self.meter.last_seq
        result = await super().execute_async(envelope)
        if self.on_command is not None:
            self.on_command(self, envelope, result, self.meter.last_seq != before)
        return result


Progress = Callable[[str], None]


class Run:
    """One run of a scenario (use :func:`run_scenario`)."""

    def __init__(self, scenario: sc.Scenario, serial: SerialSettings, progress: Progress) -> None:
        self.scenario = scenario
        self.serial = serial
        self.progress = progress
        rig = scenario.rig
        self.clock = RigClock(rig.speed, sc.start_time(rig))
        self.line = RigLine(serial.baudrate, serial.bytesize, serial.parity, serial.stopbits)
        self.record = Record(scenario, self.line)
        self.runtimes: dict[str, RigRuntime] = {}
        self.saved: dict[str, dict[str, object]] = {}  # meter id -> state at its power cut
        self.armed: dict[str, str] = {}  # meter id -> command name that cuts its power
        self.armed_for: dict[str, float] = {}  # meter id -> how long that cut lasts
        self.restores: list[asyncio.TimerHandle] = []
        self.origin = 0.0
        self.unsubscribe: dict[str, Callable[[], None]] = {}

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.origin

    def say(self, text: str) -> None:
        self.progress(f"[{self.now():7.2f} s] {text}")

    # -- meters -------------------------------------------------------------------------------

    def _open(self, config: MeterConfig, clock: Clock) -> RigRuntime:
        runtime = RigRuntime.restore(config, clock, None, None)
        assert isinstance(runtime, RigRuntime)
        runtime.on_command = self._command
        self._subscribe(runtime)
        return runtime

    def _subscribe(self, runtime: MeterRuntime, since: int | None = None) -> None:
        """Record the meter's events from now on (and those after ``since``, which a boot has
        already logged)."""
        meter_id = runtime.meter_id
        events = self.record.events.setdefault(meter_id, [])

        def seen(event: Event) -> None:
            name = event.code.name.lower()
            events.append(name)
            if event.code is EventCode.TOPUP_ACCEPTED:
                self.record.applied.setdefault(meter_id, []).append((event.a, event.b))

        if since is not None:
            for event in runtime.meter.events_since(since, 1000):
                seen(event)
        self.unsubscribe[meter_id] = runtime.subscribe(seen)

    def _command(
        self, runtime: RigRuntime, envelope: CommandEnvelope, result: CommandResult, new: bool
    ) -> None:
        record = CommandRecord(self.now(), runtime.meter_id, envelope, result, new)
        self.record.commands.append(record)
        retry = "" if new else " (a retry, answered from memory)"
        self.say(
            f"{runtime.meter_id}: master wrote {record.name} seq {envelope.sequence}: "
            f"{result.code.name.lower()}{retry}"
        )
        armed = self.armed.get(runtime.meter_id)
        if armed is not None and armed in ("any", record.name):
            del self.armed[runtime.meter_id]
            self._cut(runtime, "right after executing it, before the answer")
            lasting = self.armed_for.pop(runtime.meter_id, None)
            if lasting is not None:
                self._restore_after(runtime, lasting)

    def _cut(self, runtime: RigRuntime, how: str) -> None:
        meter_id = runtime.meter_id
        if meter_id in self.saved:
            return
        runtime.sync()
        self.saved[meter_id] = runtime.meter.to_state()
        self.unsubscribe.pop(meter_id)()
        self.line.power(runtime.config.modbus_unit, False, self.now())
        self.say(f"{meter_id}: power cut {how}")

    def _restore(self, runtime: RigRuntime) -> None:
        meter_id = runtime.meter_id
        state = self.saved.pop(meter_id, None)
        if state is None:
            return
        load = runtime.meter.load
        runtime.meter = Meter.from_state(runtime.config, state, self.clock.now(), load)
        self._subscribe(runtime, since=int(state["event_seq"]))  # type: ignore[call-overload]
        self.line.power(runtime.config.modbus_unit, True, self.now())
        self.say(f"{meter_id}: power restored, the meter booted")

    # -- steps --------------------------------------------------------------------------------

    async def _wait_for(self, step: sc.Step) -> None:
        loop = asyncio.get_running_loop()
        delay = self.origin + step.at.value - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if step.at_sim is not UNSET:
            target = sc.start_time(self.scenario.rig) + step.at_sim.value
            while self.clock.now() < target:  # noqa: ASYNC110 - a jump of the clock ends it early
                await asyncio.sleep(min(0.05, (target - self.clock.now()) / self.clock.speed))

    async def _steps(self) -> None:
        for step in self.scenario.steps:
            await self._wait_for(step)
            text = await self._apply(step)
            self.record.steps.append((self.now(), text))
            self.say(text)

    async def _apply(self, step: sc.Step) -> str:
        action = str(type(step).__struct_config__.tag)
        meter_id = getattr(step, "meter", UNSET)
        runtime = self.runtimes[meter_id] if isinstance(meter_id, str) else None
        now = self.clock.now()
        if isinstance(step, sc.Fault):
            unit = runtime.config.modbus_unit if runtime is not None else None
            self.line.arm(step, unit)
            where = meter_id if runtime is not None else "any meter"
            return f"{action}: the next {step.count} answer(s) of {where}"
        if isinstance(step, sc.Advance):
            self.clock.jump(step.by.value)
            self._sync()
            return f"advance: the clock moved {step.by.value:g} s"
        if isinstance(step, sc.Jump):
            target = step.to.timestamp()
            self.clock.jump(target - now)
            self._sync()
            return f"jump: the clock is at {step.to.isoformat()}"
        assert runtime is not None  # every other step names its meter
        if isinstance(step, sc.SetLoad):
            runtime.sync()
            runtime.meter.load = ConstantLoad(step.watts)
            return f"{meter_id}: load {step.watts} W"
        if isinstance(step, sc.Tamper):
            runtime.meter.set_tamper(now)
            return f"{meter_id}: tamper"
        if isinstance(step, sc.StuckRelay):
            runtime.meter.set_relay_welded(now, step.stuck)
            return f"{meter_id}: relay {'welded' if step.stuck else 'mended'}"
        if isinstance(step, sc.RunDown):
            return await self._run_down(runtime, step)
        if isinstance(step, sc.PowerCut):
            if step.after_command is not UNSET:
                self.armed[runtime.meter_id] = step.after_command
                text = f"{meter_id}: power cut armed for the next {step.after_command} command"
            else:
                self._cut(runtime, "now")
                text = f"{meter_id}: power cut"
            if step.lasting is not UNSET:
                if step.after_command is UNSET:
                    self._restore_after(runtime, step.lasting.value)
                else:
                    self.armed_for[runtime.meter_id] = step.lasting.value
            return text
        if isinstance(step, sc.PowerRestore):
            self.armed.pop(runtime.meter_id, None)
            self.armed_for.pop(runtime.meter_id, None)
            self._restore(runtime)
            return f"{meter_id}: power restore"
        raise ConfigError(f"no such step: {action}")  # pragma: no cover - the schema's tags

    def _restore_after(self, runtime: RigRuntime, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        self.restores.append(loop.call_later(seconds, self._restore, runtime))

    async def _run_down(self, runtime: RigRuntime, step: sc.RunDown) -> str:
        runtime.sync()
        load = runtime.meter.load
        runtime.meter.load = ConstantLoad(step.watts)
        jumped = 0
        try:
            while runtime.meter.balances.available > step.to and jumped < RUN_DOWN_LIMIT:
                self.clock.jump(_RUN_DOWN_STEP)
                jumped += _RUN_DOWN_STEP
                runtime.sync()
                if jumped % 3000 == 0:
                    await asyncio.sleep(0)
        finally:
            runtime.meter.load = load
        left = runtime.meter.balances.available
        self._sync()
        return (
            f"{runtime.meter_id}: credit run down to {left} in {jumped / 3600:g} simulated h "
            f"at {step.watts} W"
        )

    def _sync(self) -> None:
        for meter_id, runtime in self.runtimes.items():
            if meter_id not in self.saved:
                runtime.sync()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._sync()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.scenario.rig.tick.value)

    async def _sample_relays(self) -> None:
        samples = sorted(
            {
                (e.meter, e.at.value)
                for e in self.scenario.expectations
                if isinstance(e, sc.ExpectRelay) and e.at is not UNSET
            },
            key=lambda item: item[1],
        )
        for meter_id, at in samples:
            delay = self.origin + at - asyncio.get_running_loop().time()
            if delay > 0:
                await asyncio.sleep(delay)
            runtime = self.runtimes[meter_id]
            if meter_id not in self.saved:
                runtime.sync()
            self.record.relay_samples[(meter_id, at)] = output_on(runtime.meter)

    # -- the run ------------------------------------------------------------------------------

    async def run(self) -> Record:
        rig = self.scenario.rig
        check_port(self.serial)
        for config in self.scenario.meters:
            self.runtimes[config.meter_id] = self._open(config, self.clock)
        for meter_id, runtime in self.runtimes.items():
            self.record.topups_at_start[meter_id] = runtime.meter.topups_total
        serial = self.serial
        async with serve_rtu(
            list(self.runtimes.values()),
            serial.port,
            baudrate=serial.baudrate,
            parity=serial.parity,
            stopbits=serial.stopbits,
            bytesize=serial.bytesize,
            strict_gaps=rig.strict_gaps,
            response_delay=rig.response_delay.value,
            tap=self.line,
        ):
            loop = asyncio.get_running_loop()
            self.origin = self.line.origin = loop.time()
            self.record.started = time.time()
            self.say(
                f"scenario {self.scenario.name}: {len(self.runtimes)} meter(s) on "
                f"{serial.port} at {serial.baudrate} {serial.bytesize}{serial.parity}"
                f"{serial.stopbits}, {rig.duration.value:g} s"
            )
            stop = asyncio.Event()
            tasks = [
                asyncio.create_task(self._tick(stop)),
                asyncio.create_task(self._steps()),
                asyncio.create_task(self._sample_relays()),
            ]
            try:
                end = self.origin + rig.duration.value
                await asyncio.sleep(max(0.0, end - loop.time()))
                for task in tasks[1:]:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for handle in self.restores:
                    handle.cancel()
            self.record.elapsed = self.now()
            for meter_id, runtime in self.runtimes.items():
                if meter_id in self.saved:
                    self.record.relay_at_end[meter_id] = False  # no power, no supply
                    self.record.topups_at_end[meter_id] = int(
                        self.saved[meter_id]["topups_total"]  # type: ignore[call-overload]
                    )
                    continue
                runtime.sync()
                self.record.relay_at_end[meter_id] = output_on(runtime.meter)
                self.record.topups_at_end[meter_id] = runtime.meter.topups_total
        return self.record


async def run_scenario(
    scenario: sc.Scenario, serial: SerialSettings, progress: Progress | None = None
) -> Record:
    """Run ``scenario`` on the line ``serial`` against whatever master is on it."""
    return await Run(scenario, serial, progress or (lambda text: None)).run()
