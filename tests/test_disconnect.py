"""Disconnect control (DLMS class 70) against the mode table of DESIGN.md §2.1.

The model below is written from the DESIGN tables, not imported from protocols.disconnect:
every mode x state x trigger is checked exhaustively, and a hypothesis state machine drives
protocols.cosem.DisconnectControl in each mode against the same model.

Refusal codes, as read from DESIGN ("a trigger that its mode does not allow ... is reported as
refused") and the ResultCode docs: a trigger whose column in the mode table is "-" (all of them
in mode 0) is REFUSED_BY_MODE whatever the state; a trigger the mode allows but that has no
transition from the current state ("nothing to do") is REFUSED_BY_STATE.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from protocols.commands import ResultCode
from protocols.cosem import OBIS_DISCONNECT, DisconnectControl
from protocols.disconnect import ControlState, Trigger, find_transition
from protocols.errors import CommandRefused, TransitionRefused, ValidationError

DISCONNECTED, CONNECTED, READY = 0, 1, 2
STATES = (DISCONNECTED, CONNECTED, READY)

REMOTE_DISC = "remote_disconnect"
MANUAL_DISC = "manual_disconnect"
LOCAL_DISC = "local_disconnect"
REMOTE_RECONN = "remote_reconnect"
MANUAL_RECONN = "manual_reconnect"
LOCAL_RECONN = "local_reconnect"
TRIGGERS = (REMOTE_DISC, MANUAL_DISC, LOCAL_DISC, REMOTE_RECONN, MANUAL_RECONN, LOCAL_RECONN)

# DESIGN.md: transition -> (trigger, from, to)
MODEL_TRANSITIONS = {
    "a": (REMOTE_RECONN, DISCONNECTED, CONNECTED),
    "b": (REMOTE_DISC, CONNECTED, DISCONNECTED),
    "c": (REMOTE_DISC, READY, DISCONNECTED),
    "d": (REMOTE_RECONN, DISCONNECTED, READY),
    "e": (MANUAL_RECONN, READY, CONNECTED),
    "f": (MANUAL_DISC, CONNECTED, READY),
    "g": (LOCAL_DISC, CONNECTED, READY),
    "h": (LOCAL_RECONN, READY, CONNECTED),
}

# DESIGN.md mode table, column by column: trigger -> transitions the mode allows ("" = "-")
_COLUMNS = (REMOTE_DISC, MANUAL_DISC, LOCAL_DISC, REMOTE_RECONN, MANUAL_RECONN, LOCAL_RECONN)
_ROWS = {
    0: ("", "", "", "", "", ""),
    1: ("bc", "f", "g", "d", "e", ""),
    2: ("bc", "f", "g", "a", "e", ""),
    3: ("bc", "", "g", "d", "e", ""),
    4: ("bc", "", "g", "a", "e", ""),
    5: ("bc", "f", "g", "d", "e", "h"),
    6: ("bc", "", "g", "d", "e", "h"),
}
MODE_TABLE: dict[int, dict[str, str]] = {
    mode: dict(zip(_COLUMNS, row, strict=True)) for mode, row in _ROWS.items()
}


def expected(mode: int, state: int, trigger: str) -> tuple[str, int] | ResultCode:
    """(letter, target state) or the refusal code, from the DESIGN tables alone."""
    allowed = MODE_TABLE[mode][trigger]
    if not allowed:
        return ResultCode.REFUSED_BY_MODE
    for letter in allowed:
        trig, source, target = MODEL_TRANSITIONS[letter]
        assert trig == trigger
        if source == state:
            return letter, target
    return ResultCode.REFUSED_BY_STATE


def _cases() -> list[object]:
    return [
        pytest.param(mode, state, trigger, id=f"m{mode}-s{state}-{trigger}")
        for mode, state, trigger in itertools.product(range(7), STATES, TRIGGERS)
        if mode != 0 or state == CONNECTED  # mode 0: always connected, no other state exists
    ]


@pytest.mark.parametrize(("mode", "state", "trigger"), _cases())
def test_mode_table_cell(mode: int, state: int, trigger: str) -> None:
    control = DisconnectControl(OBIS_DISCONNECT, control_mode=mode)
    control.control_state = ControlState(state)
    want = expected(mode, state, trigger)
    if isinstance(want, ResultCode):
        with pytest.raises(TransitionRefused) as info:
            control.fire(Trigger(trigger))
        assert info.value.code == want
        assert control.control_state == state  # a refusal leaves the state as it is
    else:
        letter, target = want
        assert control.fire(Trigger(trigger)) == letter
        assert control.control_state == target
        assert control.output_state is (target == CONNECTED)


def test_transition_refused_is_a_command_refused() -> None:
    control = DisconnectControl(OBIS_DISCONNECT, control_mode=1)
    with pytest.raises(CommandRefused):
        control.fire(Trigger.LOCAL_RECONNECT)


def test_unknown_mode_is_bad_argument() -> None:
    with pytest.raises(TransitionRefused) as info:
        find_transition(7, ControlState.CONNECTED, Trigger.REMOTE_DISCONNECT)
    assert info.value.code == ResultCode.BAD_ARGUMENT


@pytest.mark.parametrize("mode", [-1, 7, 70])
def test_object_refuses_an_unknown_mode(mode: int) -> None:
    with pytest.raises(ValidationError):
        DisconnectControl(OBIS_DISCONNECT, control_mode=mode)
    control = DisconnectControl(OBIS_DISCONNECT, control_mode=1)
    with pytest.raises(ValidationError):
        control.set_mode(mode)
    assert control.control_mode == 1


def test_mode_zero_is_always_connected() -> None:
    control = DisconnectControl(
        OBIS_DISCONNECT, control_mode=0, control_state=ControlState.DISCONNECTED
    )
    assert control.control_state is ControlState.CONNECTED
    other = DisconnectControl(OBIS_DISCONNECT, control_mode=1)
    other.remote_disconnect()
    other.set_mode(0)
    assert other.control_state is ControlState.CONNECTED
    assert other.output_state is True


def test_remote_methods_fire_their_triggers() -> None:
    control = DisconnectControl(OBIS_DISCONNECT, control_mode=2)
    assert control.remote_disconnect() == "b"
    assert control.control_state is ControlState.DISCONNECTED
    assert control.remote_reconnect() == "a"
    assert control.control_state is ControlState.CONNECTED
    control.set_mode(1)
    control.remote_disconnect()
    assert control.remote_reconnect() == "d"
    assert control.control_state is ControlState.READY_FOR_RECONNECTION
    assert control.remote_disconnect() == "c"


def test_attributes_by_index() -> None:
    control = DisconnectControl(OBIS_DISCONNECT, control_mode=5)
    assert control.get(1) == OBIS_DISCONNECT
    assert control.get(2) is True  # output_state
    assert control.get(3) == ControlState.CONNECTED
    assert control.get(4) == 5
    control.fire(Trigger.MANUAL_DISCONNECT)
    assert control.get(2) is False
    assert control.get(3) == ControlState.READY_FOR_RECONNECTION
    assert control.CLASS_ID == 70
    assert control.METHODS == ("remote_disconnect", "remote_reconnect")


def test_implementation_tables_match_design() -> None:
    """A direct check of the published tables (the behaviour tests above are the real proof)."""
    from protocols.disconnect import MODES, TRANSITIONS

    assert {k: (t.value, int(s), int(d)) for k, (t, s, d) in TRANSITIONS.items()} == (
        MODEL_TRANSITIONS
    )
    assert {mode: frozenset("".join(row.values())) for mode, row in MODE_TABLE.items()} == MODES


# -- the state machine, one per mode --------------------------------------------------------------


class _DisconnectMachine(RuleBasedStateMachine):
    MODE = 0

    def __init__(self) -> None:
        super().__init__()
        self.control = DisconnectControl(OBIS_DISCONNECT, control_mode=self.MODE)
        self.state = CONNECTED

    @initialize(start=st.sampled_from(STATES))
    def start_in(self, start: int) -> None:
        if self.MODE == 0:
            start = CONNECTED
        self.control.control_state = ControlState(start)
        self.state = start

    def _apply(self, trigger: str, call: Callable[[], str]) -> None:
        want = expected(self.MODE, self.state, trigger)
        if isinstance(want, ResultCode):
            with pytest.raises(TransitionRefused) as info:
                call()
            assert info.value.code == want
        else:
            letter, target = want
            assert call() == letter
            self.state = target

    @rule(trigger=st.sampled_from(TRIGGERS))
    def fire(self, trigger: str) -> None:
        self._apply(trigger, lambda: self.control.fire(Trigger(trigger)))

    @rule()
    def remote_disconnect_method(self) -> None:
        self._apply(REMOTE_DISC, self.control.remote_disconnect)

    @rule()
    def remote_reconnect_method(self) -> None:
        self._apply(REMOTE_RECONN, self.control.remote_reconnect)

    @invariant()
    def state_agrees(self) -> None:
        assert self.control.control_state == self.state
        assert self.control.output_state is (self.state == CONNECTED)
        assert self.control.control_mode == self.MODE
        if self.MODE == 0:
            assert self.state == CONNECTED


def _machine(mode: int) -> type:
    machine = type(f"DisconnectMode{mode}", (_DisconnectMachine,), {"MODE": mode})
    case = machine.TestCase
    case.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
    return case


TestDisconnectMode0 = _machine(0)
TestDisconnectMode1 = _machine(1)
TestDisconnectMode2 = _machine(2)
TestDisconnectMode3 = _machine(3)
TestDisconnectMode4 = _machine(4)
TestDisconnectMode5 = _machine(5)
TestDisconnectMode6 = _machine(6)


def test_every_mode_reaches_every_reachable_state() -> None:
    """The model itself: from connected, each of modes 1..6 can reach all three states."""
    for mode in range(1, 7):
        seen = {CONNECTED}
        frontier = [CONNECTED]
        while frontier:
            state = frontier.pop()
            for trigger in TRIGGERS:
                want = expected(mode, state, trigger)
                if not isinstance(want, ResultCode) and want[1] not in seen:
                    seen.add(want[1])
                    frontier.append(want[1])
        assert seen == set(STATES), mode
