"""The audit trail's hash chain: each entry carries the SHA-256 of the entry before it.

An entry's hash covers its position, time, actor, action, subject, reason, outcome, detail and
the previous hash, in a fixed canonical encoding, so editing, deleting, inserting or reordering
any entry breaks the chain at the first changed entry, which :func:`verify` names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from protocols.errors import ValidationError

GENESIS = "0" * 64  # the "previous hash" of the first entry


@dataclass(frozen=True, slots=True)
class Entry:
    position: int  # 1, 2, 3 ... in the order written
    at: datetime
    actor: str  # an operator's name, or the service that acted ("dispatcher", "monitor")
    action: str
    subject: str  # what it is about: a meter id, an account, a command
    reason: str
    outcome: str
    detail: dict[str, Any]

    def __post_init__(self) -> None:
        if self.position < 1:
            raise ValidationError("audit positions start at 1")
        if self.at.tzinfo is None:
            raise ValidationError("an audit entry's time has a time zone")
        if not self.actor or not self.action:
            raise ValidationError("an audit entry names its actor and its action")


def canonical(entry: Entry, previous: str) -> bytes:
    """The bytes an entry's hash is taken over (UTF-8 JSON, sorted keys, no spaces)."""
    document = {
        "position": entry.position,
        "at": entry.at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "reason": entry.reason,
        "outcome": entry.outcome,
        "detail": entry.detail,
        "previous": previous,
    }
    try:
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"an audit detail must be plain JSON: {exc}") from exc


def chain_hash(entry: Entry, previous: str) -> str:
    return hashlib.sha256(canonical(entry, previous)).hexdigest()


@dataclass(frozen=True, slots=True)
class Broken:
    position: int
    why: str


def check_link(
    entry: Entry, previous: str, stored: str, expected_position: int, expected_previous: str
) -> Broken | None:
    """One link of the chain: the entry at ``expected_position`` after the one whose hash is
    ``expected_previous``, with its stored previous hash and hash."""
    if entry.position != expected_position:
        return Broken(
            entry.position,
            f"entry {expected_position} is missing or out of order (found {entry.position})",
        )
    if previous != expected_previous:
        return Broken(entry.position, "its previous hash is not the hash of the entry before")
    if chain_hash(entry, previous) != stored:
        return Broken(entry.position, "its contents do not match its hash (edited)")
    return None


def verify(entries: Iterable[tuple[Entry, str, str]]) -> Broken | None:
    """Check ``(entry, stored previous hash, stored hash)`` in position order; the first
    entry that breaks the chain, or None when the whole chain holds."""
    expected_previous = GENESIS
    for position, (entry, previous, stored) in enumerate(entries, start=1):
        broken = check_link(entry, previous, stored, position, expected_previous)
        if broken is not None:
            return broken
        expected_previous = stored
    return None
