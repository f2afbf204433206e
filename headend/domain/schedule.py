"""When to read each meter: spread evenly over the poll interval, and back off on failure."""

from __future__ import annotations

import hashlib

from protocols.errors import ValidationError


def slot(meter_id: str, interval: float) -> float:
    """The meter's fixed offset into every poll interval, in seconds.

    A stable hash of the id, so every worker and every restart agrees without coordination and
    a fleet lands evenly across the interval instead of all at once."""
    if not interval > 0:
        raise ValidationError("a poll interval is positive")
    digest = hashlib.sha256(meter_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


def next_due(meter_id: str, interval: float, now: float) -> float:
    """The first instant after ``now`` at the meter's slot in the interval grid."""
    offset = slot(meter_id, interval)
    cycles = (now - offset) // interval + 1
    return cycles * interval + offset


def retry_delay(attempt: int, base: float, cap: float, draw: float) -> float:
    """Exponential back-off with equal jitter: ``draw`` in [0, 1) picks within the upper half,
    so retries of many meters do not arrive together."""
    if attempt < 0 or not 0 <= draw < 1 or base <= 0 or cap < base:
        raise ValidationError("retry_delay: attempt >= 0, 0 <= draw < 1, 0 < base <= cap")
    ceiling = min(cap, base * float(2**attempt))
    return ceiling / 2 + ceiling / 2 * draw
