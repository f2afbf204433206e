"""The Modbus function codes a meter answers, and how: one table, pure.

Every function code a master can send is either *served* (answered from the register map or the
meter's identification) or *refused* with exception 01 (illegal function). The simulator's server
decides every request through :func:`classify`, so :data:`MODBUS_FUNCTIONS` is the one place to
read (or document) what the meter does with a function code. A served function answers exception 03
(illegal data value) to a malformed request (a count of 0, a count above the function's limit, a
byte count that does not match, a PDU too short or too long) and exception 02 (illegal data
address) to an address the register map does not have.

Read device identification (0x2B / MEI type 0x0E) serves the objects of :data:`DEVICE_OBJECTS`;
:func:`select_objects` picks the objects a request asks for, as the Modbus application protocol
v1.1b3 (section 6.21) says: stream access (read codes 1, 2, 3) restarts at object 0 when the
object id is not one of the category's objects, individual access (read code 4) to an object the
meter does not have is exception 02, and a read code outside 1..4 is exception 03.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from protocols.errors import ValidationError


class ExceptionCode(IntEnum):
    """Modbus exception codes the meter answers."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    GATEWAY_TARGET_FAILED_TO_RESPOND = 0x0B


#: MEI type of read device identification under function 0x2B
MEI_READ_DEVICE_IDENTIFICATION = 0x0E
#: MEI type of the CANopen general reference under function 0x2B
MEI_CANOPEN_GENERAL_REFERENCE = 0x0D


@dataclass(frozen=True, slots=True)
class ModbusFunction:
    """One function code (for 0x2B: one MEI type) and what the meter does with it.

    ``exception`` is the exception every request of a refused function is answered with; it is
    None for a served function. ``max_read`` and ``max_write`` are the most registers one request
    of a served function may read or write (a count of 0 or above these is exception 03)."""

    code: int
    name: str
    served: bool
    exception: ExceptionCode | None
    explanation: str
    mei_type: int | None = None
    max_read: int | None = None
    max_write: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 0xFF:
            raise ValidationError(f"a function code is 0..255, got {self.code}")
        if self.served != (self.exception is None):
            raise ValidationError(f"function {self.code:#04x}: served xor refused with a code")

    @property
    def label(self) -> str:
        """``0x03`` or, for a MEI type, ``0x2B/0x0E``."""
        if self.mei_type is None:
            return f"0x{self.code:02X}"
        return f"0x{self.code:02X}/0x{self.mei_type:02X}"


def _served(
    code: int,
    name: str,
    explanation: str,
    *,
    mei_type: int | None = None,
    max_read: int | None = None,
    max_write: int | None = None,
) -> ModbusFunction:
    return ModbusFunction(code, name, True, None, explanation, mei_type, max_read, max_write)


def _refused(code: int, name: str, explanation: str, mei_type: int | None = None) -> ModbusFunction:
    return ModbusFunction(
        code, name, False, ExceptionCode.ILLEGAL_FUNCTION, explanation, mei_type=mei_type
    )


