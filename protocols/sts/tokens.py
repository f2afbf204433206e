"""Typed STS tokens and their 20-digit form.

A token is 66 bits: a 2-bit class and a 64-bit data block. The block starts with a 4-bit
subclass and ends with a 16-bit CRC over the class and the 48 bits between (see
:mod:`protocols.sts.crc`). Blocks of class 0 (credit) and class 2 (management) are encrypted with
the STA cipher under the meter's decoder key; class 1 (test/display) blocks are not. The class
bits are transposed into bits 28 and 27 of the block, whose own bits move to bits 65 and 64, and
the 66-bit number is written as 20 decimal digits.

Data blocks, most significant first (the CRC's 16 bits last in each):

* class 0 credit, class 2 subclasses 0, 1, 5, 6:
  ``SUBCLASS(4) | RND(4) | TID(24) | AMOUNT or VALUE(16)``
* class 2 subclass 3 (key change, first half):
  ``3 | KENHO(4) | KRN(4) | RO(1) | 0(1) | KT(2) | new key >> 32 (32)``
* class 2 subclass 4 (key change, second half): ``4 | KENLO(4) | TI(8) | new key & 0xFFFFFFFF``
* class 1 subclass 0: ``0 | CONTROL(36) | MANUFACTURER(8)``;
  subclass 1: ``1 | CONTROL(28) | MANUFACTURER(16)``

Key change tokens are encrypted under the OLD key. Class 0 currency subclasses (4..7), class 2
subclasses 2 and 7..15 and class 1 subclasses 2..15 are not carried: they decode as a
``subclass`` error.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from protocols.errors import ValidationError
from protocols.sts.amount import decode_amount, encode_amount, is_representable
from protocols.sts.crc import token_crc
from protocols.sts.errors import TokenDecodeError, TokenFault
from protocols.sts.sta import DEFAULT_TABLES, MASK64, StaTables, sta_decrypt, sta_encrypt
from protocols.sts.tid import TID_LIMIT

TOKEN_DIGITS = 20
TOKEN_MAX = (1 << 66) - 1


class TokenClass(IntEnum):
    CREDIT = 0
    TEST = 1
    MANAGEMENT = 2
    RESERVED = 3


class CreditSubclass(IntEnum):
    """Class 0 unit-based credit. The amount unit is 0.1 of the subclass's unit."""

    ELECTRICITY = 0  # 0.1 kWh
    WATER = 1  # 0.1 m3
    GAS = 2  # 0.1 m3
    TIME = 3  # 0.1 minute


CREDIT_UNITS: dict[CreditSubclass, str] = {
    CreditSubclass.ELECTRICITY: "0.1 kWh",
    CreditSubclass.WATER: "0.1 m3",
    CreditSubclass.GAS: "0.1 m3",
    CreditSubclass.TIME: "0.1 min",
}


class MeterTestSubclass(IntEnum):
    """Class 1: initiate a meter test or display (2- or 4-digit manufacturer codes)."""

    MANUFACTURER_2_DIGIT = 0  # 36 control bits, 8-bit manufacturer code
    MANUFACTURER_4_DIGIT = 1  # 28 control bits, 16-bit manufacturer code


class ManagementSubclass(IntEnum):
    SET_MAX_POWER_LIMIT = 0
    CLEAR_CREDIT = 1
    SET_TARIFF_RATE = 2  # not carried
    KEY_CHANGE_1 = 3
    KEY_CHANGE_2 = 4
    CLEAR_TAMPER = 5
    SET_MAX_PHASE_UNBALANCE_LIMIT = 6


CLEAR_ALL_REGISTERS = 0xFFFF
_TEST_WIDTHS = {  # control bits, manufacturer bits
    MeterTestSubclass.MANUFACTURER_2_DIGIT: (36, 8),
    MeterTestSubclass.MANUFACTURER_4_DIGIT: (28, 16),
}


def _check_int(name: str, value: object, top: int) -> None:
    if type(value) is not int or not 0 <= value <= top:
        raise ValidationError(f"{name} is an integer 0..{top}, got {value!r}")


def _check_tid_rnd(tid: int, rnd: int) -> None:
    _check_int("tid", tid, TID_LIMIT - 1)
    _check_int("rnd", rnd, 15)


def _check_amount(name: str, value: int) -> None:
    if not is_representable(value):
        raise ValidationError(
            f"{name} {value!r} is not an amount a token carries (see round_amount_up)"
        )


