"""Vending STS tokens for keypad meters: credit, management and key change tokens.

The head-end keeps, per keypad meter, its key data (:class:`VendingKeyData`: vending key, SGC,
TI, KRN, KT, base date, KEN, PAN) and the last TID it issued. Every function here is pure and
deterministic given its inputs: the issue time, the last TID and the random nibble are arguments,
so a token can be reproduced exactly; ``rnd=None`` draws the random nibble from ``secrets``.

Two tokens for one meter never share a TID: the TID is the minute of the issue time since the base
date, moved on to ``last_tid + 1`` when that minute is not later than the last one issued. The
caller stores :attr:`VendedToken.tid` as the meter's new last TID in the same transaction that
records the sale.

Electricity amounts are integer Wh; a token carries 0.1 kWh steps up to 1638.3 kWh and coarser
steps above (1, 10, 100 kWh). :attr:`Rounding.UP` (the default, as STS vending does) issues the
smallest amount the token can carry that is not less than the request and reports it in
:attr:`VendedToken.wh`; :attr:`Rounding.EXACT` refuses an amount the token cannot carry.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from protocols.errors import ValidationError
from protocols.sts import (
    AMOUNT_MAX,
    CLEAR_ALL_REGISTERS,
    CREDIT_UNITS,
    TID_LIMIT,
    TID_TOKEN_TYPES,
    ClearCreditToken,
    ClearTamperToken,
    CreditSubclass,
    CreditToken,
    KeyChangeToken1,
    KeyChangeToken2,
    KeyData,
    MeterTestSubclass,
    MeterTestToken,
    NewKey,
    SetPhaseUnbalanceLimitToken,
    SetPowerLimitToken,
    Token,
    decode_token,
    encode_token,
    format_token,
    next_base_date,
    normalize_token,
    round_amount_up,
    tid_from_time,
    time_from_tid,
)
from protocols.units import decimal_text

#: the key data of one keypad meter, as the registry keeps it
VendingKeyData = KeyData

WH_PER_UNIT = 100  # an electricity token counts 0.1 kWh


class Rounding(StrEnum):
    UP = "up"  # issue the next amount the token can carry
    EXACT = "exact"  # refuse an amount the token cannot carry


@dataclass(frozen=True, slots=True)
class VendedToken:
    """One issued (or decoded) token: its 20 digits and every field."""

    digits: str
    token: Token
    tid: int | None  # None for key change and test tokens, which carry no TID
    issued_at: datetime | None  # the minute the TID stands for (UTC)
    base_date: int | None  # of the key it was made with; None for a test token, made with none

    @property
    def formatted(self) -> str:
        return format_token(self.digits)

    @property
    def wh(self) -> int | None:
        """The energy of an electricity credit token, in Wh."""
        if isinstance(self.token, CreditToken) and (
            self.token.subclass is CreditSubclass.ELECTRICITY
        ):
            return self.token.wh
        return None

    def fields(self) -> dict[str, Any]:
        """Every field, JSON-ready."""
        return token_fields(self.token, self.digits, self.base_date)


def _kind(token: Token) -> str:
    match token:
        case CreditToken():
            return f"credit-{token.subclass.name.lower()}"
        case SetPowerLimitToken():
            return "power-limit"
        case ClearCreditToken():
            return "clear-credit"
        case ClearTamperToken():
            return "clear-tamper"
        case SetPhaseUnbalanceLimitToken():
            return "phase-unbalance-limit"
        case KeyChangeToken1():
            return "key-change-1"
        case KeyChangeToken2():
            return "key-change-2"
        case MeterTestToken():
            return "test"
    raise ValidationError(f"not a token: {token!r}")  # pragma: no cover


def token_fields(token: Token, digits: str, base_date: int | None) -> dict[str, Any]:
    """The token's digits, class, subclass, kind and every field, JSON-ready."""
    out: dict[str, Any] = {
        "token": digits,
        "formatted": format_token(digits),
        "kind": _kind(token),
        "class": int(token.token_class),
        "subclass": int(token.subclass),
    }
    match token:
        case KeyChangeToken1():
            out |= {
                "ken_high": token.ken_high,
                "krn": token.krn,
                "rollover": token.rollover,
                "kt": token.kt,
                "key_high": f"{token.key_high:08x}",
            }
        case KeyChangeToken2():
            out |= {"ken_low": token.ken_low, "ti": token.ti, "key_low": f"{token.key_low:08x}"}
        case MeterTestToken():
            out |= {"control": token.control, "manufacturer": token.manufacturer}
        case _:
            if base_date is None:
                raise ValidationError("a token with a TID needs the base date of its key")
            issued = datetime.fromtimestamp(time_from_tid(token.tid, base_date), UTC)
            out |= {
                "tid": token.tid,
                "rnd": token.rnd,
                "base_date": base_date,
                "issued_at": issued.isoformat().replace("+00:00", "Z"),
            }
            match token:
                case CreditToken():
                    out["amount"] = token.amount
                    out["unit"] = CREDIT_UNITS[token.subclass]
                    if token.subclass is CreditSubclass.ELECTRICITY:
                        out["wh"] = token.wh
                        out["kwh"] = decimal_text(token.wh, -3)
                case SetPowerLimitToken() | SetPhaseUnbalanceLimitToken():
                    out["watts"] = token.watts
                case ClearCreditToken():
                    out["register"] = token.register
                case ClearTamperToken():
                    out["pad"] = token.pad
    return out


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValidationError("an issue time must carry its time zone (e.g. 2024-05-01T10:00Z)")
    return moment.astimezone(UTC)


