"""Token identifiers: minutes from the key's base date to the issue time, in 24 bits.

The base dates are 1993-01-01, 2014-01-01 and 2035-01-01 00:00 UTC. A base date covers 2**24
minutes (about 31.9 years): the 1993 one ran out on 2024-11-24, after which a meter must have moved
to the 2014 base date by a key change token with the rollover bit set.
"""

from __future__ import annotations

from datetime import UTC, datetime

from protocols.errors import ValidationError

TID_BITS = 24
TID_LIMIT = 1 << TID_BITS
BASE_DATES: tuple[int, ...] = (1993, 2014, 2035)


def base_epoch(base_date: int) -> int:
    """Epoch seconds of a base date (a year in BASE_DATES)."""
    if base_date not in BASE_DATES:
        raise ValidationError(f"a base date is one of {BASE_DATES}, got {base_date!r}")
    return int(datetime(base_date, 1, 1, tzinfo=UTC).timestamp())


def next_base_date(base_date: int) -> int:
    """The base date a rollover key change moves to."""
    index = BASE_DATES.index(base_date) if base_date in BASE_DATES else -1
    if index < 0 or index + 1 == len(BASE_DATES):
        raise ValidationError(f"no base date follows {base_date!r}")
    return BASE_DATES[index + 1]


def tid_from_time(epoch_seconds: float, base_date: int) -> int:
    """The TID of an issue time (minutes since the base date, the seconds dropped).

    A time before the base date or 2**24 minutes or more after it has no TID under that base date.
    """
    minutes = int((epoch_seconds - base_epoch(base_date)) // 60)
    if not 0 <= minutes < TID_LIMIT:
        when = datetime.fromtimestamp(epoch_seconds, UTC)
        raise ValidationError(f"{when:%Y-%m-%d %H:%M} UTC has no TID under base date {base_date}")
    return minutes


def time_from_tid(tid: int, base_date: int) -> int:
    """Epoch seconds of the minute a TID stands for."""
    if type(tid) is not int or not 0 <= tid < TID_LIMIT:
        raise ValidationError(f"a TID is 0..{TID_LIMIT - 1}, got {tid!r}")
    return base_epoch(base_date) + tid * 60
