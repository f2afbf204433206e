"""A meter's id: the name the head-end, the topics and the fleet file use for one meter.

The rule is defined once, here: letters, digits, ``_``, ``.`` and ``-``, starting with a letter
or a digit, at most 64 characters. That makes an id safe as an MQTT topic level (no ``/``,
``+``, ``#`` or NUL), as a Mosquitto user name and client id, and as a file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from protocols.errors import ValidationError

#: the rule as a regular expression (anchored), for schemas that carry a pattern
METER_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
METER_ID_MAX_LENGTH: Final = 64
_METER_ID: Final = re.compile(METER_ID_PATTERN)


def is_meter_id(text: object) -> bool:
    """True when ``text`` is a str that follows the meter id rule."""
    return isinstance(text, str) and _METER_ID.fullmatch(text) is not None


def check_meter_id(text: object) -> str:
    """``text`` itself when it is a valid meter id; ValidationError otherwise."""
    if not isinstance(text, str) or _METER_ID.fullmatch(text) is None:
        raise ValidationError(
            f"a meter id is letters, digits, _ . - (max {METER_ID_MAX_LENGTH}), got {text!r}"
        )
    return text


@dataclass(frozen=True, slots=True, order=True)
class MeterId:
    """A validated meter id. ``str(MeterId("MTR-0001"))`` is ``"MTR-0001"``."""

    value: str

    def __post_init__(self) -> None:
        check_meter_id(self.value)

    def __str__(self) -> str:
        return self.value
