"""Double-entry ledger rules: accounts, postings, transactions and corrections. Pure.

Amounts are integer minor units of one currency. A posting's amount is signed: a debit is
positive, a credit negative; the postings of a transaction sum to zero in each currency. A
transaction, once built, never changes: a correction is a new transaction that names the one it
corrects (:func:`reversal` builds the exact opposite).

Errors (all :class:`~protocols.errors.ValidationError`, so the CLI prints one line)::

    LedgerError
    ├── Unbalanced          the postings of a currency do not sum to zero
    ├── BadPosting          a posting of zero, of a non-integer, or on an account with no owner
    └── BadCorrection       a correction that names no transaction, or a plain one that names one
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from protocols.errors import ValidationError
from protocols.units import Money


class LedgerError(ValidationError):
    """A ledger rule refused a transaction."""


class Unbalanced(LedgerError):
    """The postings of a currency do not sum to zero."""


class BadPosting(LedgerError):
    """A posting of zero or not an integer, or an account that is not one."""


class BadCorrection(LedgerError):
    """A correction without the transaction it corrects, or a plain transaction with one."""


class AccountKind(StrEnum):
    """What an account holds. ``owner`` of an account names its customer account (prepaid,
    debt) or its payment channel (clearing); the utility's own accounts have no owner."""

    PREPAID = "prepaid"  # money a customer paid for credit not yet delivered, and change
    CLEARING = "clearing"  # what a payment channel collected for the utility
    REVENUE = "revenue"  # energy sold and delivered
    FEES = "fees"  # transaction fees
    SERVICE = "service"  # fixed monthly service charges
    TAX = "tax"  # VAT collected, owed to the tax authority
    DEBT = "debt"  # what a customer owes: emergency credit used, arrears, reversed deliveries
    SUSPENSE = "suspense"  # money that cannot be placed yet


#: the kinds of payment channel, each with a clearing account per currency
CHANNEL_KINDS: Final = ("mobile", "bank", "app", "kiosk", "counter", "agent", "autodebit")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def channel_name(text: str) -> str:
    """A payment channel's name; ValidationError if it is not one."""
    if not _NAME.fullmatch(text):
        raise ValidationError(f"channel name {text!r}: letters, digits, _ . - (max 64)")
    return text


def channel_kind(text: str) -> str:
    if text not in CHANNEL_KINDS:
        raise ValidationError(f"--kind is one of {', '.join(CHANNEL_KINDS)}, got {text!r}")
    return text


OWNED: Final = frozenset({AccountKind.PREPAID, AccountKind.CLEARING, AccountKind.DEBT})
#: accounts whose balance reads naturally as a debit (positive: owed to the utility)
DEBIT_NORMAL: Final = frozenset({AccountKind.CLEARING, AccountKind.DEBT})


@dataclass(frozen=True, slots=True, order=True)
class AccountRef:
    kind: AccountKind
    owner: str
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, AccountKind):
            raise BadPosting(f"not an account kind: {self.kind!r}")
        if (self.kind in OWNED) != bool(self.owner):
            raise BadPosting(
                f"a {self.kind} account "
                + ("names its owner" if self.kind in OWNED else "has no owner")
            )
        Money(0, self.currency)  # refuses a bad currency code

    @property
    def code(self) -> str:
        """``prepaid:ACC-1:KES``, ``tax:KES``: unique, stable, what the audit trail records."""
        owner = [self.owner] if self.owner else []
        return ":".join([str(self.kind), *owner, self.currency])

    def shown(self, balance: int) -> int:
        """A balance (sum of debits minus credits) the way this account reads: positive is
        what it holds (a customer's prepaid balance, a customer's debt, tax owed)."""
        return balance if self.kind in DEBIT_NORMAL else -balance


def prepaid(account: str, currency: str) -> AccountRef:
    return AccountRef(AccountKind.PREPAID, account, currency)


def debt(account: str, currency: str) -> AccountRef:
    return AccountRef(AccountKind.DEBT, account, currency)


def clearing(channel: str, currency: str) -> AccountRef:
    return AccountRef(AccountKind.CLEARING, channel, currency)


def utility(kind: AccountKind, currency: str) -> AccountRef:
    return AccountRef(kind, "", currency)


