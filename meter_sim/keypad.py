"""The meter side of STS (IEC 62055-41): decode a typed token, check it, say what to do. Sans-IO.

The firmware calls :meth:`StsKeypad.evaluate` with the digits and its clock; the decision names
the DLMS token-gateway status, the refusal a keypad meter shows, the decoded token and the action
to apply. Evaluating changes nothing. When the firmware has applied the action (or decided not to,
e.g. credit over its maximum, which it refuses as ``OVER_LIMIT``), it calls
:meth:`StsKeypad.commit` with an accepted decision: the keypad remembers the TID and stores or
applies the key change. :meth:`StsKeypad.to_state` is the keypad's non-volatile memory.

Rules:

* Tokens are decoded with the current decoder key only: the key derived from :class:`StsConfig`,
  or the one installed by the last key change. A token made for another meter (another key)
  fails its CRC and is refused as ``FORMAT``, like a mistyped one.
* TID memory: the TIDs of the last :attr:`StsKeypad.tid_memory_size` accepted tokens that carry
  one. A token whose TID is remembered is ``USED``. When the memory is full, a token older than
  the oldest TID remembered is ``OLD`` (the meter can no longer tell whether it was used); while
  it is not full, every accepted TID is in it and older unused tokens are accepted.
* Key expiry: a token with ``TID >> 16 > KEN`` is ``KEY_EXPIRED`` (KEN 255 never expires).
* Credit tokens add credit only on this electricity meter: water, gas and time credit tokens are
  refused as ``FORMAT`` (the token is not for this kind of meter).
* A key change is two tokens, both encrypted under the current key, entered in order: the first
  (subclass 3) is stored as pending; the second (subclass 4) completes the change if a first half
  was stored less than :attr:`StsKeypad.key_change_window` seconds before, otherwise it is refused
  as ``KEY_CHANGE_INCOMPLETE``. The completed change installs the new key, KRN, KT, TI and KEN;
  with the rollover bit set it also clears the TID memory and moves to the next base date.
* Key change and test tokens carry no TID; they are not remembered.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar

from meter_sim.config import StsConfig
from protocols.cosem import TokenStatus
from protocols.errors import ConfigError, StateFileError, ValidationError
from protocols.sts import (
    BASE_DATES,
    TID_TOKEN_TYPES,
    ClearCreditToken,
    ClearTamperToken,
    CreditSubclass,
    CreditToken,
    KeyChangeToken1,
    KeyChangeToken2,
    KeyData,
    MeterTestToken,
    NewKey,
    Pan,
    SetPhaseUnbalanceLimitToken,
    SetPowerLimitToken,
    Token,
    TokenDecodeError,
    TokenFault,
    decode_token,
    next_base_date,
    normalize_token,
    parse_vending_key,
)

STATE_VERSION = 1


class KeypadRefusal(IntEnum):
    """Why a token is refused, as a keypad meter shows it."""

    FORMAT = 1  # not 20 digits / bad class / CRC (also: a token made for another meter)
    USED = 2  # TID in memory
    OLD = 3  # TID older than the oldest remembered
    KEY_EXPIRED = 4  # TID >> 16 > KEN
    OVER_LIMIT = 5  # decided by the firmware (credit over its maximum); the keypad never sets it
    KEY_CHANGE_INCOMPLETE = 6  # second half of a key change without a recent first half


# -- actions --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddCredit:
    wh: int
    subclass: int = int(CreditSubclass.ELECTRICITY)


@dataclass(frozen=True, slots=True)
class SetPowerLimit:
    watts: int


@dataclass(frozen=True, slots=True)
class ClearCredit:
    mask: int  # 0xFFFF: every register


@dataclass(frozen=True, slots=True)
class ClearTamper:
    pass


@dataclass(frozen=True, slots=True)
class SetPhaseUnbalanceLimit:
    watts: int


@dataclass(frozen=True, slots=True)
class KeyChange:
    """The completed key change (its second token has arrived); ``base_date`` is the one in force
    after it (the next one when ``rollover`` is set)."""

    key_revision: int
    key_type: int
    tariff_index: int
    key_expiry: int
    rollover: bool
    base_date: int


@dataclass(frozen=True, slots=True)
class KeyChangePending:
    """The first half of a key change, stored until the second arrives; ``entered_at`` is the
    meter time it was entered."""

    entered_at: float = 0.0


@dataclass(frozen=True, slots=True)
class TestToken:
    """A class 1 test/display token: ``control`` holds the tests or displays asked for."""

    __test__: ClassVar[bool] = False  # not a pytest test class
    control: int
    manufacturer: int = 0


KeypadAction = (
    AddCredit
    | SetPowerLimit
    | ClearCredit
    | ClearTamper
    | SetPhaseUnbalanceLimit
    | KeyChange
    | KeyChangePending
    | TestToken
)


@dataclass(frozen=True, slots=True)
class KeypadDecision:
    """What the keypad makes of one token. ``action`` is None exactly when ``refusal`` is set."""

    status: TokenStatus
    refusal: KeypadRefusal | None
    token: Token | None
    action: KeypadAction | None

    @property
    def accepted(self) -> bool:
        return self.refusal is None


# -- the keypad -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Installed:
    """The key data a key change installed (it replaces what StsConfig says)."""

    key: int
    krn: int
    kt: int
    ti: int
    ken: int
    base_date: int


@dataclass(frozen=True, slots=True)
class _Pending:
    first: KeyChangeToken1
    entered_at: float


def key_data_from_config(config: StsConfig) -> KeyData:
    """The key data a vending system needs for this meter (what its registry keeps)."""
    return KeyData(
        parse_vending_key(config.vending_key),
        Pan.parse(config.drn),
        sgc=config.sgc,
        ti=config.ti,
        krn=config.krn,
        kt=config.kt,
        base_date=config.base_date,
        ken=config.ken,
    )


class StsKeypad:
    """One meter's STS token decoder: key, TID memory, pending key change."""

    tid_memory_size: ClassVar[int] = 50
    key_change_window: ClassVar[float] = 86_400.0  # s between the two halves of a key change

    def __init__(self, config: StsConfig, state: dict[str, Any] | None = None) -> None:
        self.config = config
        try:
            key_data = key_data_from_config(config)
            derived = key_data.decoder_key()
        except ValidationError as exc:
            raise ConfigError(f"sts configuration: {exc}") from exc
        self._configured = _Installed(
            derived, config.krn, config.kt, config.ti, config.ken, config.base_date
        )
        self._installed: _Installed | None = None
        self._tids: list[int] = []  # ascending
        self._pending: _Pending | None = None
        if state is not None:
            self._restore(state)

    # -- what the firmware shows ------------------------------------------------------------------

    @property
    def _current(self) -> _Installed:
        return self._installed or self._configured

    @property
    def key_revision(self) -> int:
        return self._current.krn

    @property
    def key_type(self) -> int:
        return self._current.kt

    @property
    def tariff_index(self) -> int:
        return self._current.ti

    @property
    def key_expiry(self) -> int:
        return self._current.ken

    @property
    def base_date(self) -> int:
        return self._current.base_date

    @property
    def tid_memory(self) -> tuple[int, ...]:
        """The remembered TIDs, oldest first."""
        return tuple(self._tids)

    @property
    def key_change_pending(self) -> bool:
        return self._pending is not None

    # -- decide -----------------------------------------------------------------------------------

    def evaluate(self, digits: str, now: float) -> KeypadDecision:
        """Decode and check a token; changes nothing."""
        try:
            token = decode_token(normalize_token(digits), self._current.key)
        except TokenDecodeError as exc:
            status = (
                TokenStatus.AUTHENTICATION_FAILED
                if exc.reason is TokenFault.CRC
                else TokenStatus.FORMAT_FAILURE
            )
            return KeypadDecision(status, KeypadRefusal.FORMAT, None, None)
        if isinstance(token, TID_TOKEN_TYPES):
            refusal = self._check_tid(token.tid)
            if refusal is not None:
                return _refused(refusal, token)
        match token:
            case CreditToken():
                if token.subclass is not CreditSubclass.ELECTRICITY:
                    return _refused(KeypadRefusal.FORMAT, token)
                return _accepted(token, AddCredit(token.wh, int(token.subclass)))
            case SetPowerLimitToken():
                return _accepted(token, SetPowerLimit(token.watts))
            case ClearCreditToken():
                return _accepted(token, ClearCredit(token.register))
            case ClearTamperToken():
                return _accepted(token, ClearTamper())
            case SetPhaseUnbalanceLimitToken():
                return _accepted(token, SetPhaseUnbalanceLimit(token.watts))
            case KeyChangeToken1():
                if token.rollover and self._next_base_date() is None:
                    return _refused(KeypadRefusal.FORMAT, token)
                return _accepted(token, KeyChangePending(now))
            case KeyChangeToken2():
                pending = self._pending
                if pending is None or not 0 <= now - pending.entered_at <= self.key_change_window:
                    return _refused(KeypadRefusal.KEY_CHANGE_INCOMPLETE, token)
                change = NewKey.from_tokens(pending.first, token)
                base_date = self._next_base_date() if change.rollover else self.base_date
                if base_date is None:  # pragma: no cover - refused with the first half
                    return _refused(KeypadRefusal.FORMAT, token)
                action = KeyChange(
                    change.krn, change.kt, change.ti, change.ken, change.rollover, base_date
                )
                return _accepted(token, action)
            case MeterTestToken():
                return _accepted(token, TestToken(token.control, token.manufacturer))
        raise AssertionError(f"unhandled token {token!r}")  # pragma: no cover

    def _check_tid(self, tid: int) -> KeypadRefusal | None:
        if tid >> 16 > self._current.ken:
            return KeypadRefusal.KEY_EXPIRED
        if tid in self._tids:
            return KeypadRefusal.USED
        if len(self._tids) >= self.tid_memory_size and tid < self._tids[0]:
            return KeypadRefusal.OLD
        return None

    def _next_base_date(self) -> int | None:
        try:
            return next_base_date(self.base_date)
        except ValidationError:
            return None

    # -- apply ------------------------------------------------------------------------------------

    def commit(self, decision: KeypadDecision) -> None:
        """Remember an accepted token: its TID, or the key change half it carries.

        A refused decision changes nothing. Commit a decision right after evaluating it: a
        second half evaluated before its first half was committed does not complete anything.
        """
        if decision.refusal is not None or decision.token is None:
            return
        token = decision.token
        if isinstance(token, TID_TOKEN_TYPES):
            self._remember(token.tid)
        elif isinstance(token, KeyChangeToken1) and isinstance(decision.action, KeyChangePending):
            self._pending = _Pending(token, decision.action.entered_at)
        elif isinstance(token, KeyChangeToken2) and isinstance(decision.action, KeyChange):
            if self._pending is None:
                raise ValidationError("a key change completes only after its first half")
            change = NewKey.from_tokens(self._pending.first, token)
            self._installed = _Installed(
                change.key,
                change.krn,
                change.kt,
                change.ti,
                change.ken,
                decision.action.base_date,
            )
            self._pending = None
            if change.rollover:
                self._tids.clear()

    def _remember(self, tid: int) -> None:
        if tid in self._tids:
            return
        self._tids.append(tid)
        self._tids.sort()
        del self._tids[: max(0, len(self._tids) - self.tid_memory_size)]

    # -- non-volatile memory ----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable; ``StsKeypad(config, state)`` restores it."""
        installed = self._installed
        pending = self._pending
        return {
            "version": STATE_VERSION,
            "tids": list(self._tids),
            "installed": None
            if installed is None
            else {
                "key": f"{installed.key:016x}",
                "krn": installed.krn,
                "kt": installed.kt,
                "ti": installed.ti,
                "ken": installed.ken,
                "base_date": installed.base_date,
            },
            "pending": None
            if pending is None
            else {
                "ken_high": pending.first.ken_high,
                "krn": pending.first.krn,
                "rollover": pending.first.rollover,
                "kt": pending.first.kt,
                "key_high": pending.first.key_high,
                "entered_at": pending.entered_at,
            },
        }

    def _restore(self, state: dict[str, Any]) -> None:
        try:
            if state.get("version") != STATE_VERSION:
                raise StateFileError(f"keypad state version {state.get('version')!r}")
            tids = [int(tid) for tid in state["tids"]]
            installed = state["installed"]
            if installed is not None:
                self._installed = _Installed(
                    int(installed["key"], 16),
                    int(installed["krn"]),
                    int(installed["kt"]),
                    int(installed["ti"]),
                    int(installed["ken"]),
                    int(installed["base_date"]),
                )
            pending = state["pending"]
            if pending is not None:
                first = KeyChangeToken1(
                    int(pending["ken_high"]),
                    int(pending["krn"]),
                    bool(pending["rollover"]),
                    int(pending["kt"]),
                    int(pending["key_high"]),
                )
                self._pending = _Pending(first, float(pending["entered_at"]))
        except StateFileError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StateFileError(f"keypad state is corrupt: {exc}") from exc
        if self._installed is not None and self._installed.base_date not in BASE_DATES:
            raise StateFileError("keypad state: unknown base date")
        if sorted(set(tids)) != tids or len(tids) > self.tid_memory_size:
            raise StateFileError("keypad state: the TID memory is not ascending or too long")
        self._tids = tids


def _refused(refusal: KeypadRefusal, token: Token) -> KeypadDecision:
    return KeypadDecision(TokenStatus.VALIDATION_FAILED, refusal, token, None)


def _accepted(token: Token, action: KeypadAction) -> KeypadDecision:
    return KeypadDecision(TokenStatus.VALIDATION_OK, None, token, action)
