"""The ledger's pure rules: balanced transactions, immutable postings, corrections that name
what they correct; and, for any sequence of transactions, every currency sums to zero."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from headend.domain.ledger import (
    AccountKind,
    AccountRef,
    BadCorrection,
    BadPosting,
    Posting,
    Transaction,
    TransactionKind,
    Unbalanced,
    balances,
    build,
    channel_kind,
    channel_name,
    clearing,
    debt,
    prepaid,
    reversal,
    totals_by_currency,
    utility,
)
from protocols.errors import ValidationError

KES_TAX = utility(AccountKind.TAX, "KES")


def test_account_codes_are_stable_and_name_their_owner() -> None:
    assert prepaid("ACC-1", "KES").code == "prepaid:ACC-1:KES"
    assert clearing("MPESA", "KES").code == "clearing:MPESA:KES"
    assert debt("ACC-1", "TZS").code == "debt:ACC-1:TZS"
    assert KES_TAX.code == "tax:KES"


@pytest.mark.parametrize(
    ("kind", "owner", "currency", "why"),
    [
        (AccountKind.PREPAID, "", "KES", "names its owner"),
        (AccountKind.CLEARING, "", "KES", "names its owner"),
        (AccountKind.TAX, "ACC-1", "KES", "has no owner"),
        (AccountKind.REVENUE, "", "kes", "3-letter"),
    ],
)
def test_accounts_refuse_a_wrong_owner_or_currency(
    kind: AccountKind, owner: str, currency: str, why: str
) -> None:
    with pytest.raises(ValidationError, match=why):
        AccountRef(kind, owner, currency)


@pytest.mark.parametrize(
    ("account", "debit", "shown"),
    [
        (prepaid("A", "KES"), -500, 500),  # the customer holds 5.00
        (debt("A", "KES"), 300, 300),  # the customer owes 3.00
        (clearing("C", "KES"), 1000, 1000),  # the channel owes us 10.00
        (KES_TAX, -160, 160),  # tax owed to the authority
    ],
)
def test_balances_read_the_way_the_account_does(
    account: AccountRef, debit: int, shown: int
) -> None:
    assert account.shown(debit) == shown


def test_a_payment_balances_and_is_canonical() -> None:
    legs = [
        (clearing("C", "KES"), 10000),
        (KES_TAX, -1380),
        (prepaid("A", "KES"), -8620),
        (prepaid("A", "KES"), 0),  # dropped
    ]
    one = build(TransactionKind.PAYMENT, legs, "payment C/R1")
    two = build(TransactionKind.PAYMENT, list(reversed(legs)), "payment C/R1")
    assert one == two
    assert [(p.account.code, p.amount) for p in one.postings] == [
        ("clearing:C:KES", 10000),
        ("prepaid:A:KES", -8620),
        ("tax:KES", -1380),
    ]
    assert one.document() == {
        "kind": "payment",
        "memo": "payment C/R1",
        "corrects": None,
        "postings": [["clearing:C:KES", 10000], ["prepaid:A:KES", -8620], ["tax:KES", -1380]],
    }


@pytest.mark.parametrize(
    ("legs", "error", "why"),
    [
        ([(clearing("C", "KES"), 100), (KES_TAX, -99)], Unbalanced, "KES \\+1"),
        ([(clearing("C", "KES"), 100)], Unbalanced, "at least two"),
        ([(clearing("C", "KES"), 100), (prepaid("A", "KES"), -100.0)], BadPosting, "integer"),
        (
            [(clearing("C", "KES"), 100), (prepaid("A", "TZS"), -100)],
            Unbalanced,
            "KES \\+100, TZS -100",
        ),
    ],
)
def test_unbalanced_or_bad_postings_are_refused(legs: list, error: type, why: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=why):
        build(TransactionKind.PAYMENT, legs)


def test_zero_postings_and_corrections_without_a_target_are_refused() -> None:
    with pytest.raises(BadPosting):
        Posting(KES_TAX, 0)
    postings = (Posting(KES_TAX, -5), Posting(clearing("C", "KES"), 5))
    with pytest.raises(BadCorrection, match="names the transaction"):
        Transaction(TransactionKind.REVERSAL, postings)
    with pytest.raises(BadCorrection, match="corrects nothing"):
        Transaction(TransactionKind.PAYMENT, postings, corrects=3)


def test_transactions_are_immutable_and_a_reversal_names_its_original() -> None:
    original = build(TransactionKind.PAYMENT, [(clearing("C", "KES"), 700), (KES_TAX, -700)])
    with pytest.raises(dataclasses.FrozenInstanceError):
        original.memo = "changed"  # type: ignore[misc]
    undo = reversal(original, 41, "reversal")
    assert undo.corrects == 41
    assert undo.kind is TransactionKind.REVERSAL
    assert balances([original, undo]) == {clearing("C", "KES"): 0, KES_TAX: 0}


def test_channel_names_and_kinds() -> None:
    assert channel_name("MPESA-1") == "MPESA-1"
    assert channel_kind("agent") == "agent"
    with pytest.raises(ValidationError, match="channel name"):
        channel_name("bad name!")
    with pytest.raises(ValidationError, match="--kind is one of"):
        channel_kind("fax")


ACCOUNTS = [
    prepaid("A", "KES"),
    prepaid("B", "KES"),
    debt("A", "KES"),
    clearing("C", "KES"),
    clearing("C", "UGX"),
    prepaid("A", "UGX"),
    KES_TAX,
    utility(AccountKind.REVENUE, "UGX"),
    utility(AccountKind.SUSPENSE, "KES"),
]


@st.composite
def transactions(draw: st.DrawFn) -> Transaction:
    """A balanced transaction: random legs, each currency closed by one more leg."""
    legs = draw(
        st.lists(
            st.tuples(st.sampled_from(ACCOUNTS), st.integers(-(10**12), 10**12)),
            min_size=1,
            max_size=6,
        )
    )
    by_currency: dict[str, int] = {}
    for account, amount in legs:
        by_currency[account.currency] = by_currency.get(account.currency, 0) + amount
    closers = {"KES": utility(AccountKind.SUSPENSE, "KES"), "UGX": clearing("C", "UGX")}
    legs += [(closers[currency], -total) for currency, total in by_currency.items()]
    legs += [(prepaid("A", "KES"), 1), (utility(AccountKind.SUSPENSE, "KES"), -1)]
    return build(TransactionKind.PAYMENT, legs)


@given(st.lists(transactions(), max_size=20), st.data())
def test_any_sequence_with_any_reversals_sums_to_zero(
    sequence: list[Transaction], data: st.DataObject
) -> None:
    ledger = list(sequence)
    for index in data.draw(st.lists(st.integers(0, max(len(sequence) - 1, 0)), max_size=5)):
        if sequence:
            ledger.append(reversal(sequence[index], index + 1))
    assert set(totals_by_currency(balances(ledger)).values()) <= {0}
    for transaction in ledger:
        assert all(p.amount != 0 and type(p.amount) is int for p in transaction.postings)


@given(transactions())
def test_a_reversal_undoes_exactly(transaction: Transaction) -> None:
    assert set(balances([transaction, reversal(transaction, 1)]).values()) == {0}
