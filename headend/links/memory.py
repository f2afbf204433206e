"""An in-memory :class:`~headend.links.base.MeterLink` over a real firmware meter, with faults.

Head-end services are tested against it without sockets: :class:`MemoryLink` calls the
meter's own ``execute``, ``snapshot``, ``events_since``, ``profile_between`` and
``last_result`` (any object with those, :class:`FirmwareMeter`: in the simulator,
:class:`meter_sim.firmware.Meter`), and a :class:`FaultPlan` decides, seeded and counted, what
goes wrong on the way:

* ``drop_request`` — the request is lost before the meter sees it;
* ``drop_answer`` — the meter applies the request and its answer is lost;
* ``delay`` — the answer comes ``delay_seconds`` late (a time-out if that is too late);
* ``disconnect`` — the link drops before the request; the next operation reconnects;
* ``corrupt`` — the meter applies the request and its answer arrives spoilt: the operation
  fails at once with a :class:`~protocols.errors.DecodeError`, as a link's decoder does.

Each operation draws at most one fault; the counters in :attr:`MemoryLink.faults` and
:attr:`MemoryLink.executed` (envelopes the meter saw) let a test check exactly what happened.
A lost request or answer costs the caller ``timeout`` seconds, as on a real line.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from headend.links.base import ConfirmedExecution
from protocols.clock import Clock
from protocols.commands import CommandEnvelope, CommandResult
from protocols.errors import ConfigError, DecodeError, LinkClosed, LinkTimeout, ValidationError
from protocols.readings import Event, MeterSnapshot, ProfileRow


class FirmwareMeter(Protocol):
    """What the in-memory link needs of a meter's firmware."""

    @property
    def last_result(self) -> CommandResult: ...

    def advance(self, now: float, step: int = 60) -> None: ...

    def execute(self, envelope: CommandEnvelope) -> CommandResult: ...

    def snapshot(self) -> MeterSnapshot: ...

    def events_since(self, seq: int, limit: int = 100) -> list[Event]: ...

    def profile_between(self, start: int, end: int) -> list[ProfileRow]: ...


class Fault(Enum):
    DROP_REQUEST = "drop_request"
    DROP_ANSWER = "drop_answer"
    DELAY = "delay"
    DISCONNECT = "disconnect"
    CORRUPT = "corrupt"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The probability of each fault per operation (they add up to at most 1), the delay of a
    delayed answer, and the seed of the draws; ``only`` limits faults to some operations
    (``"send"``, ``"last_result"``, ``"snapshot"``, ``"events"``, ``"profile"``)."""

    drop_request: float = 0.0
    drop_answer: float = 0.0
    delay: float = 0.0
    disconnect: float = 0.0
    corrupt: float = 0.0
    delay_seconds: float = 0.05
    seed: int = 0
    only: frozenset[str] | None = None

    def __post_init__(self) -> None:
        chances = (self.drop_request, self.drop_answer, self.delay, self.disconnect, self.corrupt)
        if any(not 0 <= p <= 1 for p in chances) or sum(chances) > 1:
            raise ConfigError("fault probabilities are 0..1 and add up to at most 1")
        if self.delay_seconds < 0:
            raise ConfigError("a delay is not negative")

    def draw(self, rng: random.Random, operation: str) -> Fault | None:
        if self.only is not None and operation not in self.only:
            return None
        x = rng.random()
        for fault, chance in (
            (Fault.DROP_REQUEST, self.drop_request),
            (Fault.DROP_ANSWER, self.drop_answer),
            (Fault.DELAY, self.delay),
            (Fault.DISCONNECT, self.disconnect),
            (Fault.CORRUPT, self.corrupt),
        ):
            if x < chance:
                return fault
            x -= chance
        return None


NO_FAULTS = FaultPlan()


class MemoryLink(ConfirmedExecution):
    """A MeterLink straight to ``meter``; ``clock`` (optional) advances the meter to its time
    before each operation; ``timeout`` is what a lost request or answer costs."""

    def __init__(
        self,
        meter: FirmwareMeter,
        faults: FaultPlan = NO_FAULTS,
        *,
        clock: Clock | None = None,
        timeout: float = 0.05,
    ) -> None:
        if not timeout > 0:
            raise ConfigError(f"a link time-out is positive, got {timeout!r}")
        self.meter = meter
        self.plan = faults
        self.clock = clock
        self.timeout = timeout
        self.meter_id = meter.snapshot().meter_id
        self.faults: Counter[Fault] = Counter()
        self.executed = 0  # envelopes the meter saw
        self.connects = 1
        self._connected = True
        self._closed = False
        self._rng = random.Random(faults.seed)

    def __repr__(self) -> str:
        return f"MemoryLink({self.meter_id})"

    async def _call(self, operation: str, wait: float | None = None) -> Fault | None:
        """Run the fault draw of one operation: raise for a lost request, else return the
        fault still to apply to the answer (drop, delay or corrupt)."""
        if self._closed:
            raise LinkClosed(f"{self!r} is closed")
        if not self._connected:
            self._connected = True
            self.connects += 1
        fault = self.plan.draw(self._rng, operation)
        if fault is not None:
            self.faults[fault] += 1
        if fault is Fault.DISCONNECT:
            self._connected = False
            raise LinkClosed(f"{self!r}: connection lost")
        if fault is Fault.DROP_REQUEST:
            await asyncio.sleep(wait if wait is not None else self.timeout)
            raise LinkTimeout(f"{self!r}: no answer (request lost)")
        if self.clock is not None:
            self.meter.advance(self.clock.now())
        return fault

    async def _answer(self, fault: Fault | None, wait: float | None = None) -> None:
        limit = wait if wait is not None else self.timeout
        if fault is Fault.DROP_ANSWER:
            await asyncio.sleep(limit)
            raise LinkTimeout(f"{self!r}: no answer (answer lost)")
        if fault is Fault.DELAY:
            if self.plan.delay_seconds >= limit:
                await asyncio.sleep(limit)
                raise LinkTimeout(f"{self!r}: no answer within {limit:g} s (answer late)")
            await asyncio.sleep(self.plan.delay_seconds)
        if fault is Fault.CORRUPT:
            raise DecodeError(f"{self!r}: the answer does not decode (corrupted)")

    async def read_snapshot(self) -> MeterSnapshot:
        fault = await self._call("snapshot")
        snapshot = self.meter.snapshot()
        await self._answer(fault)
        return snapshot

    async def read_profile(self, start: int, end: int) -> list[ProfileRow]:
        fault = await self._call("profile")
        rows = self.meter.profile_between(start, end) if start <= end else []
        await self._answer(fault)
        return rows

    async def read_events(self, since_seq: int, limit: int = 100) -> list[Event]:
        fault = await self._call("events")
        events = self.meter.events_since(since_seq, limit)
        await self._answer(fault)
        return events

    async def read_last_result(self) -> CommandResult:
        fault = await self._call("last_result")
        result = self.meter.last_result
        await self._answer(fault)
        return result

    async def send_envelope(self, envelope: CommandEnvelope, timeout: float) -> CommandResult:
        if envelope.meter_id != self.meter_id:
            raise ValidationError(
                f"the envelope is for meter {envelope.meter_id}, this link reaches {self.meter_id}"
            )
        wait = min(timeout, self.timeout)
        fault = await self._call("send", wait)
        self.executed += 1
        result = self.meter.execute(envelope)
        await self._answer(fault, wait)
        return result

    async def close(self) -> None:
        self._closed = True
