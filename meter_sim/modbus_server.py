"""Modbus TCP and Modbus RTU servers whose datastore is the live meter.

The seam is pymodbus 3.16's ``SimDevice`` with an ``action``: pymodbus calls the action for
every register read and write with the request's function code, address and count, and the
action fills the registers from :class:`MeterRegisters`, which reads the meter
(``MeterRuntime``) through the register map at that moment. pymodbus' own register list for the
device is only a scratch buffer for the reply; nothing is copied from it.
(``ModbusServerContext``/``ModbusDeviceContext`` are deprecated in 3.16 and not used.)

The only state kept here is what a master writes: the command block, the window starts and the
token registers, i.e. the transport's input buffers, and the result of the last token entered
through the token block. Everything read comes from the meter.

Snapshot reads (the measurement, account and status blocks) show the meter at its clock's
current second: a read advances the meter only when its clock would show another second than
the one it was last advanced to, as a meter refreshes its measurement registers once a second,
and the blocks' registers are encoded again only when the meter's snapshot fields differ from
the ones last encoded (``Meter.snapshot_values``), whoever changed them (a command, the fleet's
tick, another adapter). A master polling faster than the meter's clock ticks costs one
comparison per read. The identification block is encoded once per serial number.

Durability: the action is a coroutine, so a write that executes a command or enters a token
awaits :meth:`MeterRuntime.execute_async` / ``enter_token_async``: the state is fsynced in a
worker thread while the event loop serves the other meters, and the write is answered only once
it is on disk. Writes to one meter run one at a time, and a read first awaits
:meth:`MeterRuntime.settled`, so no master sees a result block that a power cut could undo.

Requests: which function codes a meter serves, and the exception every other or malformed
request gets, is decided by ``protocols.modbus_functions``; the servers decode requests with it
instead of pymodbus's own table (see "requests" below). Function 23 checks its read half against
the map before its write is applied, so a refused request changes nothing. Read device
identification (0x2B/0x0E) answers from the meter's identification. On a serial line a frame
also ends with 3.5 characters of silence at the line's speed: what is left over then is
answered if it is a whole frame and discarded if not, so a truncated frame never swallows the
next request. With ``strict_gaps`` the 1.5-character rule holds as well: a gap of more than
1.5 characters inside a frame discards the frame, and what follows is dropped until the next
3.5-character silence. ``response_delay`` waits before every answer, and a :class:`LineTap`
(the test rig's, meter_sim/rig/) sees every byte in both directions and may silence a unit,
answer a request with an exception, or reshape an answer before it is sent.

Faults (meter_sim/faults.py): a Modbus TCP server given a meter's :class:`FaultInjector` draws
the faults of each request for that meter's unit id when the request is framed: a dropped
request is not executed, a disconnect closes the connection instead, a lost acknowledgement or
a corrupt answer is decided when the answer goes out (by its transaction id), and a late
answer is sent by a task of the connection, cancelled when the connection closes.

Unit ids: every server also holds a catch-all device (id 0, which pymodbus uses for any unit id
without a device of its own) that raises ``NoSuchIdException``: over TCP pymodbus answers it
with exception 0B, on a serial line (``ignore_missing_devices``) with silence, so only the
addressed meter answers on a multi-drop line.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU
from pymodbus.pdu.mei_message import ReadDeviceInformationResponse
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from meter_sim.faults import (
    CORRUPT,
    DISCONNECT,
    DROP,
    LOSE_ACK,
    NO_FAULT,
    FaultInjector,
    FleetFaults,
)
from meter_sim.faults import Draw as FaultDraw
from meter_sim.runtime import MeterRuntime
from protocols import modbus_functions as mf
from protocols import registermap as rm
from protocols.commands import ResultCode
from protocols.cosem import OBIS_SERIAL, OBIS_TOKEN_GATEWAY
from protocols.errors import ConfigError, HesError, LinkClosed, ValidationError
from protocols.readings import MeterSnapshot, SnapshotValues

log = logging.getLogger(__name__)

#: registers each device spans in pymodbus (both tables share the span; addresses beyond it are
#: answered with exception 02 by pymodbus itself)
SPAN = max(rm.table_size(rm.Table.INPUT), rm.table_size(rm.Table.HOLDING))
_FOREVER = 2**64 - 2
_SNAPSHOT_BLOCKS = frozenset({rm.Block.MEASUREMENTS, rm.Block.ACCOUNT, rm.Block.STATUS})


class RegisterRefused(HesError):
    """A request the register map refuses; ``code`` is the Modbus exception code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _illegal_address(message: str) -> RegisterRefused:
    return RegisterRefused(message, int(ExcCodes.ILLEGAL_ADDRESS))


def _illegal_value(message: str) -> RegisterRefused:
    return RegisterRefused(message, int(ExcCodes.ILLEGAL_VALUE))


def _block_index(table: rm.Table) -> tuple[rm.BlockSpec, ...]:
    return tuple(sorted((s for s in rm.BLOCKS.values() if s.table is table), key=lambda s: s.start))


_BLOCKS_BY_TABLE = {table: _block_index(table) for table in rm.Table}
_WRITABLE: dict[int, rm.Row] = {
    address: row for row in rm.ROWS if row.writable for address in range(row.address, row.end)
}


