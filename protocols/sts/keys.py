"""Decoder keys: DKGA02 (DES, 64-bit vending key) and DKGA04 (HMAC-SHA-256, 160-bit vending key).

A meter decrypts tokens with its 64-bit decoder key; the vending side derives the same key from
its vending key and the meter's key data (key type, supply group code, tariff index, key revision,
base date, PAN), so only the key data has to be kept per meter. :class:`KeyData` holds those
inputs, validated; :meth:`KeyData.decoder_key` derives the key with the algorithm that the
vending key's length selects.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from typing import Self

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from protocols.errors import ValidationError
from protocols.sts.numbers import Pan
from protocols.sts.tid import BASE_DATES


class KeyAlgorithm(StrEnum):
    DKGA02 = "DKGA02"  # 8-byte vending key, DES
    DKGA04 = "DKGA04"  # 20-byte vending key, HMAC-SHA-256 (NIST SP 800-108 style KDF)


VENDING_KEY_BYTES = {KeyAlgorithm.DKGA02: 8, KeyAlgorithm.DKGA04: 20}
ENCRYPTION_ALGORITHM_STA = "07"


def parse_vending_key(text: str) -> bytes:
    """A vending key from hex: 16 digits (DKGA02) or 40 digits (DKGA04)."""
    cleaned = text.strip()
    if len(cleaned) not in (16, 40):
        raise ValidationError(
            f"a vending key is 16 hex digits (DKGA02) or 40 (DKGA04), got {len(cleaned)} characters"
        )
    try:
        return bytes.fromhex(cleaned)
    except ValueError as exc:
        raise ValidationError("the vending key is not hexadecimal") from exc


def _des_encrypt(key: bytes, block: bytes) -> bytes:
    # Single DES is TripleDES with the same 8-byte key three times (EDE collapses to E).
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()
    return encryptor.update(block) + encryptor.finalize()


def derive_dkga02(
    vending_key: bytes, *, kt: int, sgc: int, ti: int, krn: int, pan_block: str
) -> int:
    """DKGA02: ``DES(VUDK, d) XOR d XOR VUDK`` with ``d = PAN block XOR control block``."""
    if len(vending_key) != 8:
        raise ValidationError("a DKGA02 vending key is 8 bytes")
    if len(pan_block) != 16 or not pan_block.isascii() or not pan_block.isdigit():
        raise ValidationError(f"a PAN block is 16 digits, got {pan_block!r}")
    control = bytes.fromhex(f"{kt:X}{sgc:06d}{ti:02d}{krn:X}FFFFFF")
    data = bytes(a ^ b for a, b in zip(bytes.fromhex(pan_block), control, strict=True))
    encrypted = _des_encrypt(vending_key, data)
    key = bytes(e ^ d ^ v for e, d, v in zip(encrypted, data, vending_key, strict=True))
    return int.from_bytes(key, "big")


def derive_dkga04(
    vending_key: bytes,
    *,
    base_date: int,
    ti: int,
    sgc: int,
    kt: int,
    krn: int,
    pan: str,
    encryption_algorithm: str = ENCRYPTION_ALGORITHM_STA,
) -> int:
    """DKGA04: the first 8 bytes of HMAC-SHA-256 under the 20-byte vending key over the label
    items ("04", base date, encryption algorithm, tariff index), a zero byte, the context items
    (SGC, KT, KRN, 18-digit PAN) and the output length in bits (64, 4 bytes). Each list of items
    starts with its count; each item is its length then its ASCII text."""
    if len(vending_key) != 20:
        raise ValidationError("a DKGA04 vending key is 20 bytes")
    if len(pan) != 18 or not pan.isascii() or not pan.isdigit():
        raise ValidationError(f"DKGA04 takes the 18-digit PAN, got {pan!r}")

    def items(*texts: str) -> bytes:
        """A count of items, then each item as its length and its ASCII text."""
        out = bytes([len(texts)])
        for text in texts:
            raw = text.encode("ascii")
            out += bytes([len(raw)]) + raw
        return out

    label = items("04", f"{base_date % 100:02d}", encryption_algorithm, f"{ti:02d}")
    context = items(f"{sgc:06d}", f"{kt:x}", f"{krn:x}", pan)
    message = label + b"\x00" + context + (64).to_bytes(4, "big")
    return int.from_bytes(hmac.new(vending_key, message, hashlib.sha256).digest()[:8], "big")


@dataclass(frozen=True, slots=True)
class KeyData:
    """What derives one meter's decoder key, and what a token for it needs besides.

    ``kt`` key type (0..3; 2 = unique decoder key), ``sgc`` supply group code (6 digits), ``ti``
    tariff index (0..99), ``krn`` key revision number (1..15), ``base_date`` the TID base date,
    ``ken`` key expiry number (tokens with ``TID >> 16 > ken`` are refused; 255 = never).
    """

    vending_key: bytes
    pan: Pan
    sgc: int = 123456
    ti: int = 1
    krn: int = 1
    kt: int = 2
    base_date: int = 1993
    ken: int = 255

    def __post_init__(self) -> None:
        if len(self.vending_key) not in VENDING_KEY_BYTES.values():
            raise ValidationError("a vending key is 8 bytes (DKGA02) or 20 bytes (DKGA04)")
        if not isinstance(self.pan, Pan):
            raise ValidationError(f"pan must be a Pan, got {self.pan!r}")
        limits = {"sgc": 999_999, "ti": 99, "krn": 15, "kt": 3, "ken": 255}
        for name, top in limits.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= top:
                raise ValidationError(f"{name} is an integer 0..{top}, got {value!r}")
        if self.krn == 0:
            raise ValidationError("krn is 1..15")
        if self.base_date not in BASE_DATES:
            raise ValidationError(f"base_date is one of {BASE_DATES}, got {self.base_date!r}")

    @classmethod
    def create(
        cls,
        vending_key: str,
        pan: str,
        *,
        sgc: int = 123456,
        ti: int = 1,
        krn: int = 1,
        kt: int = 2,
        base_date: int = 1993,
        ken: int = 255,
    ) -> Self:
        """From text: the vending key in hex and the PAN (18 digits) or DRN (11 or 13 digits)."""
        return cls(parse_vending_key(vending_key), Pan.parse(pan), sgc, ti, krn, kt, base_date, ken)

    @property
    def algorithm(self) -> KeyAlgorithm:
        return KeyAlgorithm.DKGA02 if len(self.vending_key) == 8 else KeyAlgorithm.DKGA04

    def decoder_key(self) -> int:
        """The meter's 64-bit decoder key."""
        if self.algorithm is KeyAlgorithm.DKGA02:
            return derive_dkga02(
                self.vending_key,
                kt=self.kt,
                sgc=self.sgc,
                ti=self.ti,
                krn=self.krn,
                pan_block=self.pan.block,
            )
        return derive_dkga04(
            self.vending_key,
            base_date=self.base_date,
            ti=self.ti,
            sgc=self.sgc,
            kt=self.kt,
            krn=self.krn,
            pan=self.pan.digits,
        )
