"""Supply control by policy: when to cut a customer off, and how to restore supply.

One pure function, :func:`decide`, of the account, the meter's last known state, the tariff's
calendar and the time: a :class:`Decision` with the action and the reason, in words an operator
can read back to a customer. The rules, in order:

* Supply is restored once the balance is positive again: straight to connected where the
  meter's control mode lets a remote reconnect close the relay (modes 2 and 4); otherwise the
  relay is armed (ready for reconnection) and the customer is told to press the button. A meter
  that reconnects by itself after a top-up (modes 5 and 6, from ready-for-reconnection) is left
  to do so.
* Supply is cut remotely only when credit and emergency credit are both exhausted, the relay is
  still closed (the meter has not opened it itself), and none of these holds: the meter cannot
  be disconnected (mode 0); the account is protected (medical need, the elderly) and the
  protection has not expired; it is a friendly period (hours, weekdays or a holiday of the
  tariff's calendar, in the tariff's time zone); the grace period after exhaustion has not
  passed; a payment for the account is on its way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import StrEnum

from protocols.disconnect import MODES, TRANSITIONS, ControlState, Trigger
from protocols.errors import ValidationError


class Action(StrEnum):
    NONE = "none"  # nothing to do
    WAIT = "wait"  # a disconnect is due but held back; ``until`` says until when, if known
    DISCONNECT = "disconnect"
    RECONNECT = "reconnect"  # a remote reconnect closes the relay
    ARM = "arm"  # a remote reconnect arms the relay; the customer presses the button
    NOTIFY_BUTTON = "notify_button"  # armed already: tell the customer to press the button


@dataclass(frozen=True, slots=True)
class Calendar:
    """When a tariff forbids cutting supply for lack of credit."""

    friendly_hours: tuple[tuple[int, int], ...] = ()  # (from, to) minutes of the local day
    friendly_weekdays: frozenset[int] = frozenset()  # ISO weekdays, 1 Monday .. 7 Sunday
    holidays: frozenset[date] = frozenset()
    utc_offset_minutes: int = 0  # the tariff's local time

    def __post_init__(self) -> None:
        for start, end in self.friendly_hours:
            if not 0 <= start < end <= 1440:
                raise ValidationError("friendly hours are (from, to) minutes of a day, from < to")
        if any(day not in range(1, 8) for day in self.friendly_weekdays):
            raise ValidationError("friendly weekdays are ISO weekday numbers 1..7")
        if not -14 * 60 <= self.utc_offset_minutes <= 14 * 60:
            raise ValidationError("a UTC offset is within ±14 h")

    def local(self, now: datetime) -> datetime:
        return now.astimezone(timezone(timedelta(minutes=self.utc_offset_minutes)))

    def friendly_until(self, now: datetime) -> datetime | None:
        """The end of the friendly period ``now`` is in, or None if it is not in one."""
        local = self.local(now)
        if not self._friendly(local):
            return None
        probe = local
        for _ in range(60 * 24 * 14):  # a friendly stretch ends within two weeks, minute steps
            probe = (probe + timedelta(minutes=1)).replace(second=0, microsecond=0)
            if not self._friendly(probe):
                return probe.astimezone(now.tzinfo)
        raise ValidationError("the calendar's friendly periods never end")

    def _friendly(self, local: datetime) -> bool:
        if local.date() in self.holidays or local.isoweekday() in self.friendly_weekdays:
            return True
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self.friendly_hours)


@dataclass(frozen=True, slots=True)
class AccountState:
    balance: int  # known balance in the account's unit (minor units or Wh); may be negative
    protected_until: datetime | None = None  # protection from disconnection, None: none
    protection_reason: str = ""
    exhausted_since: datetime | None = None  # when credit and emergency credit ran out
    payment_pending: bool = False  # a payment for the account is on its way to the meter


@dataclass(frozen=True, slots=True)
class MeterState:
    control_state: ControlState
    control_mode: int
    emergency_credit: int = 0  # emergency credit left
    disconnected_by_head_end: bool = False  # the last disconnect was the head-end's command


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str
    until: datetime | None = None  # for WAIT: when the hold ends, if known


def _allowed(mode: int, trigger: Trigger, state: ControlState) -> ControlState | None:
    for letter in MODES[mode]:
        kind, start, end = TRANSITIONS[letter]
        if kind is trigger and start is state:
            return end
    return None


def decide(
    account: AccountState,
    meter: MeterState,
    calendar: Calendar,
    now: datetime,
    grace: timedelta = timedelta(hours=1),
) -> Decision:
    """What the dispatcher should do for one meter now, and why."""
    if now.tzinfo is None:
        raise ValidationError("decide() needs an aware time")
    mode = meter.control_mode
    if mode not in MODES:
        raise ValidationError(f"control mode is 0..6, got {mode}")
    state = meter.control_state
    if mode == 0:
        return Decision(Action.NONE, "control mode 0: the supply is never cut")
    if account.balance > 0:
        if state is ControlState.CONNECTED:
            return Decision(Action.NONE, "in credit and connected")
        if state is ControlState.DISCONNECTED:
            after = _allowed(mode, Trigger.REMOTE_RECONNECT, state)
            if after is ControlState.CONNECTED:
                return Decision(
                    Action.RECONNECT, f"in credit again; mode {mode} reconnects remotely"
                )
            return Decision(
                Action.ARM,
                f"in credit again; mode {mode} arms the relay and the customer presses the button",
            )
        if _allowed(mode, Trigger.LOCAL_RECONNECT, state) and not meter.disconnected_by_head_end:
            return Decision(
                Action.NONE, f"in credit again; in mode {mode} the meter reconnects itself"
            )
        return Decision(Action.NOTIFY_BUTTON, "in credit again; the relay waits for the button")
    exhausted = account.balance <= 0 and meter.emergency_credit <= 0
    if not exhausted:
        return Decision(Action.NONE, "running on emergency credit")
    if state is not ControlState.CONNECTED:
        return Decision(Action.NONE, "out of credit and already off")
    if account.protected_until is not None and account.protected_until > now:
        why = f" ({account.protection_reason})" if account.protection_reason else ""
        return Decision(
            Action.WAIT,
            f"out of credit, but the account is protected{why}",
            account.protected_until,
        )
    friendly_end = calendar.friendly_until(now)
    if friendly_end is not None:
        return Decision(Action.WAIT, "out of credit, but it is a friendly period", friendly_end)
    if account.exhausted_since is None:
        return Decision(Action.WAIT, "out of credit just now: the grace period starts", now + grace)
    grace_end = account.exhausted_since + grace
    if now < grace_end:
        return Decision(Action.WAIT, "out of credit, within the grace period", grace_end)
    if account.payment_pending:
        return Decision(Action.WAIT, "out of credit, but a payment is on its way")
    return Decision(Action.DISCONNECT, "out of credit and emergency credit, grace period over")
