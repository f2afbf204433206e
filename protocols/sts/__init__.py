"""STS prepaid tokens (IEC 62055-41): meter numbers, decoder keys, the STA cipher, the 20-digit
token codec. Pure: no I/O.

Typical use::

    key_data = KeyData.create("abababababababab", "600727000000000009")
    key = key_data.decoder_key()
    tid = tid_from_time(issued_at, key_data.base_date)
    digits = encode_token(CreditToken(CreditSubclass.ELECTRICITY, 1, tid, rnd=5), key)
    token = decode_token(digits, key)

``decode_token`` returns a typed token or raises :class:`TokenDecodeError` (a
``protocols.errors.DecodeError``) whose ``reason`` is a :class:`TokenFault`.
"""

from protocols.sts.amount import (
    AMOUNT_MAX,
    decode_amount,
    encode_amount,
    is_representable,
    round_amount_up,
)
from protocols.sts.crc import token_crc
from protocols.sts.errors import TokenDecodeError, TokenFault
from protocols.sts.keys import (
    KeyAlgorithm,
    KeyData,
    derive_dkga02,
    derive_dkga04,
    parse_vending_key,
)
from protocols.sts.numbers import MeterNumber, Pan, luhn_check_digit, luhn_valid
from protocols.sts.sta import DEFAULT_TABLES, StaTables, sta_decrypt, sta_encrypt
from protocols.sts.tid import (
    BASE_DATES,
    TID_LIMIT,
    base_epoch,
    next_base_date,
    tid_from_time,
    time_from_tid,
)
from protocols.sts.tokens import (
    CLEAR_ALL_REGISTERS,
    CREDIT_UNITS,
    TID_TOKEN_TYPES,
    ClearCreditToken,
    ClearTamperToken,
    CreditSubclass,
    CreditToken,
    KeyChangeToken1,
    KeyChangeToken2,
    ManagementSubclass,
    MeterTestSubclass,
    MeterTestToken,
    NewKey,
    SetPhaseUnbalanceLimitToken,
    SetPowerLimitToken,
    TidToken,
    Token,
    TokenClass,
    decode_token,
    encode_token,
    format_token,
    from_digits,
    normalize_token,
    to_digits,
    token_block,
)

__all__ = [
    "AMOUNT_MAX",
    "BASE_DATES",
    "CLEAR_ALL_REGISTERS",
    "CREDIT_UNITS",
    "DEFAULT_TABLES",
    "TID_LIMIT",
    "TID_TOKEN_TYPES",
    "ClearCreditToken",
    "ClearTamperToken",
    "CreditSubclass",
    "CreditToken",
    "KeyAlgorithm",
    "KeyChangeToken1",
    "KeyChangeToken2",
    "KeyData",
    "ManagementSubclass",
    "MeterNumber",
    "MeterTestSubclass",
    "MeterTestToken",
    "NewKey",
    "Pan",
    "SetPhaseUnbalanceLimitToken",
    "SetPowerLimitToken",
    "StaTables",
    "TidToken",
    "Token",
    "TokenClass",
    "TokenDecodeError",
    "TokenFault",
    "base_epoch",
    "decode_amount",
    "decode_token",
    "derive_dkga02",
    "derive_dkga04",
    "encode_amount",
    "encode_token",
    "format_token",
    "from_digits",
    "is_representable",
    "luhn_check_digit",
    "luhn_valid",
    "next_base_date",
    "normalize_token",
    "parse_vending_key",
    "round_amount_up",
    "sta_decrypt",
    "sta_encrypt",
    "tid_from_time",
    "time_from_tid",
    "to_digits",
    "token_block",
    "token_crc",
]