@dataclass(frozen=True, slots=True)
class CreditToken:
    """Class 0: credit. ``amount`` is in 0.1 of the subclass's unit (0.1 kWh for electricity)
    and must be exactly representable (:func:`protocols.sts.amount.round_amount_up`)."""

    token_class: ClassVar[TokenClass] = TokenClass.CREDIT
    subclass: CreditSubclass
    amount: int
    tid: int
    rnd: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "subclass", CreditSubclass(self.subclass))
        _check_tid_rnd(self.tid, self.rnd)
        _check_amount("amount", self.amount)

    @property
    def wh(self) -> int:
        """The energy of an electricity credit token in Wh."""
        if self.subclass is not CreditSubclass.ELECTRICITY:
            raise ValidationError(f"a {self.subclass.name.lower()} token carries no energy")
        return self.amount * 100


@dataclass(frozen=True, slots=True)
class SetPowerLimitToken:
    """Class 2 subclass 0: set the maximum power limit (W, amount-encoded)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.SET_MAX_POWER_LIMIT
    watts: int
    tid: int
    rnd: int = 0

    def __post_init__(self) -> None:
        _check_tid_rnd(self.tid, self.rnd)
        _check_amount("watts", self.watts)


@dataclass(frozen=True, slots=True)
class ClearCreditToken:
    """Class 2 subclass 1: clear the credit registers in ``register`` (0xFFFF: all)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.CLEAR_CREDIT
    register: int
    tid: int
    rnd: int = 0

    def __post_init__(self) -> None:
        _check_tid_rnd(self.tid, self.rnd)
        _check_int("register", self.register, 0xFFFF)


@dataclass(frozen=True, slots=True)
class ClearTamperToken:
    """Class 2 subclass 5: clear the tamper condition (``pad`` is 0 in tokens we issue)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.CLEAR_TAMPER
    tid: int
    rnd: int = 0
    pad: int = 0

    def __post_init__(self) -> None:
        _check_tid_rnd(self.tid, self.rnd)
        _check_int("pad", self.pad, 0xFFFF)


@dataclass(frozen=True, slots=True)
class SetPhaseUnbalanceLimitToken:
    """Class 2 subclass 6: set the maximum phase power unbalance limit (W, amount-encoded)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.SET_MAX_PHASE_UNBALANCE_LIMIT
    watts: int
    tid: int
    rnd: int = 0

    def __post_init__(self) -> None:
        _check_tid_rnd(self.tid, self.rnd)
        _check_amount("watts", self.watts)


@dataclass(frozen=True, slots=True)
class KeyChangeToken1:
    """Class 2 subclass 3: first half of a key change (high half of the new key and its KRN/KT;
    ``rollover`` set: the meter clears its TID memory and moves to the next base date)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.KEY_CHANGE_1
    ken_high: int
    krn: int
    rollover: bool
    kt: int
    key_high: int

    def __post_init__(self) -> None:
        _check_int("ken_high", self.ken_high, 15)
        _check_int("krn", self.krn, 15)
        _check_int("kt", self.kt, 3)
        _check_int("key_high", self.key_high, 0xFFFFFFFF)
        if not isinstance(self.rollover, bool):
            raise ValidationError(f"rollover is a bool, got {self.rollover!r}")


@dataclass(frozen=True, slots=True)
class KeyChangeToken2:
    """Class 2 subclass 4: second half of a key change (low half of the new key and its TI)."""

    token_class: ClassVar[TokenClass] = TokenClass.MANAGEMENT
    subclass: ClassVar[ManagementSubclass] = ManagementSubclass.KEY_CHANGE_2
    ken_low: int
    ti: int
    key_low: int

    def __post_init__(self) -> None:
        _check_int("ken_low", self.ken_low, 15)
        _check_int("ti", self.ti, 255)
        _check_int("key_low", self.key_low, 0xFFFFFFFF)


@dataclass(frozen=True, slots=True)
class MeterTestToken:
    """Class 1: initiate a meter test or display. Not encrypted, not meter specific."""

    token_class: ClassVar[TokenClass] = TokenClass.TEST
    subclass: MeterTestSubclass
    control: int
    manufacturer: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "subclass", MeterTestSubclass(self.subclass))
        control_bits, manufacturer_bits = _TEST_WIDTHS[self.subclass]
        _check_int("control", self.control, (1 << control_bits) - 1)
        _check_int("manufacturer", self.manufacturer, (1 << manufacturer_bits) - 1)


Token = (
    CreditToken
    | SetPowerLimitToken
    | ClearCreditToken
    | ClearTamperToken
    | SetPhaseUnbalanceLimitToken
    | KeyChangeToken1
    | KeyChangeToken2
    | MeterTestToken
)
TidToken = (
    CreditToken
    | SetPowerLimitToken
    | ClearCreditToken
    | ClearTamperToken
    | SetPhaseUnbalanceLimitToken
)
TID_TOKEN_TYPES = (
    CreditToken,
    SetPowerLimitToken,
    ClearCreditToken,
    ClearTamperToken,
    SetPhaseUnbalanceLimitToken,
)


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key change: the new decoder key and what comes with it, as the two tokens carry it."""

    key: int
    krn: int
    kt: int
    ti: int
    ken: int = 255
    rollover: bool = False

    def __post_init__(self) -> None:
        _check_int("key", self.key, MASK64)
        _check_int("ken", self.ken, 255)

    def tokens(self) -> tuple[KeyChangeToken1, KeyChangeToken2]:
        first = KeyChangeToken1(self.ken >> 4, self.krn, self.rollover, self.kt, self.key >> 32)
        second = KeyChangeToken2(self.ken & 15, self.ti, self.key & 0xFFFFFFFF)
        return first, second

    @classmethod
    def from_tokens(cls, first: KeyChangeToken1, second: KeyChangeToken2) -> NewKey:
        return cls(
            key=first.key_high << 32 | second.key_low,
            krn=first.krn,
            kt=first.kt,
            ti=second.ti,
            ken=first.ken_high << 4 | second.ken_low,
            rollover=first.rollover,
        )


