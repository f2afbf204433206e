from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import HesError, ValidationError
from protocols.obis import Obis

VECTORS = [
    ("1.0.1.8.0.255", Obis(1, 0, 1, 8, 0, 255)),
    ("1-0:1.8.0*255", Obis(1, 0, 1, 8, 0, 255)),
    ("1-0:1.8.0", Obis(1, 0, 1, 8, 0, 255)),
    ("0.0.96.3.10.255", Obis(0, 0, 96, 3, 10, 255)),
    ("0-0:96.3.10*255", Obis(0, 0, 96, 3, 10, 255)),
    ("1.0.99.1.0.255", Obis(1, 0, 99, 1, 0, 255)),
    ("0.0.19.10.1.255", Obis(0, 0, 19, 10, 1, 255)),
    ("255.255.255.255.255.255", Obis(255, 255, 255, 255, 255, 255)),
    (" 1.0.32.7.0.255 ", Obis(1, 0, 32, 7, 0, 255)),
]


@pytest.mark.parametrize(("text", "expected"), VECTORS)
def test_parse_vectors(text: str, expected: Obis) -> None:
    assert Obis.parse(text) == expected


def test_format_both_ways() -> None:
    obis = Obis(1, 0, 1, 8, 0)
    assert str(obis) == "1.0.1.8.0.255"
    assert obis.reduced() == "1-0:1.8.0*255"
    assert obis.to_bytes() == bytes([1, 0, 1, 8, 0, 255])
    assert Obis.from_bytes(obis.to_bytes()) == obis


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1.0.1.8.0",
        "1.0.1.8.0.256",
        "1.0.1.8.0.255.1",
        "a.b.c.d.e.f",
        "1-0:1.8",
        "1.0.-1.8.0.255",
    ],
)
def test_parse_refuses(bad: str) -> None:
    with pytest.raises(ValidationError):
        Obis.parse(bad)


def test_groups_validated_and_ordered() -> None:
    with pytest.raises(ValidationError):
        Obis(1, 0, 1, 8, 300)
    with pytest.raises(ValidationError):
        Obis.from_bytes(b"\x01\x02")
    assert Obis(1, 0, 1, 8, 0) < Obis(1, 0, 1, 8, 1) < Obis(1, 0, 2, 8, 0)
    assert len({Obis(1, 0, 1, 8, 0), Obis.parse("1-0:1.8.0")}) == 1


groups = st.integers(0, 255)


@given(groups, groups, groups, groups, groups, groups)
def test_round_trip(a: int, b: int, c: int, d: int, e: int, f: int) -> None:
    obis = Obis(a, b, c, d, e, f)
    assert Obis.parse(str(obis)) == obis
    assert Obis.parse(obis.reduced()) == obis
    assert Obis.from_bytes(obis.to_bytes()) == obis


@given(st.text(max_size=40))
def test_any_text_parses_or_raises_validation_error(text: str) -> None:
    try:
        obis = Obis.parse(text)
    except HesError as exc:
        assert isinstance(exc, ValidationError)
    else:
        assert Obis.parse(str(obis)) == obis