def covering_blocks(table: rm.Table, address: int, count: int) -> list[rm.BlockSpec]:
    """The blocks that hold registers ``address .. address + count - 1`` of ``table``, in order;
    RegisterRefused (02) unless every one of them is mapped."""
    end = address + count
    covered = address
    found: list[rm.BlockSpec] = []
    for spec in _BLOCKS_BY_TABLE[table]:
        if spec.end <= address or spec.start >= end:
            continue
        if spec.start > covered:
            break
        found.append(spec)
        covered = min(end, spec.end)
    if covered < end:
        raise _illegal_address(f"{table} register {covered} is not mapped")
    return found


@dataclass(slots=True)
class _Reading:
    """The blocks one request has encoded so far (each at most once per request)."""

    blocks: dict[rm.Block, tuple[int, list[int]]] = field(default_factory=dict)


_SNAPSHOT_END = rm.SNAPSHOT_START + rm.SNAPSHOT_SIZE


class MeterRegisters:
    """The registers of one meter: reads and writes go through the register map to the runtime."""

    def __init__(self, runtime: MeterRuntime) -> None:
        self.runtime = runtime
        self.order: rm.WordOrder = runtime.config.word_order
        self.written: dict[int, int] = dict.fromkeys(_WRITABLE, 0)
        self.token_result = ResultCode.NONE
        self._writing = asyncio.Lock()  # one write at a time: each stages on the last one
        # the snapshot blocks as last encoded, and the meter's snapshot fields they encode
        self._values: SnapshotValues | None = None
        self._image: list[int] = []
        self._snapshot: MeterSnapshot | None = None
        # the identification block and the serial number it was encoded with
        self._ident: tuple[str, rm.Identification, list[int]] | None = None

    @property
    def meter_id(self) -> str:
        return self.runtime.meter_id

    # -- reading ----------------------------------------------------------------------------------

    def read(self, table: rm.Table, address: int, count: int) -> list[int]:
        """``count`` registers of ``table`` from ``address``, or RegisterRefused (02)."""
        end = address + count
        if table is rm.Table.INPUT and address >= rm.SNAPSHOT_START and end <= _SNAPSHOT_END:
            low = address - rm.SNAPSHOT_START
            return self.snapshot_registers()[low : low + count]
        out: list[int] = []
        reading = _Reading()
        for spec in covering_blocks(table, address, count):
            start, registers = self._block(spec, reading)
            low, high = max(address, spec.start), min(end, spec.end)
            out += registers[low - start : high - start]
        return out

    def snapshot_registers(self) -> list[int]:
        """The snapshot blocks (``SNAPSHOT_SIZE`` registers from ``SNAPSHOT_START``) as the meter
        shows them now; the caller must not change the list.

        The meter is advanced when its clock would show another second than the one it was
        last advanced to (by this read or by anything else: the fleet's tick, a command, another
        adapter); within that second its registers stand as they are, as a meter's measurement
        registers do between two refreshes. The fields are then compared with those of the last
        encoding, which is reused while they are equal: a master polling faster than the meter's
        clock ticks costs one comparison per read, not an integration and an encoding."""
        runtime = self.runtime
        meter = runtime.meter
        values = meter.snapshot_values()
        if int(runtime.clock.now() + meter.clock_offset) != values[1]:
            runtime.sync()
            values = meter.snapshot_values()
        if values != self._values:
            self._image = rm.encode_snapshot_values(values, self.order)
            self._values = values
            self._snapshot = None
        return self._image

    def snapshot(self) -> MeterSnapshot:
        """The snapshot the registers of :meth:`snapshot_registers` encode."""
        self.snapshot_registers()
        if self._snapshot is None:
            assert self._values is not None  # snapshot_registers sets them
            self._snapshot = MeterSnapshot(*self._values)
        return self._snapshot

    def identification(self) -> rm.Identification:
        return self._identification()[0]

    def _identification(self) -> tuple[rm.Identification, list[int]]:
        """The identification and its block's registers, encoded again only when the serial
        number differs from the one they were encoded with (the rest is configuration)."""
        serial = str(self.runtime.meter.read(OBIS_SERIAL, 2))
        cached = self._ident
        if cached is not None and cached[0] == serial:
            return cached[1], cached[2]
        config = self.runtime.config
        ident = rm.Identification(
            meter_id=self.meter_id,
            manufacturer=config.manufacturer,
            model=config.model,
            firmware=config.firmware,
            serial=serial,
            word_order=self.order,
        )
        registers = rm.encode_identification(ident)
        self._ident = (serial, ident, registers)
        return ident, registers

    def device_objects(self) -> dict[int, bytes]:
        """The read device identification objects (0x2B/0x0E) of this meter, by object id."""
        ident = self.identification()
        return {
            obj.object_id: str(getattr(ident, obj.source)).encode() for obj in mf.DEVICE_OBJECTS
        }

    def _block(self, spec: rm.BlockSpec, reading: _Reading) -> tuple[int, list[int]]:
        """(first address, registers) of the group that holds ``spec``."""
        cached = reading.blocks.get(spec.block)
        if cached is not None:
            return cached
        block = spec.block
        order = self.order
        if block in _SNAPSHOT_BLOCKS:
            found = (rm.SNAPSHOT_START, self.snapshot_registers())
            for name in _SNAPSHOT_BLOCKS:
                reading.blocks[name] = found
            return found
        registers: list[int]
        if block is rm.Block.IDENTIFICATION:
            registers = self._identification()[1]
        elif block is rm.Block.FLOATS:
            registers = rm.encode_block(block, rm.float_values(self.snapshot()), order)
        elif block is rm.Block.SETTINGS:
            values = rm.cosem_values(spec.rows, self.runtime.read)
            registers = rm.encode_block(block, values, order)
        elif block is rm.Block.RESULT:
            registers = rm.encode_result(self.runtime.last_result(), order)
        elif block is rm.Block.PROFILE_WINDOW:
            start = self._value("profile_start")
            rows = self.runtime.profile_between(start, _FOREVER)[: rm.PROFILE_WINDOW_ROWS]
            registers = rm.encode_profile_window(start, rows, order)
        elif block is rm.Block.EVENT_WINDOW:
            since = self._value("event_since")
            events = self.runtime.events_since(since, rm.EVENT_WINDOW_ROWS)
            registers = rm.encode_event_window(since, events, order)
        elif block is rm.Block.TOKEN_GATEWAY:
            registers = self._token_block(spec)
        else:  # the command block reads back what was written
            registers = [self.written[a] for a in range(spec.start, spec.end)]
        found = (spec.start, registers)
        reading.blocks[block] = found
        return found

    def _token_block(self, spec: rm.BlockSpec) -> list[int]:
        keypad = self.runtime.config.sts is not None
        values: dict[str, Any] = {
            "token": self._value("token"),
            "token_enter": self.written[rm.ROW["token_enter"].address],
            "token_status": self.runtime.read(OBIS_TOKEN_GATEWAY, 6) if keypad else None,
            "token_time": self.runtime.read(OBIS_TOKEN_GATEWAY, 3) if keypad else None,
            "token_result": self.token_result,
        }
        return rm.encode_block(spec.block, values, self.order)

    def _registers_of(self, row: rm.Row, written: dict[int, int] | None = None) -> list[int]:
        source = self.written if written is None else written
        return [source[a] for a in range(row.address, row.end)]

    def _value(self, name: str, written: dict[int, int] | None = None) -> Any:
        row = rm.ROW[name]
        return rm.decode_value(row, self._registers_of(row, written), self.order)

    # -- writing ----------------------------------------------------------------------------------

    async def write(self, address: int, values: Sequence[int]) -> None:
        """Write holding registers; executes the command block or enters the token when the
        write sets ``cmd_go`` or ``token_enter`` to 1, returning once its outcome is on disk.
        All or nothing: RegisterRefused (02 or 03) leaves every register and the meter as they
        were."""
        async with self._writing:
            await self._write(address, values)

    async def _write(self, address: int, values: Sequence[int]) -> None:
        end = address + len(values)
        for target in range(address, end):
            if target not in _WRITABLE:
                raise _illegal_address(f"holding register {target} is not writable")
        staged = dict(self.written)
        staged.update(zip(range(address, end), values, strict=True))
        touched = {_WRITABLE[target] for target in range(address, end)}
        for row in sorted(touched, key=lambda r: r.address):
            registers = self._registers_of(row, staged)
            if row.dtype is rm.DataType.DEC20:
                bad = [r for r in registers if r > 9999]
                if bad:
                    raise _illegal_value(f"{row.name}: a digit group is 0..9999, got {bad[0]}")
            elif row.address >= address and row.end <= end:
                try:
                    rm.check_written(row, registers, self.order)
                except ValidationError as exc:
                    raise _illegal_value(str(exc)) from exc
        go = rm.ROW["cmd_go"]
        if go in touched and staged[go.address] == 1:
            await self._execute(staged)
        enter = rm.ROW["token_enter"]
        if enter in touched and staged[enter.address] == 1:
            await self._enter_token(staged)
        self.written = staged

    async def _execute(self, staged: dict[int, int]) -> None:
        spec = rm.BLOCKS[rm.Block.COMMAND]
        registers = [staged[a] for a in range(spec.start, spec.end)]
        try:
            envelope = rm.decode_command(registers, self.meter_id, self.order)
        except ValidationError as exc:
            raise _illegal_value(f"command block: {exc}") from exc
        result = await self.runtime.execute_async(envelope)
        log.debug(
            "meter %s executed sequence %d: %s", self.meter_id, result.sequence, result.code.name
        )

    async def _enter_token(self, staged: dict[int, int]) -> None:
        digits = rm.token_digits(self._value("token", staged))
        outcome = await self.runtime.enter_token_async(digits, method=0)
        self.token_result = outcome.result