# -- the data block -------------------------------------------------------------------------------


def _tid_block(subclass: int, rnd: int, tid: int, value: int) -> int:
    return subclass << 44 | rnd << 40 | tid << 16 | value


def _data_bits(token: Token) -> int:
    """The 48 bits between the class and the CRC."""
    match token:
        case CreditToken():
            return _tid_block(token.subclass, token.rnd, token.tid, encode_amount(token.amount))
        case SetPowerLimitToken() | SetPhaseUnbalanceLimitToken():
            return _tid_block(token.subclass, token.rnd, token.tid, encode_amount(token.watts))
        case ClearCreditToken():
            return _tid_block(token.subclass, token.rnd, token.tid, token.register)
        case ClearTamperToken():
            return _tid_block(token.subclass, token.rnd, token.tid, token.pad)
        case KeyChangeToken1():
            flags = int(token.rollover) << 3 | token.kt
            return (
                token.subclass << 44
                | token.ken_high << 40
                | token.krn << 36
                | flags << 32
                | token.key_high
            )
        case KeyChangeToken2():
            return token.subclass << 44 | token.ken_low << 40 | token.ti << 32 | token.key_low
        case MeterTestToken():
            _, manufacturer_bits = _TEST_WIDTHS[token.subclass]
            return token.subclass << 44 | token.control << manufacturer_bits | token.manufacturer
    raise ValidationError(f"not a token: {token!r}")


def token_block(token: Token) -> tuple[TokenClass, int]:
    """The class and the plain 64-bit data block (with its CRC) of a token."""
    data = _data_bits(token)
    return token.token_class, data << 16 | token_crc(token.token_class << 48 | data)


def to_digits(token_class: TokenClass, block: int) -> str:
    """The 20-digit form of a class and an (encrypted) 64-bit block: the class transposition."""
    _check_int("block", block, MASK64)
    high, low = block >> 28 & 1, block >> 27 & 1
    block = block & ~(3 << 27) | (token_class >> 1) << 28 | (token_class & 1) << 27
    return f"{high << 65 | low << 64 | block:020d}"


def normalize_token(text: str) -> str:
    """Token text as typed or printed ("2371 6100 5011 8319 4197", "2371-...") -> its digits."""
    return "".join(text.split()).replace("-", "")


