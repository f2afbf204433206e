"""The supply-control policy as a table: (account, meter, calendar, now) -> action and reason."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from headend.domain.policy import AccountState, Action, Calendar, MeterState, decide
from protocols.disconnect import ControlState
from protocols.errors import ValidationError

C, D, R = ControlState.CONNECTED, ControlState.DISCONNECTED, ControlState.READY_FOR_RECONNECTION
TUE_NOON = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)  # a Tuesday
CAL = Calendar(
    friendly_hours=((0, 6 * 60), (18 * 60, 24 * 60)),
    friendly_weekdays=frozenset({7}),
    holidays=frozenset({date(2026, 3, 4)}),
)
LONG_AGO = TUE_NOON - timedelta(days=1)


def out(**kw: object) -> AccountState:
    return AccountState(balance=0, exhausted_since=LONG_AGO, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("account", "meter", "now", "action", "reason"),
    [
        # cutting off
        (out(), MeterState(C, 6), TUE_NOON, Action.DISCONNECT, "grace period over"),
        (out(), MeterState(C, 0), TUE_NOON, Action.NONE, "never cut"),
        (out(), MeterState(R, 6), TUE_NOON, Action.NONE, "already off"),
        (out(), MeterState(C, 6, emergency_credit=500), TUE_NOON, Action.NONE, "emergency"),
        (out(protected_until=TUE_NOON + timedelta(days=30), protection_reason="medical"),
         MeterState(C, 6), TUE_NOON, Action.WAIT, "protected (medical)"),
        (out(protected_until=TUE_NOON - timedelta(days=1)), MeterState(C, 6), TUE_NOON,
         Action.DISCONNECT, "grace period over"),
        (out(), MeterState(C, 6), TUE_NOON.replace(hour=19), Action.WAIT, "friendly period"),
        (out(), MeterState(C, 6), TUE_NOON.replace(hour=5), Action.WAIT, "friendly period"),
        (out(), MeterState(C, 6), TUE_NOON + timedelta(days=1), Action.WAIT, "friendly period"),
        (out(), MeterState(C, 6), TUE_NOON + timedelta(days=5), Action.WAIT, "friendly period"),
        (AccountState(balance=0), MeterState(C, 6), TUE_NOON, Action.WAIT, "grace period starts"),
        (AccountState(balance=-10, exhausted_since=TUE_NOON - timedelta(minutes=30)),
         MeterState(C, 6), TUE_NOON, Action.WAIT, "within the grace period"),
        (out(payment_pending=True), MeterState(C, 6), TUE_NOON, Action.WAIT, "payment"),
        # restoring supply
        (AccountState(balance=100), MeterState(C, 6), TUE_NOON, Action.NONE, "connected"),
        (AccountState(balance=100), MeterState(D, 2), TUE_NOON, Action.RECONNECT, "mode 2"),
        (AccountState(balance=100), MeterState(D, 4), TUE_NOON, Action.RECONNECT, "mode 4"),
        (AccountState(balance=100), MeterState(D, 6), TUE_NOON, Action.ARM, "presses the button"),
        (AccountState(balance=100), MeterState(D, 1), TUE_NOON, Action.ARM, "presses the button"),
        (AccountState(balance=100), MeterState(R, 6), TUE_NOON, Action.NONE, "reconnects itself"),
        (AccountState(balance=100), MeterState(R, 5), TUE_NOON, Action.NONE, "reconnects itself"),
        (AccountState(balance=100), MeterState(R, 3), TUE_NOON, Action.NOTIFY_BUTTON, "button"),
        (AccountState(balance=100), MeterState(R, 6, disconnected_by_head_end=True), TUE_NOON,
         Action.NOTIFY_BUTTON, "button"),
    ],
)  # fmt: skip
def test_decisions(
    account: AccountState, meter: MeterState, now: datetime, action: Action, reason: str
) -> None:
    decision = decide(account, meter, CAL, now)
    assert decision.action is action
    assert reason in decision.reason


def test_a_hold_says_until_when() -> None:
    evening = TUE_NOON.replace(hour=19)
    # Tuesday night runs into the Wednesday holiday and on through Thursday's night hours
    assert decide(out(), MeterState(C, 6), CAL, evening).until == datetime(
        2026, 3, 5, 6, 0, tzinfo=UTC
    )
    started = AccountState(balance=0, exhausted_since=TUE_NOON - timedelta(minutes=20))
    assert decide(started, MeterState(C, 6), CAL, TUE_NOON).until == TUE_NOON + timedelta(
        minutes=40
    )


def test_the_calendar_runs_in_the_tariffs_local_time() -> None:
    nairobi = Calendar(friendly_hours=((18 * 60, 24 * 60),), utc_offset_minutes=180)
    at_15_utc = TUE_NOON.replace(hour=15)  # 18:00 in Nairobi
    assert decide(out(), MeterState(C, 6), nairobi, at_15_utc).action is Action.WAIT
    assert decide(out(), MeterState(C, 6), Calendar(), at_15_utc).action is Action.DISCONNECT


@pytest.mark.parametrize(
    "calendar",
    [
        {"friendly_hours": ((600, 300),)},
        {"friendly_weekdays": frozenset({8})},
        {"utc_offset_minutes": 15 * 60},
    ],
)
def test_bad_calendars(calendar: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Calendar(**calendar)  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    with pytest.raises(ValidationError):
        decide(out(), MeterState(C, 9), CAL, TUE_NOON)
    with pytest.raises(ValidationError):
        decide(out(), MeterState(C, 6), CAL, datetime(2026, 3, 3))
    always = Calendar(friendly_weekdays=frozenset(range(1, 8)))
    with pytest.raises(ValidationError, match="never end"):
        decide(out(), MeterState(C, 6), always, TUE_NOON)
