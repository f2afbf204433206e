"""The fast paths of the simulator's and the head-end's hot loops give exactly what the general
paths give."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import registermap as rm
from protocols.cosem import CreditUnit
from protocols.disconnect import ControlState
from protocols.errors import DecodeError, ValidationError
from protocols.readings import SNAPSHOT_VALUE_FIELDS, MeterSnapshot, StatusFlag

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**65),
    st.integers(0, 70_000),
    st.just(1.5),
    st.text(max_size=40),
    st.binary(max_size=40),
)


def _outcome(encode: Any) -> Any:
    try:
        return encode()
    except ValidationError as exc:
        return ("refused", str(exc))


@given(st.sampled_from(list(rm.Block)), st.data(), st.sampled_from(rm.WORD_ORDERS))
def test_encode_list_is_encode(block: rm.Block, data: st.DataObject, order: rm.WordOrder) -> None:
    rows = rm.BLOCKS[block].rows
    values = [data.draw(VALUES) for _ in rows]
    codec = rm.RowsCodec(rows)
    by_name = {row.name: value for row, value in zip(rows, values, strict=True)}
    assert _outcome(lambda: codec.encode_list(values, order)) == _outcome(
        lambda: codec.encode(by_name, order)
    )


def _decoded(decode: Any) -> Any:
    try:
        snapshot = decode()
    except (DecodeError, ValidationError) as exc:
        return ("refused", type(exc).__name__, str(exc))
    return snapshot, [type(getattr(snapshot, name)) for name in SNAPSHOT_VALUE_FIELDS]


def _plausible_snapshot_registers(draw: st.DrawFn, order: rm.WordOrder) -> list[int]:
    """The registers of a snapshot a meter could send, some of them then overwritten."""
    state = draw(st.sampled_from(list(ControlState)))
    u64 = st.integers(0, 2**64 - 1)
    snapshot = MeterSnapshot(
        "MTR-1",
        draw(u64),
        draw(u64),
        (draw(u64), draw(u64), draw(u64), draw(u64)),
        draw(st.integers(-(2**31), 2**31 - 1)),
        draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(-1000, 1000)),
        draw(st.integers(0, 0xFFFF)),
        draw(u64),
        draw(u64),
        draw(u64),
        draw(st.sampled_from(list(CreditUnit))),
        draw(st.sampled_from(["KES", "Wh", "", "€"])),
        draw(st.integers(-4, 0)),
        draw(u64),
        state,
        draw(st.integers(0, 6)),
        StatusFlag(draw(st.integers(0, 2**32 - 1))),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
        draw(st.integers(0, 2**32 - 1)),
    )
    registers = rm.encode_snapshot(snapshot, order)
    for _ in range(draw(st.integers(0, 3))):
        index = draw(st.integers(0, len(registers) - 1))
        registers[index] = draw(st.integers(0, 0xFFFF))
    return registers


REGISTER = st.one_of(
    st.integers(0, 0xFFFF), st.integers(-5, 70_000), st.booleans(), st.just(1.0), st.none()
)


@given(st.data(), st.sampled_from(rm.WORD_ORDERS), st.sampled_from(["MTR-1", "", "a b"]))
def test_decode_snapshot_is_decode_snapshot_rows(
    data: st.DataObject, order: rm.WordOrder, meter_id: str
) -> None:
    registers: list[Any] = data.draw(
        st.one_of(
            st.builds(lambda d: _plausible_snapshot_registers(d.draw, order), st.data()),
            st.lists(REGISTER, min_size=rm.SNAPSHOT_SIZE, max_size=rm.SNAPSHOT_SIZE),
            st.lists(st.integers(0, 0xFFFF), max_size=rm.SNAPSHOT_SIZE + 2),
        )
    )
    assert _decoded(lambda: rm.decode_snapshot(registers, meter_id, order)) == _decoded(
        lambda: rm.decode_snapshot_rows(registers, meter_id, order)
    )


def test_decode_snapshot_refuses_what_the_rows_refuse() -> None:
    with pytest.raises(ValidationError, match="word order"):
        rm.decode_snapshot([0] * rm.SNAPSHOT_SIZE, "MTR-1", "middle")  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match=f"{rm.SNAPSHOT_SIZE} registers expected"):
        rm.decode_snapshot([0] * 3, "MTR-1")
