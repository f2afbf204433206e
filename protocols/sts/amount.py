"""The 16-bit amount field of credit and power-limit tokens: a 2-bit exponent and a 14-bit mantissa.

``value = m * 10**e + sum(16384 * 10**(i - 1) for i in 1..e)``: steps of 1 up to 16383, then 10 up
to 180214, 100 up to 1818524 and 1000 up to :data:`AMOUNT_MAX` (for electricity the unit is
0.1 kWh: 0.1 kWh steps up to 1638.3 kWh, then 1, 10 and 100 kWh). Encoding rounds a value up to the
next representable one; a mantissa that would reach 16384 carries into the next exponent.
"""

from __future__ import annotations

from protocols.errors import ValidationError

MANTISSA_LIMIT = 1 << 14
_STEPS = (1, 10, 100, 1000)
#: the first value of each exponent: 0, 16384, 180224, 1818624
_OFFSETS = tuple(sum(MANTISSA_LIMIT * _STEPS[i] for i in range(e)) for e in range(4))
AMOUNT_MAX = _OFFSETS[3] + (MANTISSA_LIMIT - 1) * _STEPS[3]  # 18201624


def decode_amount(field: int) -> int:
    """The value of a 16-bit amount field."""
    if not 0 <= field <= 0xFFFF:
        raise ValidationError(f"an amount field is 16 bits, got {field!r}")
    exponent, mantissa = field >> 14, field & (MANTISSA_LIMIT - 1)
    return mantissa * _STEPS[exponent] + _OFFSETS[exponent]


def _split_up(value: int) -> tuple[int, int]:
    """(exponent, mantissa) of the smallest representable value >= ``value``."""
    if type(value) is not int or not 0 <= value <= AMOUNT_MAX:
        raise ValidationError(f"an amount is an integer 0..{AMOUNT_MAX}, got {value!r}")
    for exponent, (offset, step) in enumerate(zip(_OFFSETS, _STEPS, strict=True)):
        mantissa = max(0, -(-(value - offset) // step))  # ceil, never below the exponent's start
        if mantissa < MANTISSA_LIMIT:
            return exponent, mantissa
    raise AssertionError("unreachable: AMOUNT_MAX fits the largest exponent")  # pragma: no cover


def round_amount_up(value: int) -> int:
    """The smallest representable amount >= ``value`` (what a token of ``value`` carries)."""
    exponent, mantissa = _split_up(value)
    return mantissa * _STEPS[exponent] + _OFFSETS[exponent]


def is_representable(value: int) -> bool:
    return type(value) is int and 0 <= value <= AMOUNT_MAX and round_amount_up(value) == value


def encode_amount(value: int) -> int:
    """The 16-bit field of ``value``, which must be representable exactly (see round_amount_up)."""
    exponent, mantissa = _split_up(value)
    if mantissa * _STEPS[exponent] + _OFFSETS[exponent] != value:
        raise ValidationError(
            f"{value} is not representable in a token; the next amount that is: "
            f"{round_amount_up(value)}"
        )
    return exponent << 14 | mantissa
