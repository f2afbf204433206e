"""Request signatures of payment channels: HMAC-SHA256 over the timestamp, the method, the path
and the body. Pure.

A channel registered with ``--require-signature`` gets a signing secret (shown once) besides its
API key, and signs every request it sends::

    message   = TIMESTAMP "\\n" METHOD "\\n" PATH "\\n" BODY
    signature = hex(HMAC-SHA256(secret as UTF-8 bytes, message))

with the headers ``X-HES-Timestamp: TIMESTAMP`` (Unix time in whole seconds) and
``X-HES-Signature: sha256=SIGNATURE``. PATH is the request's path with its query string, if
any (``/v1/payments/R-1``); BODY is the body's bytes exactly as sent (empty for a GET). A
request outside :data:`WINDOW` of the head-end's clock is refused, and so is a signature seen
before (the storage remembers them for twice the window).

Refusals::

    SignatureRefused (ValidationError)   code, detail
    ├── signature_required               the headers are missing
    ├── bad_signature                    malformed, or not the HMAC of this request
    ├── stale_timestamp                  outside the window
    └── replayed_signature               seen before (raised by the caller that remembers)
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from protocols.errors import ValidationError

WINDOW: Final = timedelta(minutes=5)
TIMESTAMP_HEADER: Final = "X-HES-Timestamp"
SIGNATURE_HEADER: Final = "X-HES-Signature"
PREFIX: Final = "sha256="


class SignatureCode(StrEnum):
    SIGNATURE_REQUIRED = "signature_required"
    BAD_SIGNATURE = "bad_signature"
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAYED_SIGNATURE = "replayed_signature"


class SignatureRefused(ValidationError):
    """A request whose signature is missing, wrong, too old or seen before."""

    def __init__(self, code: SignatureCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def message(timestamp: str, method: str, path: str, body: bytes) -> bytes:
    return f"{timestamp}\n{method.upper()}\n{path}\n".encode() + body


def sign(secret: bytes, timestamp: str, method: str, path: str, body: bytes) -> str:
    """The ``X-HES-Signature`` header's value for this request."""
    digest = hmac.new(secret, message(timestamp, method, path, body), hashlib.sha256)
    return PREFIX + digest.hexdigest()


def verify(
    secret: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    method: str,
    path: str,
    body: bytes,
    now: datetime,
    window: timedelta = WINDOW,
) -> str:
    """Check a request's signature; returns its hex digest (what the caller remembers to
    refuse a replay)."""
    if not timestamp or not signature:
        raise SignatureRefused(
            SignatureCode.SIGNATURE_REQUIRED,
            f"this channel signs its requests: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}",
        )
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise SignatureRefused(
            SignatureCode.BAD_SIGNATURE,
            f"{TIMESTAMP_HEADER} is Unix time in whole seconds, got {timestamp[:20]!r}",
        )
    digest = signature.removeprefix(PREFIX)
    if not signature.startswith(PREFIX) or len(digest) != 64:
        raise SignatureRefused(
            SignatureCode.BAD_SIGNATURE,
            f"{SIGNATURE_HEADER} is 'sha256=' and 64 hex digits",
        )
    expected = sign(secret, timestamp, method, path, body).removeprefix(PREFIX)
    if not hmac.compare_digest(expected, digest.lower()):
        raise SignatureRefused(
            SignatureCode.BAD_SIGNATURE, "the signature is not this request's (method, path, body)"
        )
    skew = abs(now.timestamp() - int(timestamp))
    if skew > window.total_seconds():
        raise SignatureRefused(
            SignatureCode.STALE_TIMESTAMP,
            f"{TIMESTAMP_HEADER} is {int(skew)} s from the head-end's clock (at most "
            f"{int(window.total_seconds())} s)",
        )
    return expected


__all__ = [
    "PREFIX",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WINDOW",
    "SignatureCode",
    "SignatureRefused",
    "message",
    "sign",
    "verify",
]
