"""The serial line as the rig's meters see it: every byte in both directions (the capture),
every request and what became of its answer (the exchanges), and the line faults of the
scenario applied to the answers (:class:`RigLine` is the RTU server's
:class:`~meter_sim.modbus_server.LineTap`).

A fault spoils the next ``count`` answers of its meter (or of any meter on the line): it is
taken when the request is framed and applied when the answer goes out. Faults wait in the
order the steps armed them. A powered-off meter is silent and spoils nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET
from pymodbus.framer import FramerRTU
from pymodbus.pdu import ModbusPDU

from meter_sim.modbus_server import Pieces, RequestPlan, char_seconds, frame_silence
from meter_sim.rig import scenario as sc
from protocols import registermap as rm

log = logging.getLogger(__name__)

RX = "master"  # master -> meters
TX = "meter"  # meters -> master


@dataclass(slots=True)
class CaptureRow:
    """Bytes on the line: ``at`` seconds after the start, who sent them, and the fault that
    shaped them (tx only)."""

    at: float
    sender: str
    data: bytearray
    fault: str = ""


@dataclass(slots=True)
class Exchange:
    """One request to a meter of the line and what became of its answer."""

    at: float  # when the request was framed
    unit: int
    function: int
    table: rm.Table | None  # the registers it read, when it read some
    address: int
    count: int
    outcome: str = "pending"  # ok | exception | silent | a fault's action
    answered_at: float | None = None

    @property
    def ok(self) -> bool:
        """The master got a good, unspoiled answer."""
        return self.outcome == "ok"


@dataclass(slots=True)
class ActiveFault:
    step: sc.Step
    unit: int | None  # None: any meter on the line
    remaining: int
    units: set[int] = field(default_factory=set)  # the meters whose answers it spoiled

    @property
    def action(self) -> str:
        return str(type(self.step).__struct_config__.tag)


def with_crc(frame: bytes) -> bytes:
    return frame + FramerRTU.compute_CRC(frame).to_bytes(2, "big")


def crc_ok(frame: bytes) -> bool:
    if len(frame) < 4:
        return False
    return bool(FramerRTU.check_CRC(frame[:-2], int.from_bytes(frame[-2:], "big")))


def _read_range(pdu: ModbusPDU) -> tuple[rm.Table | None, int, int]:
    code = pdu.function_code
    if code == 4:
        return rm.Table.INPUT, int(getattr(pdu, "address", 0)), int(getattr(pdu, "count", 0))
    if code == 3:
        return rm.Table.HOLDING, int(getattr(pdu, "address", 0)), int(getattr(pdu, "count", 0))
    if code == 0x17:
        return (
            rm.Table.HOLDING,
            int(getattr(pdu, "read_address", 0)),
            int(getattr(pdu, "read_count", 0)),
        )
    return None, int(getattr(pdu, "address", 0)), 0


class RigLine:
    """The tap on the rig's line: capture, exchanges, line faults and powered-off meters."""

    def __init__(self, baudrate: int, bytesize: int, parity: str, stopbits: int) -> None:
        self.char = char_seconds(baudrate, bytesize, parity, stopbits)
        self.silence = frame_silence(baudrate, bytesize, parity, stopbits)
        self.origin = 0.0  # loop time of the start
        self.capture: list[CaptureRow] = []
        self.exchanges: list[Exchange] = []
        self.faults: list[ActiveFault] = []
        self.off: set[int] = set()  # units whose meter has no power
        #: unit -> times (s after the start) when a fault on it ended
        self.fault_ends: dict[int, list[float]] = {}
        self.injected: dict[str, int] = {}  # fault action -> answers spoiled
        self._pending: tuple[Exchange, ActiveFault | None] | None = None
        self._last_rx = -1.0
        self._noise = 0

    # -- arming -----------------------------------------------------------------------------------

    def arm(self, step: sc.Step, unit: int | None) -> None:
        count = int(getattr(step, "count", 1))
        self.faults.append(ActiveFault(step, unit, count))

    def power(self, unit: int, on: bool, at: float) -> None:
        if on:
            self.off.discard(unit)
            self.fault_ends.setdefault(unit, []).append(at)
        else:
            self.off.add(unit)
            self.injected["power_cut"] = self.injected.get("power_cut", 0) + 1

    # -- the tap ----------------------------------------------------------------------------------

    def _now(self, at: float) -> float:
        return at - self.origin

    def received(self, data: bytes, at: float) -> None:
        now = self._now(at)
        last = self.capture[-1] if self.capture else None
        if last is not None and last.sender == RX and now - self._last_rx < self.silence:
            last.data += data
        else:
            self.capture.append(CaptureRow(now, RX, bytearray(data)))
        self._last_rx = now

    def sent(self, data: bytes, at: float) -> None:
        fault = self._pending[1].action if self._pending and self._pending[1] else ""
        self.capture.append(CaptureRow(self._now(at), TX, bytearray(data), fault))

    def request(self, unit: int, pdu: ModbusPDU) -> RequestPlan:
        table, address, count = _read_range(pdu)
        exchange = Exchange(
            self._now(self.loop_time()), unit, pdu.function_code, table, address, count
        )
        self.exchanges.append(exchange)
        if unit in self.off:
            exchange.outcome = "silent"
            self._pending = None
            return RequestPlan(silent=True)
        fault = self._take(unit)
        self._pending = (exchange, fault)
        if fault is not None and isinstance(fault.step, sc.ExceptionAnswer):
            return RequestPlan(exception=fault.step.code)
        return RequestPlan()

    def answer(self, unit: int, frame: bytes) -> Pieces:
        pending, self._pending = self._pending, None
        now = self._now(self.loop_time())
        if pending is None:  # pragma: no cover - every answer follows a framed request
            return [(0.0, frame)]
        exchange, fault = pending
        exchange.answered_at = now
        if unit in self.off:  # power failed while the request was executed
            exchange.outcome = "silent"
            return []
        if fault is None:
            exchange.outcome = "exception" if frame[1] & 0x80 else "ok"
            self._pending = (exchange, None)
            return [(0.0, frame)]
        self._pending = (exchange, fault)  # so that sent() names the fault
        exchange.outcome = fault.action
        self.injected[fault.action] = self.injected.get(fault.action, 0) + 1
        fault.units.add(unit)
        if fault.remaining == 0:
            for spoiled in fault.units:
                self.fault_ends.setdefault(spoiled, []).append(now + self._lateness(fault))
        return self._shape(fault, unit, frame)

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    # -- faults -----------------------------------------------------------------------------------

    def _take(self, unit: int) -> ActiveFault | None:
        for fault in self.faults:
            if fault.remaining > 0 and fault.unit in (None, unit):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self.faults.remove(fault)
                return fault
        return None

    @staticmethod
    def _lateness(fault: ActiveFault) -> float:
        return fault.step.delay.value if isinstance(fault.step, sc.Late) else 0.0

    def _shape(self, fault: ActiveFault, unit: int, frame: bytes) -> Pieces:
        step: Any = fault.step
        if isinstance(step, sc.Drop):
            return []
        if isinstance(step, sc.Late):
            return [(step.delay.value, frame)]
        if isinstance(step, sc.CorruptCrc):
            return [(0.0, frame[:-1] + bytes([frame[-1] ^ 0xFF]))]
        if isinstance(step, sc.Gaps):
            cut = max(1, len(frame) // 2)
            return [(0.0, frame[:cut]), (step.chars * self.char, frame[cut:])]
        if isinstance(step, sc.Noise):
            self._noise += 1
            rng = random.Random(step.seed * 1_000_003 + self._noise)
            return [(0.0, bytes(rng.randrange(256) for _ in range(step.length)) + frame)]
        if isinstance(step, sc.WrongUnit):
            other = step.unit if step.unit is not UNSET else unit % 247 + 1
            return [(0.0, with_crc(bytes([other]) + frame[1:-2]))]
        return [(0.0, frame)]  # an exception fault: the answer is already the exception