def char_seconds(baudrate: int, bytesize: int, parity: str, stopbits: int) -> float:
    """The time one character takes on the line: a start bit, the data bits, the parity bit
    (unless parity is N) and the stop bits (11 bits for 8E1, 8O1 and 8N2, 10 for 8N1)."""
    bits = 1 + bytesize + (0 if parity.upper() == "N" else 1) + stopbits
    return bits / baudrate


#: Modbus over serial line v1.02 (2.5.1.1): above 19,200 baud the silence is a fixed 1.75 ms
_FAST_LINE_BAUD = 19_200
_FAST_LINE_SILENCE = 0.00175
_FAST_LINE_GAP = 0.00075


def frame_silence(baudrate: int, bytesize: int, parity: str, stopbits: int) -> float:
    """The silence that ends an RTU frame: 3.5 characters, or 1.75 ms above 19,200 baud."""
    if baudrate > _FAST_LINE_BAUD:
        return _FAST_LINE_SILENCE
    return 3.5 * char_seconds(baudrate, bytesize, parity, stopbits)


def gap_limit(baudrate: int, bytesize: int, parity: str, stopbits: int) -> float:
    """The longest gap allowed between two characters of one frame: 1.5 characters, or
    0.75 ms above 19,200 baud."""
    if baudrate > _FAST_LINE_BAUD:
        return _FAST_LINE_GAP
    return 1.5 * char_seconds(baudrate, bytesize, parity, stopbits)


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """What a :class:`LineTap` decides for one request: answer it (``exception`` None), answer
    it with that exception code without executing it, or say nothing (``silent``)."""

    silent: bool = False
    exception: int | None = None