def next_tid(key: VendingKeyData, issued_at: datetime, last_tid: int | None = None) -> int:
    """The TID for a token issued at ``issued_at``: its minute since the base date, or
    ``last_tid + 1`` when that is later. Refuses a TID past the base date's range or the KEN."""
    tid = tid_from_time(_utc(issued_at).timestamp(), key.base_date)
    if last_tid is not None:
        if type(last_tid) is not int or not 0 <= last_tid < TID_LIMIT:
            raise ValidationError(f"last_tid is 0..{TID_LIMIT - 1}, got {last_tid!r}")
        tid = max(tid, last_tid + 1)
    if tid >= TID_LIMIT:
        raise ValidationError(
            f"no TID is left under base date {key.base_date}: a rollover key change is due"
        )
    if tid >> 16 > key.ken:
        raise ValidationError(
            f"the key has expired (KEN {key.ken}) for a token with TID {tid}: a key change is due"
        )
    return tid


def _random(rnd: int | None) -> int:
    if rnd is None:
        return secrets.randbelow(16)
    if type(rnd) is not int or not 0 <= rnd <= 15:
        raise ValidationError(f"the random number is 0..15, got {rnd!r}")
    return rnd


def _amount(value: int, rounding: Rounding, what: str) -> int:
    if type(value) is not int or value <= 0:
        raise ValidationError(f"{what} is a positive integer, got {value!r}")
    if value > AMOUNT_MAX:
        raise ValidationError(f"{what} {value} is more than a token carries ({AMOUNT_MAX})")
    carried = round_amount_up(value)
    if carried != value and rounding is Rounding.EXACT:
        raise ValidationError(
            f"{what} {value} is not an amount a token carries; the next one is {carried}"
        )
    return carried


def _result(digits: str, token: Token, base_date: int) -> VendedToken:
    if isinstance(token, TID_TOKEN_TYPES):
        issued = datetime.fromtimestamp(time_from_tid(token.tid, base_date), UTC)
        return VendedToken(digits, token, token.tid, issued, base_date)
    return VendedToken(digits, token, None, None, base_date)


def _issue(key: VendingKeyData, token: Token) -> VendedToken:
    return _result(encode_token(token, key.decoder_key()), token, key.base_date)


