"""The fast paths of the simulator's hot loops give exactly what the general paths give."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from protocols import registermap as rm
from protocols.errors import ValidationError

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
