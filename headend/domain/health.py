"""A meter's read health as a table: online, degraded, unreachable.

One failed read makes an online meter degraded; ``unreachable_after`` consecutive failures make
it unreachable; one good read makes it online again. Every change is a :class:`Change` that
storage keeps as an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocols.errors import ValidationError


class Health(StrEnum):
    UNKNOWN = "unknown"  # never read
    ONLINE = "online"
    DEGRADED = "degraded"  # failing, not yet given up on
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Change:
    old: Health
    new: Health
    reason: str


def after_read(
    health: Health, failures: int, ok: bool, error: str = "", unreachable_after: int = 3
) -> tuple[Health, int, Change | None]:
    """The health and consecutive-failure count after one read, and the change if any."""
    if unreachable_after < 1:
        raise ValidationError("unreachable_after is at least 1")
    if ok:
        new, count, reason = Health.ONLINE, 0, "read succeeded"
    else:
        count = failures + 1
        new = Health.UNREACHABLE if count >= unreachable_after else Health.DEGRADED
        reason = f"{count} consecutive failed read(s): {error}" if error else f"{count} failures"
    return new, count, (Change(health, new, reason) if new is not health else None)
