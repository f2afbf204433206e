"""A command's life in the head-end, as a table.

Everything that moves a command from one state to another lives here: the states, the
triggers and the one table of allowed transitions; :func:`advance` applies a trigger or raises
:class:`IllegalTransition`. A command is sent at most once per attempt and its signed envelope
is stored before the first send, so a resend after a crash is the same envelope and the meter's
sequence rule makes it harmless.

::

    queued ──send──> sent ──ack──> acknowledged ──verify──> verified
      │  ▲             │  │                    └─mismatch──> failed
      │  └──retry── retrying <─timeout─┘ refuse──────────────> failed
      ├── cancel / supersede (queued or retrying only: a sent command may have run)
      └── expire (queued, retrying or sent, once its deadline has passed)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from protocols.errors import HesError


class CommandState(StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    ACKNOWLEDGED = "acknowledged"  # the meter executed it (result OK)
    VERIFIED = "verified"  # read back: the meter is in the state the command asked for
    RETRYING = "retrying"  # no answer in time: it will be asked about, then sent again
    FAILED = "failed"  # the meter refused it, or the read-back does not match
    EXPIRED = "expired"  # its deadline passed before it was confirmed
    CANCELLED = "cancelled"  # by an operator, before it was sent
    SUPERSEDED = "superseded"  # a newer command of the opposite kind replaced it


class Trigger(StrEnum):
    SEND = "send"
    ACK = "ack"
    REFUSE = "refuse"
    TIMEOUT = "timeout"
    RETRY = "retry"
    VERIFY = "verify"
    MISMATCH = "mismatch"
    EXPIRE = "expire"
    CANCEL = "cancel"
    SUPERSEDE = "supersede"


Q, S, A = CommandState.QUEUED, CommandState.SENT, CommandState.ACKNOWLEDGED
R = CommandState.RETRYING

#: (state, trigger) -> next state; anything not here is illegal
TRANSITIONS: dict[tuple[CommandState, Trigger], CommandState] = {
    (Q, Trigger.SEND): S,
    (R, Trigger.SEND): S,
    (S, Trigger.ACK): A,
    (S, Trigger.REFUSE): CommandState.FAILED,
    (S, Trigger.TIMEOUT): R,
    (R, Trigger.ACK): A,  # asking the meter found it executed: no resend
    (R, Trigger.REFUSE): CommandState.FAILED,
    (R, Trigger.RETRY): R,
    (A, Trigger.VERIFY): CommandState.VERIFIED,
    (A, Trigger.MISMATCH): CommandState.FAILED,
    (Q, Trigger.EXPIRE): CommandState.EXPIRED,
    (R, Trigger.EXPIRE): CommandState.EXPIRED,
    (S, Trigger.EXPIRE): CommandState.EXPIRED,
    (Q, Trigger.CANCEL): CommandState.CANCELLED,
    (R, Trigger.CANCEL): CommandState.CANCELLED,
    (Q, Trigger.SUPERSEDE): CommandState.SUPERSEDED,
    (R, Trigger.SUPERSEDE): CommandState.SUPERSEDED,
}

TERMINAL = frozenset(
    {
        CommandState.VERIFIED,
        CommandState.FAILED,
        CommandState.EXPIRED,
        CommandState.CANCELLED,
        CommandState.SUPERSEDED,
    }
)
#: states in which the command occupies its meter's one slot for its kind
IN_FLIGHT = frozenset({Q, S, A, R})


class IllegalTransition(HesError):
    """A trigger the command's state does not allow (e.g. cancelling a sent command)."""


@dataclass(frozen=True, slots=True)
class Transition:
    old: CommandState
    new: CommandState
    trigger: Trigger
    reason: str


def advance(state: CommandState, trigger: Trigger, reason: str) -> Transition:
    """The transition ``trigger`` takes from ``state``; IllegalTransition if there is none."""
    new = TRANSITIONS.get((state, trigger))
    if new is None:
        if state in TERMINAL:
            raise IllegalTransition(f"the command is {state} already: it cannot {trigger}")
        raise IllegalTransition(f"a {state} command cannot {trigger}")
    return Transition(state, new, trigger, reason)


#: kinds that replace each other: a newer one supersedes an older pending one
OPPOSITES: dict[str, str] = {"disconnect": "reconnect", "reconnect": "disconnect"}
