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

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final

from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.disconnect import ControlState
from protocols.errors import HesError, ValidationError


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


class Kind(StrEnum):
    """What the head-end asks of a meter's supply."""

    DISCONNECT = "disconnect"
    RECONNECT = "reconnect"


#: the meter command each kind sends
COMMAND_OF: Final[dict[Kind, Callable[[], Command]]] = {
    Kind.DISCONNECT: Command.remote_disconnect,
    Kind.RECONNECT: Command.remote_reconnect,
}

#: control modes in which a remote reconnect closes the relay (transition a); in the others it
#: arms it (d) and the customer presses the button
RECONNECTS_REMOTELY: Final = frozenset({2, 4})


def parse_kind(text: str) -> Kind:
    try:
        return Kind(text)
    except ValueError:
        raise ValidationError(
            f"a command kind is {' or '.join(k.value for k in Kind)}, got {text!r}"
        ) from None


def pack_envelope(envelope: CommandEnvelope) -> bytes:
    """The envelope as stored: JSON of meter, sequence, code, arguments and tag (hex)."""
    return json.dumps(
        {
            "meter_id": envelope.meter_id,
            "sequence": envelope.sequence,
            "code": int(envelope.command.code),
            "args": list(envelope.command.args),
            "tag": envelope.tag.hex(),
        },
        separators=(",", ":"),
    ).encode()


def unpack_envelope(data: bytes) -> CommandEnvelope:
    """The stored envelope back; ValidationError if it does not decode (an edited row)."""
    try:
        fields = json.loads(data)
        return CommandEnvelope(
            str(fields["meter_id"]),
            int(fields["sequence"]),
            Command(fields["code"], tuple(int(a) for a in fields["args"])),
            bytes.fromhex(fields["tag"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError(f"a stored command envelope does not decode: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt's answer means for the command: the trigger and its reason."""

    trigger: Trigger
    reason: str


def judge_result(code: ResultCode) -> Outcome:
    """The trigger for the meter's answer to the envelope."""
    if code.accepted:
        return Outcome(Trigger.ACK, f"the meter executed it ({code.name.lower()})")
    if code is ResultCode.REFUSED_BY_STATE:  # the read-back says whether it was there already
        return Outcome(Trigger.ACK, "the meter had nothing to do: the relay state refused it")
    if code is ResultCode.BUSY:
        return Outcome(Trigger.TIMEOUT, "the meter was busy")
    if code is ResultCode.REPLAYED:
        return Outcome(
            Trigger.REFUSE,
            "the meter's command sequence is past this command's (a command sent around the "
            "head-end?); not resent under a new number, as it may have run",
        )
    return Outcome(Trigger.REFUSE, f"the meter refused it: {code.name.lower()}")


def judge_state(kind: Kind, control_mode: int, state: ControlState) -> Outcome:
    """VERIFY when the relay, read back, is where ``kind`` asked for, else MISMATCH."""
    name = state.name.lower()
    if kind is Kind.DISCONNECT:
        ok = state is ControlState.DISCONNECTED
        wanted = "disconnected"
    elif control_mode in RECONNECTS_REMOTELY:
        ok = state is ControlState.CONNECTED
        wanted = "connected"
    else:  # armed; a mode-5/6 meter in credit may go on to connected by itself
        ok = state in (ControlState.READY_FOR_RECONNECTION, ControlState.CONNECTED)
        wanted = "ready for reconnection or connected"
    if ok:
        return Outcome(Trigger.VERIFY, f"read back: the relay is {name}")
    return Outcome(Trigger.MISMATCH, f"read back: the relay is {name}, not {wanted}")


def retry_delay(attempts: int, base: timedelta, most: timedelta) -> timedelta:
    """The wait before the next attempt after ``attempts`` unanswered ones (doubling)."""
    wait: timedelta = base * 2 ** min(max(attempts - 1, 0), 32)
    return min(most, wait)