#: pieces of an answer as sent: (seconds to wait before the piece, bytes)
Pieces = list[tuple[float, bytes]]


class LineTap(Protocol):
    """A view of one serial line from the meters' side, and the hand that shapes it."""

    def received(self, data: bytes, at: float) -> None:
        """Bytes that arrived (loop time ``at``)."""

    def sent(self, data: bytes, at: float) -> None:
        """Bytes that went out."""

    def request(self, unit: int, pdu: ModbusPDU) -> RequestPlan:
        """A whole request for a meter of this line has been framed."""
        ...

    def answer(self, unit: int, frame: bytes) -> Pieces:
        """The pieces to send for ``frame`` (the answer to the last request); [] sends
        nothing."""
        ...


class _Pacer:
    """Delays each answer by the time a real line at the configured speed would take: the
    request, the answer and the two 3.5-character silences; one request at a time per line."""

    def __init__(self, baudrate: int, bytesize: int, parity: str, stopbits: int) -> None:
        self.char_seconds = char_seconds(baudrate, bytesize, parity, stopbits)
        self.lock = asyncio.Lock()

    @staticmethod
    def frame_chars(function_code: int, count: int) -> int:
        if function_code in (3, 4):
            return 8 + 5 + 2 * count
        if function_code == 16:
            return 9 + 2 * count + 8
        if function_code == 23:
            return 13 + 5 + 2 * count
        return 8 + 8

    async def pace(self, function_code: int, count: int) -> None:
        chars = self.frame_chars(function_code, count) + 7
        async with self.lock:
            await asyncio.sleep(chars * self.char_seconds)