def vend_credit(
    key: VendingKeyData,
    wh: int,
    issued_at: datetime,
    *,
    last_tid: int | None = None,
    rnd: int | None = None,
    rounding: Rounding = Rounding.UP,
) -> VendedToken:
    """An electricity credit token of ``wh`` Wh (rounded up to what a token carries, or refused
    with ``Rounding.EXACT``); the energy it carries is in the result's ``wh``."""
    if type(wh) is not int or wh <= 0:
        raise ValidationError(f"a credit is a positive integer of Wh, got {wh!r}")
    units = -(-wh // WH_PER_UNIT)
    if units * WH_PER_UNIT != wh and rounding is Rounding.EXACT:
        raise ValidationError(f"{wh} Wh is not a whole number of 0.1 kWh")
    amount = _amount(units, rounding, "a credit of 0.1 kWh units")
    nibble = _random(rnd)
    tid = next_tid(key, issued_at, last_tid)
    return _issue(key, CreditToken(CreditSubclass.ELECTRICITY, amount, tid, nibble))


def vend_power_limit(
    key: VendingKeyData,
    watts: int,
    issued_at: datetime,
    *,
    last_tid: int | None = None,
    rnd: int | None = None,
    rounding: Rounding = Rounding.UP,
) -> VendedToken:
    """Set the meter's maximum power limit (W)."""
    limit = _amount(watts, rounding, "a power limit in W")
    return _issue(key, SetPowerLimitToken(limit, next_tid(key, issued_at, last_tid), _random(rnd)))


def vend_phase_unbalance_limit(
    key: VendingKeyData,
    watts: int,
    issued_at: datetime,
    *,
    last_tid: int | None = None,
    rnd: int | None = None,
    rounding: Rounding = Rounding.UP,
) -> VendedToken:
    """Set the meter's maximum phase power unbalance limit (W)."""
    limit = _amount(watts, rounding, "a phase unbalance limit in W")
    tid = next_tid(key, issued_at, last_tid)
    return _issue(key, SetPhaseUnbalanceLimitToken(limit, tid, _random(rnd)))


def vend_clear_credit(
    key: VendingKeyData,
    issued_at: datetime,
    *,
    register: int = CLEAR_ALL_REGISTERS,
    last_tid: int | None = None,
    rnd: int | None = None,
) -> VendedToken:
    """Clear the meter's credit registers in ``register`` (0xFFFF: all)."""
    if type(register) is not int or not 0 <= register <= 0xFFFF:
        raise ValidationError(f"a register mask is 0..0xFFFF, got {register!r}")
    nibble = _random(rnd)
    tid = next_tid(key, issued_at, last_tid)
    return _issue(key, ClearCreditToken(register, tid, nibble))


def vend_clear_tamper(
    key: VendingKeyData,
    issued_at: datetime,
    *,
    last_tid: int | None = None,
    rnd: int | None = None,
) -> VendedToken:
    """Clear the meter's tamper condition."""
    nibble = _random(rnd)
    tid = next_tid(key, issued_at, last_tid)
    return _issue(key, ClearTamperToken(tid, nibble))


def vend_meter_test(
    control: int, manufacturer: int = 0, *, four_digit_manufacturer: bool = False
) -> VendedToken:
    """A class 1 test/display token: not encrypted and not meter specific, so it needs no key.
    ``control`` holds the tests or displays asked for (36 bits, or 28 with a 4-digit
    manufacturer code)."""
    subclass = (
        MeterTestSubclass.MANUFACTURER_4_DIGIT
        if four_digit_manufacturer
        else MeterTestSubclass.MANUFACTURER_2_DIGIT
    )
    token = MeterTestToken(subclass, control, manufacturer)
    return VendedToken(encode_token(token, None), token, None, None, None)


def vend_key_change(old: VendingKeyData, new: VendingKeyData) -> tuple[VendedToken, VendedToken]:
    """The two key change tokens that move a meter from ``old`` to ``new`` key data, both
    encrypted under the old key. A new base date (the next one) sets the rollover bit: the meter
    then clears its TID memory, and the head-end's last TID for it starts again (None)."""
    if new.pan != old.pan:
        raise ValidationError("a key change keeps the meter's PAN")
    rollover = new.base_date != old.base_date
    if rollover and new.base_date != next_base_date(old.base_date):
        raise ValidationError(
            f"a rollover moves from base date {old.base_date} to {next_base_date(old.base_date)}"
        )
    change = NewKey(
        new.decoder_key(), krn=new.krn, kt=new.kt, ti=new.ti, ken=new.ken, rollover=rollover
    )
    first, second = change.tokens()
    return _issue(old, first), _issue(old, second)


def read_token(key: VendingKeyData, text: str) -> VendedToken:
    """Decode a token (as printed: spaces and dashes allowed) with a meter's key data."""
    digits = normalize_token(text)
    return _result(digits, decode_token(digits, key.decoder_key()), key.base_date)