def format_token(digits: str) -> str:
    """Digits in groups of four, as printed on a receipt."""
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def from_digits(digits: str) -> tuple[TokenClass, int]:
    """The class and the (still encrypted) 64-bit block of a 20-digit token."""
    if len(digits) != TOKEN_DIGITS or not digits.isascii() or not digits.isdigit():
        raise TokenDecodeError(TokenFault.FORMAT, f"a token is 20 decimal digits, got {digits!r}")
    number = int(digits)
    if number > TOKEN_MAX:
        raise TokenDecodeError(TokenFault.FORMAT, f"{digits} is more than 66 bits")
    token_class = TokenClass(number >> 27 & 3)
    block = number & MASK64 & ~(3 << 27) | (number >> 65 & 1) << 28 | (number >> 64 & 1) << 27
    return token_class, block


def encode_token(token: Token, key: int | None, tables: StaTables = DEFAULT_TABLES) -> str:
    """The 20 digits of ``token`` for the meter whose decoder key is ``key`` (class 1 tokens
    need no key)."""
    token_class, block = token_block(token)
    if token_class is not TokenClass.TEST:
        if key is None:
            raise ValidationError(f"a class {int(token_class)} token needs the decoder key")
        block = sta_encrypt(key, block, tables)
    return to_digits(token_class, block)


def decode_token(digits: str, key: int | None, tables: StaTables = DEFAULT_TABLES) -> Token:
    """The token in 20 digits, decrypted with ``key``; a :class:`TokenDecodeError` otherwise.

    A token made for another meter (another key) fails the CRC, as a mistyped one does.
    """
    token_class, block = from_digits(digits)
    if token_class is TokenClass.RESERVED:
        raise TokenDecodeError(TokenFault.CLASS, "class 3 is reserved")
    if token_class is not TokenClass.TEST:
        if key is None:
            raise ValidationError(f"a class {int(token_class)} token needs the decoder key")
        block = sta_decrypt(key, block, tables)
    data, crc = block >> 16, block & 0xFFFF
    if token_crc(token_class << 48 | data) != crc:
        raise TokenDecodeError(TokenFault.CRC, "the CRC does not match (mistyped, or another key)")
    return _parse(token_class, data)


_CREDIT_SUBCLASSES = frozenset(int(member) for member in CreditSubclass)
_TEST_SUBCLASSES = frozenset(int(member) for member in MeterTestSubclass)


def _parse(token_class: TokenClass, data: int) -> Token:
    subclass = data >> 44
    rnd, tid, value = data >> 40 & 15, data >> 16 & 0xFFFFFF, data & 0xFFFF
    if token_class is TokenClass.CREDIT:
        if subclass not in _CREDIT_SUBCLASSES:
            raise TokenDecodeError(
                TokenFault.SUBCLASS, f"credit subclass {subclass} is not carried (currency)"
            )
        return CreditToken(CreditSubclass(subclass), decode_amount(value), tid, rnd)
    if token_class is TokenClass.TEST:
        if subclass not in _TEST_SUBCLASSES:
            raise TokenDecodeError(TokenFault.SUBCLASS, f"class 1 subclass {subclass}")
        test_subclass = MeterTestSubclass(subclass)
        control_bits, manufacturer_bits = _TEST_WIDTHS[test_subclass]
        control = data >> manufacturer_bits & ((1 << control_bits) - 1)
        return MeterTestToken(test_subclass, control, data & ((1 << manufacturer_bits) - 1))
    match subclass:
        case ManagementSubclass.SET_MAX_POWER_LIMIT:
            return SetPowerLimitToken(decode_amount(value), tid, rnd)
        case ManagementSubclass.CLEAR_CREDIT:
            return ClearCreditToken(value, tid, rnd)
        case ManagementSubclass.CLEAR_TAMPER:
            return ClearTamperToken(tid, rnd, value)
        case ManagementSubclass.SET_MAX_PHASE_UNBALANCE_LIMIT:
            return SetPhaseUnbalanceLimitToken(decode_amount(value), tid, rnd)
        case ManagementSubclass.KEY_CHANGE_1:
            flags = data >> 32 & 15
            if flags & 0b0100:
                raise TokenDecodeError(TokenFault.FIELD, "the reserved bit of a key change is set")
            return KeyChangeToken1(
                ken_high=data >> 40 & 15,
                krn=data >> 36 & 15,
                rollover=bool(flags & 0b1000),
                kt=flags & 3,
                key_high=data & 0xFFFFFFFF,
            )
        case ManagementSubclass.KEY_CHANGE_2:
            return KeyChangeToken2(data >> 40 & 15, data >> 32 & 0xFF, data & 0xFFFFFFFF)
    raise TokenDecodeError(TokenFault.SUBCLASS, f"management subclass {subclass} is not carried")
