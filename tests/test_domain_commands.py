"""The command lifecycle table (driven by a hypothesis state machine written from the rules in
words, not from the table) and the audit hash chain."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from headend.domain.audit import GENESIS, Entry, chain_hash, verify
from headend.domain.commands import (
    IN_FLIGHT,
    TERMINAL,
    TRANSITIONS,
    CommandState,
    IllegalTransition,
    Trigger,
    advance,
)
from protocols.errors import ValidationError

S = CommandState


@pytest.mark.parametrize(
    ("path", "end"),
    [
        ([Trigger.SEND, Trigger.ACK, Trigger.VERIFY], S.VERIFIED),
        ([Trigger.SEND, Trigger.TIMEOUT, Trigger.ACK, Trigger.VERIFY], S.VERIFIED),
        ([Trigger.SEND, Trigger.TIMEOUT, Trigger.SEND, Trigger.REFUSE], S.FAILED),
        ([Trigger.SEND, Trigger.ACK, Trigger.MISMATCH], S.FAILED),
        ([Trigger.SEND, Trigger.TIMEOUT, Trigger.RETRY, Trigger.EXPIRE], S.EXPIRED),
        ([Trigger.CANCEL], S.CANCELLED),
        ([Trigger.SEND, Trigger.TIMEOUT, Trigger.SUPERSEDE], S.SUPERSEDED),
    ],
)
def test_lives(path: list[Trigger], end: CommandState) -> None:
    state = S.QUEUED
    for trigger in path:
        state = advance(state, trigger, "test").new
    assert state is end


@pytest.mark.parametrize(
    ("state", "trigger", "message"),
    [
        (S.SENT, Trigger.CANCEL, "a sent command cannot cancel"),
        (S.VERIFIED, Trigger.SEND, "verified already"),
        (S.QUEUED, Trigger.ACK, "a queued command cannot ack"),
    ],
)
def test_illegal(state: CommandState, trigger: Trigger, message: str) -> None:
    with pytest.raises(IllegalTransition, match=message):
        advance(state, trigger, "test")


def test_terminal_states_have_no_way_out() -> None:
    assert not [key for key in TRANSITIONS if key[0] in TERMINAL]
    assert set(CommandState) == TERMINAL | IN_FLIGHT


class Lifecycle(RuleBasedStateMachine):
    """The rules in words: a command that may have run on the meter (sent, or asked about) can
    no longer be cancelled or superseded; only an acknowledged one is verified; once it ends, it
    stays ended; it is sent again only after a time-out."""

    def __init__(self) -> None:
        super().__init__()
        self.state = S.QUEUED
        self.maybe_ran = False
        self.ended = False

    @rule(trigger=st.sampled_from(list(Trigger)))
    def apply(self, trigger: Trigger) -> None:
        before = self.state
        try:
            self.state = advance(before, trigger, "rule").new
        except IllegalTransition:
            assert self.ended or (trigger, before) not in {
                (Trigger.SEND, S.QUEUED),
                (Trigger.CANCEL, S.QUEUED),
                (Trigger.EXPIRE, S.QUEUED),
            }
            return
        assert not self.ended, f"{trigger} moved an ended command"
        if trigger in (Trigger.CANCEL, Trigger.SUPERSEDE):
            assert before in (S.QUEUED, S.RETRYING)
        if trigger is Trigger.VERIFY:
            assert before is S.ACKNOWLEDGED
        if trigger is Trigger.SEND:
            assert before is S.QUEUED or before is S.RETRYING
            self.maybe_ran = True
        self.ended = self.state in TERMINAL

    @invariant()
    def verified_only_after_it_may_have_run(self) -> None:
        if self.state is S.VERIFIED:
            assert self.maybe_ran


TestLifecycle = Lifecycle.TestCase

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def _chain(n: int) -> list[tuple[Entry, str, str]]:
    rows: list[tuple[Entry, str, str]] = []
    previous = GENESIS
    for position in range(1, n + 1):
        entry = Entry(position, T0 + timedelta(minutes=position), "op", "disconnect",
                      f"M-{position}", "no credit", "sent", {"seq": position})  # fmt: skip
        digest = chain_hash(entry, previous)
        rows.append((entry, previous, digest))
        previous = digest
    return rows


def test_an_intact_chain_verifies() -> None:
    assert verify(_chain(5)) is None
    assert verify([]) is None


def test_an_edited_deleted_or_reordered_entry_is_named() -> None:
    rows = _chain(5)
    edited = list(rows)
    entry, previous, digest = edited[2]
    edited[2] = (replace(entry, outcome="verified"), previous, digest)
    broken = verify(edited)
    assert broken is not None
    assert (broken.position, "edited" in broken.why) == (3, True)
    deleted = rows[:2] + rows[3:]
    broken = verify(deleted)
    assert broken is not None
    assert broken.position == 4
    swapped = [rows[0], rows[2], rows[1], *rows[3:]]
    broken = verify(swapped)
    assert broken is not None
    assert broken.position == 3
    # re-hashing an edited entry is caught at the next one
    entry, previous, _ = rows[1]
    forged = replace(entry, reason="forged")
    rehashed = [rows[0], (forged, previous, chain_hash(forged, previous)), *rows[2:]]
    broken = verify(rehashed)
    assert broken is not None
    assert broken.position == 3


def test_entries_refuse_what_cannot_be_hashed_or_has_no_time_zone() -> None:
    with pytest.raises(ValidationError):
        Entry(1, datetime(2026, 3, 1), "op", "x", "s", "r", "o", {})
    with pytest.raises(ValidationError, match="plain JSON"):
        chain_hash(Entry(1, T0, "op", "x", "s", "r", "o", {"v": float("nan")}), GENESIS)
