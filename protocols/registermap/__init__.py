"""The Modbus register map: one declarative table, and pure codecs driven by it.

Every value a meter exposes over Modbus is one :class:`Row` of :data:`ROWS`: its table (input
registers, read with function 04, or holding registers, read with 03 and written with 06/16/23),
its address, data type, scaler, unit, access, and the COSEM object (OBIS code + attribute) it
stands for. The simulator's datastore, the head-end's link, ``docs/register-map.md`` and
``meter-sim register-map --json`` are all generated from this table.

The package's modules, each importing only the ones before it:

* :mod:`~protocols.registermap.datatypes`: the data types and the value codecs (one value in
  its registers);
* :mod:`~protocols.registermap.table`: the table (rows, blocks, addresses);
* :mod:`~protocols.registermap.messages`: the message codecs (blocks, snapshot, command,
  result, record windows).

Every public name is re-exported here: ``from protocols import registermap as rm``, ``rm.ROW``.

Conventions
-----------
* Addresses are PDU addresses, starting at 0 (``mbpoll -0``).
* Integers only for cumulative energy and money: amounts are ``u64`` (Wh, or minor currency units
  of the account), counters and sequence numbers ``u32``. ``f32`` appears only in the
  ``floats`` block, a convenience copy of the instantaneous measurements.
* Word order of multi-register numbers is big-endian (most significant word first) by default and
  little-endian for a meter configured with ``word_order = "little"``; the ``word_order``
  register (input 1) says which, and reads the same in both. Bytes inside a register are always
  big-endian, as Modbus prescribes. Strings, the 20-digit token and the tag are not word-swapped.
* "Not implemented": an ``optional`` row of a meter that lacks the feature reads as the
  sentinel of its type (all ones for unsigned, the minimum for signed, NaN for f32), which the
  decoders turn into ``None``.

Refused writes
--------------
* **Exception 02** (illegal data address): a write that touches an unmapped or read-only
  register (of any table), or a read that touches an unmapped register. Nothing is written.
* **Exception 03** (illegal data value): a write whose value no meter could accept, whatever its
  state: a ``go``/``enter`` register other than 0 or 1, a command code other than 0..9, a token
  digit group above 9999, or a command block that does not decode to a well-formed command when
  ``go`` is written (sequence 0, unknown code, an argument outside the command's range). Nothing
  is written, nothing is executed, the result block is unchanged, no event is logged.
* **A result code** in the result block (and an event in the log): everything that depends on
  the meter's keys or state: a forged or missing tag (``AUTH_FAILED``), a sequence number already
  used (``REPLAYED``), an old or repeated credit transfer, an amount outside the meter's limits,
  a transition the control mode refuses.
"""

from __future__ import annotations

from protocols.registermap.datatypes import (
    DEC20_MAX,
    INTEGER_TYPES,
    MAP_VERSION,
    MAX_READ,
    MAX_WRITE,
    ORDER_PROBE,
    TYPE_CODECS,
    WORD_ORDERS,
    Access,
    Block,
    DataType,
    Row,
    Table,
    TypeCodec,
    WordOrder,
    check_order,
    check_written,
    decode_value,
    encode_value,
    sentinel,
)
from protocols.registermap.messages import (
    Identification,
    RowsCodec,
    SnapshotReader,
    command_registers,
    cosem_values,
    decode_block,
    decode_command,
    decode_event_window,
    decode_identification,
    decode_profile_window,
    decode_result,
    decode_rows,
    decode_snapshot,
    decode_snapshot_rows,
    encode_block,
    encode_command,
    encode_event_window,
    encode_identification,
    encode_profile_window,
    encode_result,
    encode_rows,
    encode_snapshot,
    encode_snapshot_values,
    float_values,
    token_digits,
    token_number,
)
from protocols.registermap.table import (
    ARG_SLOTS,
    BLOCKS,
    COMMAND_SIZE,
    COMMAND_START,
    EVENT_FIELDS,
    EVENT_WINDOW_ROWS,
    PROFILE_FIELDS,
    PROFILE_WINDOW_ROWS,
    RESULT_SIZE,
    RESULT_START,
    ROW,
    ROW_FIELDS,
    ROWS,
    SNAPSHOT_SIZE,
    SNAPSHOT_START,
    BlockSpec,
    row_as_dict,
    rows_of,
    table_as_json,
    table_size,
)

__all__ = [
    "ARG_SLOTS",
    "BLOCKS",
    "COMMAND_SIZE",
    "COMMAND_START",
    "DEC20_MAX",
    "EVENT_FIELDS",
    "EVENT_WINDOW_ROWS",
    "INTEGER_TYPES",
    "MAP_VERSION",
    "MAX_READ",
    "MAX_WRITE",
    "ORDER_PROBE",
    "PROFILE_FIELDS",
    "PROFILE_WINDOW_ROWS",
    "RESULT_SIZE",
    "RESULT_START",
    "ROW",
    "ROWS",
    "ROW_FIELDS",
    "SNAPSHOT_SIZE",
    "SNAPSHOT_START",
    "TYPE_CODECS",
    "WORD_ORDERS",
    "Access",
    "Block",
    "BlockSpec",
    "DataType",
    "Identification",
    "Row",
    "RowsCodec",
    "SnapshotReader",
    "Table",
    "TypeCodec",
    "WordOrder",
    "check_order",
    "check_written",
    "command_registers",
    "cosem_values",
    "decode_block",
    "decode_command",
    "decode_event_window",
    "decode_identification",
    "decode_profile_window",
    "decode_result",
    "decode_rows",
    "decode_snapshot",
    "decode_snapshot_rows",
    "decode_value",
    "encode_block",
    "encode_command",
    "encode_event_window",
    "encode_identification",
    "encode_profile_window",
    "encode_result",
    "encode_rows",
    "encode_snapshot",
    "encode_snapshot_values",
    "encode_value",
    "float_values",
    "row_as_dict",
    "rows_of",
    "sentinel",
    "table_as_json",
    "table_size",
    "token_digits",
    "token_number",
]
