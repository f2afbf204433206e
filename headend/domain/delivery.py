"""A credit transfer's life on its way to a meter, as a table. Pure.

A payment to a remote-credit meter writes a transfer ``pending_delivery`` with the meter's next
transfer number. The credit deliverer takes it, stores its signed envelope and marks it
``sending`` *before* the envelope goes out: from then on the meter may have it, so it is never
cancelled again, only confirmed (``delivered``) or given up on a definite refusal (``failed``,
nothing applied). A meter applies each transfer number at most once (a repeat is acknowledged
and applied zero times, an older one refused), so the deliverer may resend freely; what it must
not do is mark a transfer delivered that the meter does not have, or deliver two of a meter's
transfers out of order (the meter would refuse the older one). Hence:

::

    pending_delivery ──send──> sending ──confirm──> delivered
          │                     │  ▲ └──refuse───> failed
          └──cancel──> cancelled└──┘ retry (no answer, busy, a stale sequence: re-signed)

A reversal cancels a transfer only while it is ``pending_delivery`` (or ``failed``: nothing
reached the meter) and not leased by a deliverer; a ``sending`` one is refused ("in delivery")
until it resolves.

A keypad meter's STS token is ``issued`` until the meter reports it accepted, then
``delivered``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final

from protocols.commands import CommandResult, ResultCode
from protocols.errors import HesError


class TransferState(StrEnum):
    PENDING = "pending_delivery"
    SENDING = "sending"  # its envelope may have reached the meter
    DELIVERED = "delivered"  # the meter acknowledged it or its last transfer number reached it
    FAILED = "failed"  # the meter refused it: nothing applied
    CANCELLED = "cancelled"  # reversed before it was sent
    ISSUED = "issued"  # an STS token, not yet reported accepted


class Step(StrEnum):
    SEND = "send"
    CONFIRM = "confirm"
    REFUSE = "refuse"
    RETRY = "retry"
    CANCEL = "cancel"
    ACCEPT = "accept"  # a token reported accepted by the meter


P, S = TransferState.PENDING, TransferState.SENDING

#: (state, step) -> next state; anything not here is illegal
TRANSITIONS: Final[dict[tuple[TransferState, Step], TransferState]] = {
    (P, Step.SEND): S,
    (S, Step.SEND): S,  # a resend (the same envelope, or re-signed after a stale sequence)
    (S, Step.CONFIRM): TransferState.DELIVERED,
    (S, Step.REFUSE): TransferState.FAILED,
    (S, Step.RETRY): S,
    (P, Step.CANCEL): TransferState.CANCELLED,
    (TransferState.FAILED, Step.CANCEL): TransferState.CANCELLED,
    (TransferState.ISSUED, Step.ACCEPT): TransferState.DELIVERED,
}

#: the states a deliverer works on
WORKABLE: Final = (P, S)
#: the states in which credit is owed to the meter and not yet confirmed
UNDELIVERED: Final = (P.value, S.value, TransferState.ISSUED.value)


class IllegalStep(HesError):
    """A step the transfer's state does not allow."""


def advance(state: TransferState, step: Step) -> TransferState:
    new = TRANSITIONS.get((state, step))
    if new is None:
        raise IllegalStep(f"a {state} transfer cannot {step}")
    return new


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RESIGN = "resign"  # the meter's command sequence is past the envelope's: sign anew, resend
    RETRY = "retry"  # try again later, the same envelope
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Judgement:
    verdict: Verdict
    reason: str


def judge(number: int, result: CommandResult) -> Judgement:
    """What the meter's answer to a transfer's envelope means for transfer ``number``: the
    answer carries the meter's last applied transfer number, which settles most cases."""
    code = result.code
    if code is ResultCode.OK:
        return Judgement(Verdict.DELIVERED, "the meter applied it")
    if code is ResultCode.DUPLICATE:
        return Judgement(Verdict.DELIVERED, "the meter had applied it before (a resend)")
    if result.last_transfer >= number:
        return Judgement(
            Verdict.DELIVERED,
            f"the meter's last transfer is {result.last_transfer} ({code.name.lower()})",
        )
    if code is ResultCode.REPLAYED:
        return Judgement(
            Verdict.RESIGN,
            "the meter's command sequence is past this envelope's and its last transfer is "
            f"{result.last_transfer}: signed again under a new sequence",
        )
    if code is ResultCode.BUSY:
        return Judgement(Verdict.RETRY, "the meter was busy")
    return Judgement(Verdict.FAILED, f"the meter refused it: {code.name.lower()}")


def read_back(number: int, last_transfer: int) -> bool:
    """Whether a meter whose last applied transfer is ``last_transfer`` has transfer
    ``number`` (transfers go to a meter in number order, so a higher one means it has)."""
    return last_transfer >= number


def retry_delay(attempts: int, base: timedelta, most: timedelta) -> timedelta:
    """The wait before the next attempt after ``attempts`` unconfirmed ones (doubling)."""
    wait: timedelta = base * 2 ** min(max(attempts - 1, 0), 32)
    return min(most, wait)


__all__ = [
    "TRANSITIONS",
    "UNDELIVERED",
    "WORKABLE",
    "IllegalStep",
    "Judgement",
    "Step",
    "TransferState",
    "Verdict",
    "advance",
    "judge",
    "read_back",
    "retry_delay",
]