#: every function code the Modbus application protocol names, in code order; any other code is
#: answered as :data:`OTHER_FUNCTION`
MODBUS_FUNCTIONS: tuple[ModbusFunction, ...] = (
    _refused(0x01, "read coils", "the map has no coils: every value is a register"),
    _refused(0x02, "read discrete inputs", "the map has no discrete inputs"),
    _served(
        0x03,
        "read holding registers",
        "settings, command, result, window and token registers; 1..125 per request",
        max_read=125,
    ),
    _served(
        0x04,
        "read input registers",
        "identification, measurements, account, status and float registers; 1..125 per request",
        max_read=125,
    ),
    _refused(0x05, "write single coil", "the map has no coils"),
    _served(
        0x06,
        "write single register",
        "one writable holding register, checked like a write of several",
        max_write=1,
    ),
    _refused(
        0x07,
        "read exception status",
        "no exception status byte: the status registers carry the meter's state",
    ),
    _refused(0x08, "diagnostics", "no line diagnostics or counters are kept"),
    _refused(0x0B, "get comm event counter", "no communication event counter is kept"),
    _refused(
        0x0C,
        "get comm event log",
        "no communication log: the meter's event log is read through the event window",
    ),
    _refused(0x0F, "write multiple coils", "the map has no coils"),
    _served(
        0x10,
        "write multiple registers",
        "writable holding registers, all or nothing; 1..123 per request",
        max_write=123,
    ),
    _refused(
        0x11,
        "report server id",
        "the meter identifies itself through 0x2B/0x0E and input registers 0..71",
    ),
    _refused(
        0x14,
        "read file record",
        "no files: the load profile and the events are read through their register windows",
    ),
    _refused(0x15, "write file record", "no files"),
    _refused(
        0x16,
        "mask write register",
        "a masked write could change part of a value: write whole values with 0x06, 0x10 or 0x17",
    ),
    _served(
        0x17,
        "read/write multiple registers",
        "the write, then the read; both halves are checked before anything is written, "
        "so an exception changes nothing; reads 1..125, writes 1..121",
        max_read=125,
        max_write=121,
    ),
    _refused(0x18, "read FIFO queue", "the map has no FIFO queue"),
    _refused(
        0x2B,
        "CANopen general reference",
        "no CANopen objects",
        mei_type=MEI_CANOPEN_GENERAL_REFERENCE,
    ),
    _served(
        0x2B,
        "read device identification",
        "basic, regular and extended objects of the identification block, by stream or "
        "individual access",
        mei_type=MEI_READ_DEVICE_IDENTIFICATION,
    ),
)

#: the answer to every function code (or MEI type of 0x2B) that :data:`MODBUS_FUNCTIONS` lacks
OTHER_FUNCTION = ModbusFunction(
    0x00,
    "any other function code or MEI type",
    False,
    ExceptionCode.ILLEGAL_FUNCTION,
    "not a function of this meter (codes 0x80..0xFF are exception responses, never requests)",
)

_BY_KEY: dict[tuple[int, int | None], ModbusFunction] = {
    (function.code, function.mei_type): function for function in MODBUS_FUNCTIONS
}
if len(_BY_KEY) != len(MODBUS_FUNCTIONS):  # pragma: no cover - a guard on the table itself
    raise RuntimeError("MODBUS_FUNCTIONS names a function code twice")

#: function codes that carry a MEI type as their first data byte
MEI_FUNCTION_CODES = frozenset(f.code for f in MODBUS_FUNCTIONS if f.mei_type is not None)


def lookup(code: int, mei_type: int | None = None) -> ModbusFunction:
    """What the meter does with function ``code`` (and, for 0x2B, MEI type ``mei_type``)."""
    if code in MEI_FUNCTION_CODES:
        return _BY_KEY.get((code, mei_type), OTHER_FUNCTION)
    return _BY_KEY.get((code, None), OTHER_FUNCTION)


class RequestRefused(ValidationError):
    """A request the meter answers with exception ``code`` instead of serving it."""

    def __init__(self, message: str, code: ExceptionCode) -> None:
        super().__init__(message)
        self.code = code


def _u16(pdu: bytes, offset: int) -> int:
    return int.from_bytes(pdu[offset : offset + 2], "big")


#: length of the served requests of fixed length (function code included)
_FIXED_LENGTH = {0x03: 5, 0x04: 5, 0x06: 5, 0x2B: 4}
#: (offset of the read count or None, of the write count, of the byte count) of the others
_COUNTED = {0x10: (None, 3, 5), 0x17: (3, 7, 9)}


def _malformed(message: str) -> RequestRefused:
    return RequestRefused(message, ExceptionCode.ILLEGAL_DATA_VALUE)


def _check_length(function: ModbusFunction, pdu: bytes, expected: int) -> None:
    if len(pdu) != expected:
        raise _malformed(f"a {function.label} request of {len(pdu)} bytes, expected {expected}")


def _check_count(what: str, count: int, limit: int | None) -> None:
    if limit is not None and not 1 <= count <= limit:
        raise _malformed(f"{what} count is 1..{limit}, got {count}")