@dataclass(frozen=True, slots=True)
class Posting:
    account: AccountRef
    amount: int  # minor units; debit positive, credit negative

    def __post_init__(self) -> None:
        if type(self.amount) is not int or self.amount == 0:
            raise BadPosting(f"a posting is a non-zero integer of minor units, got {self.amount!r}")


class TransactionKind(StrEnum):
    PAYMENT = "payment"  # a payment taken: the channel's money split over its destinations
    DELIVERY = "delivery"  # credit confirmed on the meter: prepaid balance to revenue
    REVERSAL = "reversal"  # a correction: undoes (part of) the transaction it names
    ADJUSTMENT = "adjustment"  # an operator's correction, naming what it corrects
    SETTLEMENT = "settlement"  # money a channel settled that no payment explains: to suspense


CORRECTIONS: Final = frozenset({TransactionKind.REVERSAL, TransactionKind.ADJUSTMENT})


@dataclass(frozen=True, slots=True)
class Transaction:
    kind: TransactionKind
    postings: tuple[Posting, ...]
    memo: str = ""
    corrects: int | None = None  # the id of the transaction this one corrects

    def __post_init__(self) -> None:
        if len(self.postings) < 2:
            raise Unbalanced("a transaction has at least two postings")
        sums: dict[str, int] = defaultdict(int)
        for posting in self.postings:
            if not isinstance(posting, Posting):
                raise BadPosting(f"not a posting: {posting!r}")
            sums[posting.account.currency] += posting.amount
        off = {currency: total for currency, total in sums.items() if total}
        if off:
            shown = ", ".join(f"{currency} {total:+d}" for currency, total in sorted(off.items()))
            raise Unbalanced(f"the postings do not sum to zero: {shown}")
        if self.kind in CORRECTIONS and self.corrects is None:
            raise BadCorrection(f"a {self.kind} names the transaction it corrects")
        if self.kind not in CORRECTIONS and self.corrects is not None:
            raise BadCorrection(f"a {self.kind} corrects nothing; a correction is a reversal")

    def document(self) -> dict[str, object]:
        """JSON-ready and canonical (postings in order): what the audit trail records."""
        return {
            "kind": str(self.kind),
            "memo": self.memo,
            "corrects": self.corrects,
            "postings": [[p.account.code, p.amount] for p in self.postings],
        }


def build(
    kind: TransactionKind,
    legs: Iterable[tuple[AccountRef, int]],
    memo: str = "",
    corrects: int | None = None,
) -> Transaction:
    """A transaction from (account, amount) legs: legs on one account are added together and
    zero legs are dropped; postings come out ordered by account, so equal inputs build equal
    transactions."""
    totals: dict[AccountRef, int] = defaultdict(int)
    for account, amount in legs:
        if type(amount) is not int:
            raise BadPosting(f"a posting is an integer of minor units, got {amount!r}")
        totals[account] += amount
    postings = tuple(Posting(a, n) for a, n in sorted(totals.items()) if n)
    return Transaction(kind, postings, memo, corrects)


def reversal(original: Transaction, original_id: int, memo: str = "") -> Transaction:
    """The exact opposite of ``original``, naming it."""
    return Transaction(
        TransactionKind.REVERSAL,
        tuple(Posting(p.account, -p.amount) for p in original.postings),
        memo,
        original_id,
    )


def balances(transactions: Iterable[Transaction]) -> dict[AccountRef, int]:
    """Every account's balance (debits minus credits) over ``transactions``."""
    out: dict[AccountRef, int] = defaultdict(int)
    for transaction in transactions:
        for posting in transaction.postings:
            out[posting.account] += posting.amount
    return dict(out)


def totals_by_currency(balances: Mapping[AccountRef, int]) -> dict[str, int]:
    """The sum of all balances per currency: zero for a ledger that balances."""
    out: dict[str, int] = defaultdict(int)
    for account, balance in balances.items():
        out[account.currency] += balance
    return dict(out)


__all__ = [
    "CHANNEL_KINDS",
    "DEBIT_NORMAL",
    "AccountKind",
    "AccountRef",
    "BadCorrection",
    "BadPosting",
    "LedgerError",
    "Posting",
    "Transaction",
    "TransactionKind",
    "Unbalanced",
    "balances",
    "build",
    "channel_kind",
    "channel_name",
    "clearing",
    "debt",
    "prepaid",
    "reversal",
    "totals_by_currency",
    "utility",
]
