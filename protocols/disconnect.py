"""Disconnect control (DLMS class 70): the state machine, as tables.

Everything that affects the relay's state machine lives here: the states, the triggers, the
transitions a-h and the control modes 0-6 that allow a subset of them (IEC 62056-6-2 §4.5.8).
A trigger that the mode or the current state does not allow leaves the state as it is and raises
:class:`~protocols.errors.TransitionRefused`.
"""

from __future__ import annotations

from enum import Enum, IntEnum

from protocols.commands import ResultCode
from protocols.errors import TransitionRefused


class ControlState(IntEnum):
    DISCONNECTED = 0
    CONNECTED = 1
    READY_FOR_RECONNECTION = 2


class Trigger(Enum):
    REMOTE_DISCONNECT = "remote_disconnect"
    REMOTE_RECONNECT = "remote_reconnect"
    MANUAL_DISCONNECT = "manual_disconnect"
    MANUAL_RECONNECT = "manual_reconnect"
    LOCAL_DISCONNECT = "local_disconnect"
    LOCAL_RECONNECT = "local_reconnect"


#: transition letter -> (trigger, from state, to state)
TRANSITIONS: dict[str, tuple[Trigger, ControlState, ControlState]] = {
    "a": (Trigger.REMOTE_RECONNECT, ControlState.DISCONNECTED, ControlState.CONNECTED),
    "b": (Trigger.REMOTE_DISCONNECT, ControlState.CONNECTED, ControlState.DISCONNECTED),
    "c": (
        Trigger.REMOTE_DISCONNECT,
        ControlState.READY_FOR_RECONNECTION,
        ControlState.DISCONNECTED,
    ),
    "d": (
        Trigger.REMOTE_RECONNECT,
        ControlState.DISCONNECTED,
        ControlState.READY_FOR_RECONNECTION,
    ),
    "e": (
        Trigger.MANUAL_RECONNECT,
        ControlState.READY_FOR_RECONNECTION,
        ControlState.CONNECTED,
    ),
    "f": (
        Trigger.MANUAL_DISCONNECT,
        ControlState.CONNECTED,
        ControlState.READY_FOR_RECONNECTION,
    ),
    "g": (
        Trigger.LOCAL_DISCONNECT,
        ControlState.CONNECTED,
        ControlState.READY_FOR_RECONNECTION,
    ),
    "h": (
        Trigger.LOCAL_RECONNECT,
        ControlState.READY_FOR_RECONNECTION,
        ControlState.CONNECTED,
    ),
}

#: control mode -> the transitions it allows (mode 0: none, the output is always connected)
MODES: dict[int, frozenset[str]] = {
    0: frozenset(),
    1: frozenset("bcfgde"),
    2: frozenset("bcfgae"),
    3: frozenset("bcgde"),
    4: frozenset("bcgae"),
    5: frozenset("bcfgdeh"),
    6: frozenset("bcgdeh"),
}


#: control mode -> what it means for the customer and the operator, in one sentence
MODE_TEXT: dict[int, str] = {
    0: "Always connected: the relay never opens, whatever the credit, a remote command or "
    "the button (for supplies that must never be cut).",
    1: "A remote disconnect opens the relay; a remote reconnect only arms it (ready for "
    "reconnection) and the customer's button restores supply; the button also switches the "
    "supply off; running out of credit opens the relay, and after a top-up the customer "
    "presses the button.",
    2: "As mode 1, except that a remote reconnect closes the relay at once, without the "
    "customer's button.",
    3: "As mode 1, except that the customer's button cannot switch the supply off.",
    4: "As mode 2 (a remote reconnect closes the relay at once), and the customer's button "
    "cannot switch the supply off.",
    5: "As mode 1, and the meter reconnects by itself once a top-up (or a friendly period) "
    "restores the credit it was cut off for; a remote reconnect still waits for the button.",
    6: "As mode 5 without switching off at the button: a credit cut-off ends by itself after "
    "a top-up, while a remote reconnect leaves the relay waiting for the customer's button.",
}


def output_state(state: ControlState) -> bool:
    """The relay output is on only in the connected state."""
    return state is ControlState.CONNECTED


def find_transition(mode: int, state: ControlState, trigger: Trigger) -> tuple[str, ControlState]:
    """The transition ``trigger`` takes from ``state`` in ``mode``, or TransitionRefused.

    The refusal says first whether the mode forbids the trigger altogether (REFUSED_BY_MODE),
    then whether the mode allows it but not from the current state (REFUSED_BY_STATE).
    """
    if mode not in MODES:
        raise TransitionRefused(f"unknown control mode {mode}", ResultCode.BAD_ARGUMENT)
    allowed = [
        (letter, source, target)
        for letter, (trig, source, target) in TRANSITIONS.items()
        if trig is trigger and letter in MODES[mode]
    ]
    if not allowed:
        raise TransitionRefused(
            f"control mode {mode} does not allow {trigger.value}", ResultCode.REFUSED_BY_MODE
        )
    for letter, source, target in allowed:
        if source is state:
            return letter, target
    raise TransitionRefused(
        f"{trigger.value} has no transition from {state.name.lower()} in control mode {mode}",
        ResultCode.REFUSED_BY_STATE,
    )