def classify(pdu: bytes) -> ModbusFunction:
    """The served function request ``pdu`` (function code first) asks for; RequestRefused with
    01 for a function the meter does not serve, 03 for a malformed request of a served one
    (its length, counts and byte count; addresses are the register map's to judge)."""
    if not pdu:
        raise RequestRefused("an empty request", ExceptionCode.ILLEGAL_FUNCTION)
    code = pdu[0]
    mei_type = pdu[1] if code in MEI_FUNCTION_CODES and len(pdu) > 1 else None
    function = lookup(code, mei_type)
    if function.exception is not None:
        asked = f"0x{code:02X}" if mei_type is None else f"0x{code:02X}/0x{mei_type:02X}"
        raise RequestRefused(f"function {asked} is not served", function.exception)
    if code in _COUNTED:
        read_at, write_at, byte_count_at = _COUNTED[code]
        if len(pdu) <= byte_count_at:
            raise _malformed(f"a {function.label} request of {len(pdu)} bytes is too short")
        byte_count = pdu[byte_count_at]
        _check_length(function, pdu, byte_count_at + 1 + byte_count)
        if read_at is not None:
            _check_count("read", _u16(pdu, read_at), function.max_read)
        written = _u16(pdu, write_at)
        _check_count("write", written, function.max_write)
        if byte_count != 2 * written:
            raise _malformed(f"byte count {byte_count} for {written} registers")
        return function
    _check_length(function, pdu, _FIXED_LENGTH[code])
    if code in (0x03, 0x04):
        _check_count("read", _u16(pdu, 3), function.max_read)
    return function


# -- read device identification (0x2B / 0x0E) ----------------------------------------------------


class ReadDeviceIdCode(IntEnum):
    """The read code of a read device identification request."""

    BASIC = 1  # stream access, objects 0x00..0x02
    REGULAR = 2  # stream access, objects 0x00..0x7F
    EXTENDED = 3  # stream access, objects 0x00..0xFF
    INDIVIDUAL = 4  # one object


#: conformity level the meter reports: extended identification, stream and individual access
CONFORMITY_LEVEL = 0x83


@dataclass(frozen=True, slots=True)
class DeviceObject:
    """One device identification object and the identification field that fills it."""

    object_id: int
    name: str
    source: str  # a field of the meter's identification (``protocols.registermap.Identification``)


#: the objects the meter serves, in object id order
DEVICE_OBJECTS: tuple[DeviceObject, ...] = (
    DeviceObject(0x00, "VendorName", "manufacturer"),
    DeviceObject(0x01, "ProductCode", "model"),
    DeviceObject(0x02, "MajorMinorRevision", "firmware"),
    DeviceObject(0x05, "ModelName", "model"),
    DeviceObject(0x80, "meter id", "meter_id"),
    DeviceObject(0x81, "serial number", "serial"),
    DeviceObject(0x82, "register map version", "map_version"),
)

#: the first object id past each stream category
_CATEGORY_END = {
    ReadDeviceIdCode.BASIC: 0x03,
    ReadDeviceIdCode.REGULAR: 0x80,
    ReadDeviceIdCode.EXTENDED: 0x100,
}


def select_objects(objects: Mapping[int, bytes], read_code: int, object_id: int) -> tuple[int, ...]:
    """The ids of the objects (of ``objects``, the meter's) that answer ``read_code`` from
    ``object_id``, in order; RequestRefused (02 or 03) for a request the meter refuses."""
    try:
        code = ReadDeviceIdCode(read_code)
    except ValueError as exc:
        raise RequestRefused(
            f"read device id code is 1..4, got {read_code}", ExceptionCode.ILLEGAL_DATA_VALUE
        ) from exc
    if code is ReadDeviceIdCode.INDIVIDUAL:
        if object_id not in objects:
            raise RequestRefused(
                f"no identification object {object_id:#04x}", ExceptionCode.ILLEGAL_DATA_ADDRESS
            )
        return (object_id,)
    end = _CATEGORY_END[code]
    in_category = sorted(oid for oid in objects if oid < end)
    start = object_id if object_id in in_category else 0
    return tuple(oid for oid in in_category if oid >= start)