class _Device:
    """pymodbus' view of one meter: the SimDevice action that serves it."""

    def __init__(self, registers: MeterRegisters, pacer: _Pacer | None) -> None:
        self.registers = registers
        self.pacer = pacer

    async def action(  # noqa: PLR0917 - the signature pymodbus calls
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        meter_id = self.registers.meter_id
        try:
            table = rm.Table.INPUT if function_code == 4 else rm.Table.HOLDING
            if set_values is None:
                if self.pacer is not None:
                    await self.pacer.pace(function_code, count)
                await self.registers.runtime.settled()  # then read with no await in between
                values = self.registers.read(table, address, count)
                offset = address - start_address
                current_registers[offset : offset + count] = values
                return None
            if table is not rm.Table.HOLDING:  # pragma: no cover - pymodbus sends no such write
                raise _illegal_address("input registers are read-only")
            await self.registers.write(address, [int(v) for v in set_values])
            if self.pacer is not None and function_code == 16:
                await self.pacer.pace(function_code, count)
            return None
        except RegisterRefused as exc:
            log.info(
                "meter %s: function %d at %d (+%d) refused with exception %02d: %s",
                meter_id,
                function_code,
                address,
                count,
                exc.code,
                exc,
            )
            return ExcCodes(exc.code)
        except HesError as exc:
            log.error(
                "meter %s: function %d at %d failed: %s", meter_id, function_code, address, exc
            )
            return ExcCodes.DEVICE_FAILURE


# -- requests ----------------------------------------------------------------------------------
#
# pymodbus decodes a request with a table of every function it implements (coils, FIFO, file
# records, diagnostics with canned data) and answers a request it cannot decode with `80 01`.
# The meter answers the functions of protocols.modbus_functions instead: the decoder below
# classifies each request there and hands pymodbus's own request class only the served ones;
# every other request becomes a refusal with the request's own function code. pymodbus 3.16
# takes no decoder argument, so the servers are given this decoder as their ``decoder``
# attribute before they listen (each connection builds its framer from it).


class _Refused(ModbusPDU):
    """A request answered with an exception: an unserved function or a malformed request."""

    def __init__(
        self,
        function_code: int,
        exception: mf.ExceptionCode,
        reason: str,
        meters: Mapping[int, MeterRegisters],
    ) -> None:
        super().__init__()
        self.function_code = function_code
        self.exception = exception
        self.reason = reason
        self.meters = meters

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        if device_id not in self.meters:  # a unit without a meter is answered as such
            raise NoSuchIdException("no meter has this unit id")
        log.info(
            "meter %s: function %#04x refused with exception %02d: %s",
            self.meters[device_id].meter_id,
            self.function_code,
            self.exception,
            self.reason,
        )
        return ExceptionResponse(self.function_code, int(self.exception))


class _ReadWriteRegisters(ReadWriteMultipleRegistersRequest):
    """Function 23 with both halves checked before the write: pymodbus writes first and reads
    after, so a read of an unmapped address was refused only once the write had been applied
    (and a command executed)."""

    meters: Mapping[int, MeterRegisters] = {}

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        registers = self.meters.get(device_id)
        if registers is not None:
            try:
                covering_blocks(rm.Table.HOLDING, self.read_address, self.read_count)
            except RegisterRefused as exc:
                log.info(
                    "meter %s: function 23 reading %d (+%d) refused with exception %02d: %s",
                    registers.meter_id,
                    self.read_address,
                    self.read_count,
                    exc.code,
                    exc,
                )
                return ExceptionResponse(self.function_code, exc.code)
        return await super().datastore_update(context, device_id)


class _ReadDeviceIdentification(ModbusPDU):
    """Function 0x2B / MEI type 0x0E from the meter's identification; pymodbus's own answers
    from one process-wide identity block, the same for every unit."""

    function_code = 0x2B
    rtu_frame_size = 7  # unit, 0x2B, 0x0E, read code, object id, CRC

    def __init__(
        self, read_code: int, object_id: int, meters: Mapping[int, MeterRegisters]
    ) -> None:
        super().__init__()
        self.read_code = read_code
        self.object_id = object_id
        self.meters = meters

    async def datastore_update(self, context: ModbusServerContext, device_id: int) -> ModbusPDU:
        registers = self.meters.get(device_id)
        if registers is None:
            raise NoSuchIdException("no meter has this unit id")
        try:
            objects = registers.device_objects()
            chosen = mf.select_objects(objects, self.read_code, self.object_id)
        except mf.RequestRefused as exc:
            log.info(
                "meter %s: device identification %d/%#04x refused with exception %02d: %s",
                registers.meter_id,
                self.read_code,
                self.object_id,
                exc.code,
                exc,
            )
            return ExceptionResponse(self.function_code, int(exc.code))
        except HesError as exc:
            log.error("meter %s: device identification failed: %s", registers.meter_id, exc)
            return ExceptionResponse(self.function_code, ExcCodes.DEVICE_FAILURE)
        response = ReadDeviceInformationResponse(
            read_code=self.read_code,
            information={object_id: objects[object_id] for object_id in chosen},
            dev_id=device_id,
            transaction_id=self.transaction_id,
        )
        response.conformity = mf.CONFORMITY_LEVEL
        return response


class _Unframed(ModbusPDU):
    """What the RTU framer is told of a request it cannot size (an unserved function): its
    frame ends with the line's silence (see ``_RtuRequestHandler``)."""

    @classmethod
    def calculateRtuFrameSize(cls, data: bytes) -> int:  # noqa: N802 - pymodbus's name
        return 0  # "need more": the silence after the frame decides


_REQUESTS: dict[int, type[ModbusPDU]] = {
    0x03: ReadHoldingRegistersRequest,
    0x04: ReadInputRegistersRequest,
    0x06: WriteSingleRegisterRequest,
    0x10: WriteMultipleRegistersRequest,
    0x17: _ReadWriteRegisters,
    0x2B: _ReadDeviceIdentification,
}


class _MeterDecoder(DecodePDU):
    """Requests as protocols.modbus_functions decides them (see the comment above)."""

    def __init__(self, meters: Mapping[int, MeterRegisters]) -> None:
        super().__init__(True)
        self.meters = meters

    def lookupPduClass(self, data: bytes) -> type[ModbusPDU] | None:  # noqa: N802 - pymodbus's
        """The class that sizes an RTU frame (unit id, function code, data, CRC)."""
        code = data[1]
        if code in mf.MEI_FUNCTION_CODES and len(data) < 3:
            return _Unframed
        function = mf.lookup(code, data[2] if code in mf.MEI_FUNCTION_CODES else None)
        return _REQUESTS[code] if function.served else _Unframed

    def decode(self, frame: bytes) -> ModbusPDU | None:
        try:
            function = mf.classify(frame)
        except mf.RequestRefused as exc:
            return _Refused(frame[0] if frame else 0, exc.code, str(exc), self.meters)
        if function.code == 0x2B:
            return _ReadDeviceIdentification(frame[2], frame[3], self.meters)
        pdu = _REQUESTS[function.code]()
        pdu.decode(frame[1:])  # well-formed: classify has checked its length and counts
        if isinstance(pdu, _ReadWriteRegisters):
            pdu.meters = self.meters
        return pdu


class _RequestHandler(ServerRequestHandler):
    """pymodbus's request handler with each framed request run as a task of the loop.

    pymodbus hands every request to the loop with ``asyncio.run_coroutine_threadsafe``, from
    the loop's own thread: each request also paid for a ``concurrent.futures.Future`` chained to
    the task and a write to the loop's self-pipe (one wake-up syscall and its read). The
    handler runs on the loop's thread, so a task started there does the same, in the same
    order."""

    def __init__(self, owner: Any) -> None:
        super().__init__(owner, owner.trace_packet, owner.trace_pdu, owner.trace_connect)  # type: ignore[no-untyped-call]
        self.requests: set[asyncio.Task[None]] = set()  # held until done (the loop holds none)

    def handle_later(self) -> None:
        task = self.loop.create_task(self.handle_request())  # type: ignore[no-untyped-call]
        self.requests.add(task)
        task.add_done_callback(self.requests.discard)


class _RtuRequestHandler(_RequestHandler):
    """The request handler of a serial line, with the RTU rule pymodbus lacks: a frame ends
    with 3.5 characters of silence. pymodbus sizes a frame from its function code and waits for
    the rest of it for ever, so a truncated frame, or one it cannot size, swallowed the next
    request. When the line has been silent that long with bytes left over, they are a whole
    frame: one with a good CRC is answered (an unserved function gets exception 01, a short
    request 03), anything else is discarded."""

    def __init__(self, owner: _RtuServer) -> None:
        super().__init__(owner)
        self.silence = owner.silence
        self.timing = owner.timing
        self.tap = owner.tap
        self.frame_end: asyncio.TimerHandle | None = None
        self.last_received: float | None = None
        self.discarding = False  # a gap broke the frame: drop bytes until the silence

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        if self.tap is not None:
            self.tap.received(data, now)
        timing = self.timing
        if timing.gap is not None and self.recv_buffer and self.last_received is not None:
            # a piece arrives once its first character is complete: the line was silent for
            # the time since the last piece less that character
            gap = now - self.last_received - timing.char
            if gap > timing.gap:
                log.debug(
                    "a gap of %.1f characters inside a frame: %d byte(s) discarded",
                    gap / timing.char,
                    len(self.recv_buffer),
                )
                self.recv_buffer = b""
                self.discarding = True
        self.last_received = now
        if self.discarding:
            self._arm_silence()
            return
        super().data_received(data)

    def _arm_silence(self) -> None:
        if self.frame_end is not None:
            self.frame_end.cancel()
        self.frame_end = self.loop.call_later(self.silence, self._silence)

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        if pdu is None or self.tap is None or pdu.dev_id not in self.server.meters:
            await super().handle_request()  # type: ignore[no-untyped-call]
            return
        plan = self.tap.request(pdu.dev_id, pdu)
        if plan.silent:
            return
        if plan.exception is not None:
            response = ExceptionResponse(pdu.function_code, plan.exception)
            response.dev_id = pdu.dev_id
            self.server_send(response, self.last_addr)  # type: ignore[no-untyped-call]
            return
        await super().handle_request()  # type: ignore[no-untyped-call]

    def pdu_send(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None = None) -> None:
        packet = self.framer.buildFrame(pdu)
        pieces: Pieces = [(0.0, packet)]
        if self.tap is not None and pdu.dev_id in self.server.meters:
            pieces = self.tap.answer(pdu.dev_id, packet)
        delay = self.timing.response_delay
        if delay <= 0 and len(pieces) == 1 and pieces[0][0] <= 0:
            self._send_piece(pieces[0][1])
            return
        self.loop.create_task(self._send_pieces(pieces, delay))

    async def _send_pieces(self, pieces: Pieces, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        for wait, piece in pieces:
            if wait > 0:
                await asyncio.sleep(wait)
            self._send_piece(piece)

    def _send_piece(self, piece: bytes) -> None:
        if self.tap is not None:
            self.tap.sent(piece, self.loop.time())
        self.send(piece)

    def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
        used = int(super().callback_data(data, addr))
        if self.frame_end is not None:
            self.frame_end.cancel()
            self.frame_end = None
        if used < len(data):
            self.frame_end = self.loop.call_later(self.silence, self._silence)
        return used

    def callback_disconnected(self, exc: Exception | None) -> None:
        if self.frame_end is not None:
            self.frame_end.cancel()
            self.frame_end = None
        super().callback_disconnected(exc)

    def _silence(self) -> None:
        self.frame_end = None
        frame, self.recv_buffer = self.recv_buffer, b""
        if self.discarding:
            self.discarding = False
            return
        crc = int.from_bytes(frame[-2:], "big")
        if len(frame) < FramerRTU.MIN_SIZE or not FramerRTU.check_CRC(frame[:-2], crc):
            log.debug(
                "discarded %d byte(s) of a partial frame after the line fell silent", len(frame)
            )
            return
        pdu = self.framer.decoder.decode(frame[1:-2])
        if pdu is None:  # pragma: no cover - the meter's decoder answers every request
            return
        pdu.dev_id = frame[0]
        self.last_pdu, self.last_addr = pdu, None
        self.loop.call_soon(self.handle_later)


@dataclass(frozen=True, slots=True)
class LineTiming:
    """The receive and transmit timing of a line: one character's time, the silence that ends
    a frame, the longest gap inside one (None: gaps are not checked) and the wait before every
    answer."""

    char: float
    silence: float
    gap: float | None = None
    response_delay: float = 0.0


class _RtuServer(ModbusSerialServer):
    """pymodbus's serial server with the meter's decoder and the RTU silence rule; it exists
    only to hand each connection an ``_RtuRequestHandler``."""

    def __init__(
        self,
        devices: list[SimDevice],
        decoder: DecodePDU,
        timing: LineTiming,
        tap: LineTap | None,
        meters: Mapping[int, MeterRegisters],
        **kwargs: Any,
    ):
        super().__init__(devices, **kwargs)
        self.decoder = decoder
        self.silence = timing.silence
        self.timing = timing
        self.tap = tap
        self.meters = meters

    def callback_new_connection(self) -> ServerRequestHandler:
        return _RtuRequestHandler(self)


#: function codes that change a meter (a lost acknowledgement is drawn for these only)
WRITE_FUNCTIONS = frozenset({0x06, 0x10, 0x17})
_MBAP_SIZE = 7  # transaction id, protocol id, length, unit id


def corrupt_tcp_frame(frame: bytes) -> bytes:
    """A Modbus TCP answer made malformed: its PDU one byte short (a byte count that promises
    more than follows, an exception without its code), with an MBAP length that agrees with
    the cut, so the frame is whole and its content wrong."""
    pdu = frame[_MBAP_SIZE:][:-1]
    length = (1 + len(pdu)).to_bytes(2, "big")
    return frame[:4] + length + frame[6:_MBAP_SIZE] + pdu


class _FaultyTcpRequestHandler(_RequestHandler):
    """A Modbus TCP connection to meters that inject faults (see "Faults" above)."""

    def __init__(self, owner: _FaultyTcpServer) -> None:
        super().__init__(owner)
        self.faults = owner.faults
        self.draws: dict[int, FaultDraw] = {}  # transaction id -> what happens to its answer
        self.late: set[asyncio.Task[None]] = set()

    async def handle_request(self) -> None:
        pdu = self.last_pdu
        injector = self.faults.get(pdu.dev_id) if pdu is not None else None
        if pdu is None or injector is None:
            await super().handle_request()  # type: ignore[no-untyped-call]
            return
        code = pdu.function_code
        draw = injector.draw(code in WRITE_FUNCTIONS, f"Modbus TCP function {code}")
        if draw.fault == DROP:
            return
        if draw.fault == DISCONNECT:
            self._cancel_late()
            self.close()
            return
        if draw is not NO_FAULT:
            self.draws[pdu.transaction_id] = draw
        await super().handle_request()  # type: ignore[no-untyped-call]

    def pdu_send(self, pdu: ModbusPDU, addr: tuple[Any, ...] | None = None) -> None:
        draw = self.draws.pop(pdu.transaction_id, NO_FAULT)
        if draw.fault == LOSE_ACK:
            return
        packet = self.framer.buildFrame(pdu)
        if draw.fault == CORRUPT:
            packet = corrupt_tcp_frame(packet)
        if draw.delay <= 0:
            self.send(packet, addr)
            return
        task = self.loop.create_task(self._send_late(packet, draw.delay, addr))
        self.late.add(task)
        task.add_done_callback(self.late.discard)

    async def _send_late(self, packet: bytes, delay: float, addr: tuple[Any, ...] | None) -> None:
        await asyncio.sleep(delay)
        if self.transport is not None:
            self.send(packet, addr)

    def _cancel_late(self) -> None:
        for task in self.late:
            task.cancel()
        self.draws.clear()

    def callback_disconnected(self, exc: Exception | None) -> None:
        self._cancel_late()
        super().callback_disconnected(exc)

    def close(self, reconnect: bool = False) -> None:
        self._cancel_late()
        super().close(reconnect)


class _TcpServer(ModbusTcpServer):
    """pymodbus's TCP server handing each connection a :class:`_RequestHandler`."""

    def callback_new_connection(self) -> ServerRequestHandler:
        return _RequestHandler(self)


class _FaultyTcpServer(ModbusTcpServer):
    """pymodbus's TCP server handing each connection a :class:`_FaultyTcpRequestHandler`."""

    def __init__(
        self, devices: list[SimDevice], faults: Mapping[int, FaultInjector], **kwargs: Any
    ) -> None:
        super().__init__(devices, **kwargs)
        self.faults = faults

    def callback_new_connection(self) -> ServerRequestHandler:
        return _FaultyTcpRequestHandler(self)


async def _no_such_device(  # noqa: PLR0917 - the signature pymodbus calls
    function_code: int,
    start_address: int,
    address: int,
    count: int,
    current_registers: list[int],
    set_values: list[int] | list[bool] | None,
) -> ExcCodes | None:
    raise NoSuchIdException("no meter has this unit id")


def _meters(runtimes: Sequence[MeterRuntime]) -> dict[int, MeterRegisters]:
    by_unit: dict[int, MeterRegisters] = {}
    for runtime in runtimes:
        unit = runtime.config.modbus_unit
        if unit in by_unit:
            raise ConfigError(
                f"meters {by_unit[unit].meter_id} and {runtime.meter_id} share unit id {unit} "
                "on one server; give them distinct modbus_unit values or one port each"
            )
        by_unit[unit] = MeterRegisters(runtime)
    return by_unit


def _catch_all() -> list[SimDevice]:
    """The one device pymodbus builds for a server: unit 0, which answers "no such unit"."""
    return [
        SimDevice(
            0,
            simdata=[SimData(0, count=SPAN, datatype=SimType.REGISTERS)],
            action=_no_such_device,
        )
    ]


def _attach(server: Any, meters: Mapping[int, MeterRegisters], pacer: _Pacer | None) -> None:
    """Give ``server`` one device per meter without building one each.

    pymodbus builds a device's register and flag lists (here ``SPAN`` + 1 entries each) from
    its SimDevice; 247 meters behind a gateway would be 247 such builds and copies. The lists
    are only the reply's scratch buffer (the action fills the registers a read asks for and
    pymodbus slices them out with no await in between), so every meter of a server shares the
    catch-all's: each meter's device is a shallow copy of the built catch-all with the meter's
    action."""
    core = server.context
    template = core.devices[0]
    for unit, registers in meters.items():
        device = copy.copy(template)
        device.action = _Device(registers, pacer).action
        core.devices[unit] = device


@dataclass(slots=True)
class ModbusService:
    """A running server: where it listens and the meters it serves by unit id."""

    meters: dict[int, MeterRegisters]
    host: str = ""
    port: int = 0
    url: str = ""

    @property
    def meter_ids(self) -> list[str]:
        return [registers.meter_id for registers in self.meters.values()]


async def _start(server: Any, where: str) -> None:
    try:
        await server.serve_forever(background=True)
    except (RuntimeError, OSError) as exc:
        await _stop(server)
        raise LinkClosed(f"cannot serve Modbus on {where}: {exc}") from exc


async def _stop(server: Any) -> None:
    await server.shutdown()


def _bound_port(server: Any) -> int:
    sockets = getattr(server.transport, "sockets", None) or ()
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise LinkClosed("the Modbus TCP listener has no socket")


@asynccontextmanager
async def serve_tcp(
    runtimes: Sequence[MeterRuntime],
    host: str = "127.0.0.1",
    port: int = 0,
    faults: FleetFaults | None = None,
) -> AsyncIterator[ModbusService]:
    """One Modbus TCP listener for many meters, each by its unit id (``modbus_unit``).

    ``port=0`` binds a free port; ``service.port`` is the bound one. The listener accepts
    connections when the context is entered. The meters with an injector in ``faults`` inject
    its faults into their answers (see "Faults" above)."""
    meters = _meters(runtimes)
    by_unit: dict[int, FaultInjector] = {}
    for unit, registers in meters.items():
        injector = faults.get(registers.meter_id) if faults is not None else None
        if injector is not None:
            by_unit[unit] = injector
    server: ModbusTcpServer
    if by_unit:
        server = _FaultyTcpServer(
            _catch_all(), by_unit, address=(host, port), ignore_missing_devices=False
        )
    else:
        server = _TcpServer(_catch_all(), address=(host, port), ignore_missing_devices=False)
    _attach(server, meters, None)
    server.decoder = _MeterDecoder(meters)  # see "requests" above
    await _start(server, f"{host}:{port}")
    try:
        service = ModbusService(meters, host, _bound_port(server))
        log.info("Modbus TCP on %s:%d for %d meter(s)", host, service.port, len(meters))
        yield service
    finally:
        await _stop(server)


@asynccontextmanager
async def serve_tcp_per_meter(
    runtimes: Sequence[MeterRuntime],
    host: str = "127.0.0.1",
    first_port: int = 0,
    faults: FleetFaults | None = None,
) -> AsyncIterator[list[ModbusService]]:
    """One Modbus TCP listener per meter on ports ``first_port``, ``first_port + 1``, ...
    (``first_port=0``: a free port each), for fleets beyond 247 unit ids. Each meter answers its
    own unit id on its port. Yields one service per meter, in the order of ``runtimes``."""
    async with AsyncExitStack() as stack:
        services: list[ModbusService] = []
        for index, runtime in enumerate(runtimes):
            port = first_port + index if first_port else 0
            services.append(
                await stack.enter_async_context(serve_tcp([runtime], host, port, faults))
            )
        yield services


@asynccontextmanager
async def serve_rtu(
    runtimes: Sequence[MeterRuntime],
    url: str,
    *,
    baudrate: int = 9600,
    parity: str = "N",
    stopbits: int = 1,
    bytesize: int = 8,
    pace: bool = False,
    strict_gaps: bool = False,
    response_delay: float = 0.0,
    tap: LineTap | None = None,
) -> AsyncIterator[ModbusService]:
    """Modbus RTU on one serial line (a device path or a pyserial URL) for one or more meters
    with distinct unit ids; a request to another unit id gets no answer.

    ``pace=True`` delays every answer by the time the exchange takes on a real line at
    ``baudrate`` (a pty or a socket transmits instantly otherwise). ``strict_gaps`` discards a
    frame with a gap of more than 1.5 characters inside it; ``response_delay`` (seconds) waits
    before every answer; ``tap`` sees and shapes the line (see :class:`LineTap`)."""
    if parity.upper() not in ("N", "E", "O"):
        raise ConfigError(f"parity is N, E or O, got {parity!r}")
    if stopbits not in (1, 2) or bytesize not in (7, 8) or baudrate <= 0:
        raise ConfigError("stop bits are 1 or 2, byte size 7 or 8, baud rate positive")
    if not 0 <= response_delay <= 60:
        raise ConfigError(f"the response delay is 0..60 s, got {response_delay!r}")
    pacer = _Pacer(baudrate, bytesize, parity, stopbits) if pace else None
    meters = _meters(runtimes)
    timing = LineTiming(
        char=char_seconds(baudrate, bytesize, parity, stopbits),
        silence=frame_silence(baudrate, bytesize, parity, stopbits),
        gap=gap_limit(baudrate, bytesize, parity, stopbits) if strict_gaps else None,
        response_delay=response_delay,
    )
    server = _RtuServer(
        _catch_all(),
        _MeterDecoder(meters),
        timing,
        tap,
        meters,
        port=url,
        baudrate=baudrate,
        parity=parity.upper(),
        stopbits=stopbits,
        bytesize=bytesize,
        ignore_missing_devices=True,
    )
    _attach(server, meters, pacer)
    await _start(server, url)
    try:
        log.info("Modbus RTU on %s at %d baud for %d meter(s)", url, baudrate, len(meters))
        yield ModbusService(meters, url=url)
    finally:
        await _stop(server)
