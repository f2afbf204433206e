"""Where notices go: a log, a JSON-lines file, a webhook, an SMS gateway over HTTP, e-mail.

Every sender gets the notice's idempotency key with every attempt and passes it on (an
``Idempotency-Key`` header, a ``Message-ID``, a field of the line), so a crash between sending
and marking a notice sent can make a second copy of the same notice, never a different one.
A sender raises DeliveryError when trying again later may help and DeliveryRefused when it
cannot.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import smtplib
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import httpx

from protocols.errors import DeliveryError, DeliveryRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    key: str  # the idempotency key
    kind: str
    channel: str
    address: str
    language: str
    subject: str
    body: str
    values: dict[str, str]
    meter_id: str | None = None
    account_id: str | None = None
    #: files sent with it, (name, bytes): e-mail attaches them; the other senders name them
    attachments: tuple[tuple[str, bytes], ...] = ()

    def document(self) -> dict[str, Any]:
        """JSON-ready; an attachment appears as its name, size and SHA-256 (not its bytes)."""
        return {
            "idempotency_key": self.key,
            "kind": self.kind,
            "channel": self.channel,
            "to": self.address,
            "language": self.language,
            "subject": self.subject,
            "body": self.body,
            "values": self.values,
            "meter_id": self.meter_id,
            "account_id": self.account_id,
            "attachments": [
                {"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in self.attachments
            ],
        }


class Sender(Protocol):
    async def send(self, notice: Outgoing) -> None: ...

    async def close(self) -> None: ...


class LogSender:
    """Writes each notice to the head-end's log (for labs and operators' consoles)."""

    async def send(self, notice: Outgoing) -> None:
        log.info("notice %s (%s) to %s: %s", notice.key, notice.kind, notice.address, notice.body)

    async def close(self) -> None:
        return None


class JsonLinesSender:
    """Appends one JSON document per notice to a file, flushed to disk before it counts as
    sent. A reader de-duplicates by ``idempotency_key`` (a crash may repeat the last line)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    async def send(self, notice: Outgoing) -> None:
        line = json.dumps(notice.document(), ensure_ascii=False, sort_keys=True)
        try:
            await asyncio.to_thread(self._append, line)
        except OSError as exc:
            raise DeliveryError(f"cannot write notices to {self.path}: {exc}") from exc

    async def close(self) -> None:
        return None


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The webhook signature: HMAC-SHA256 over ``timestamp.body``, hex."""
    return hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def _http_outcome(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    detail = f"{what} answered {response.status_code} {response.reason_phrase}"
    if response.status_code in (408, 425, 429) or response.status_code >= 500:
        raise DeliveryError(detail)
    raise DeliveryRefused(detail)


class _HttpSender:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.client = httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def _post(self, body: bytes, headers: dict[str, str], what: str) -> None:
        try:
            response = await self.client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{what} at {self.url}: {type(exc).__name__}: {exc}") from exc
        _http_outcome(response, what)

    async def close(self) -> None:
        await self.client.aclose()


class WebhookSender(_HttpSender):
    """POSTs the notice as JSON, signed: ``X-Signature: sha256=<hex>`` over
    ``X-Signature-Timestamp`` + ``.`` + the body, with the ``Idempotency-Key`` header."""

    def __init__(self, url: str, secret: bytes, timeout: float = 10.0) -> None:
        super().__init__(url, timeout)
        self.secret = secret

    async def send(self, notice: Outgoing) -> None:
        body = json.dumps(notice.document(), ensure_ascii=False, sort_keys=True).encode()
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": notice.key,
            "X-Signature-Timestamp": stamp,
            "X-Signature": "sha256=" + signature(self.secret, stamp, body),
        }
        await self._post(body, headers, "the webhook")


class SmsGatewaySender(_HttpSender):
    """Hands an SMS to an HTTP SMS gateway: ``POST {"to", "text", "reference"}`` with a bearer
    token and the ``Idempotency-Key`` header."""

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        super().__init__(url, timeout)
        self.token = token

    async def send(self, notice: Outgoing) -> None:
        body = json.dumps(
            {"to": notice.address, "text": notice.body, "reference": notice.key},
            ensure_ascii=False,
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self.token}",
            "Idempotency-Key": notice.key,
        }
        await self._post(body, headers, "the SMS gateway")


class SmtpSender:
    """Sends e-mail through an SMTP server (the standard library's client, in a worker
    thread); the idempotency key makes the ``Message-ID``, so a repeat is the same message.
    A notice's attachments (a bill's PDF) go as MIME parts after the text."""

    def __init__(self, host: str, port: int, sender: str, timeout: float = 10.0) -> None:
        self.host, self.port, self.sender, self.timeout = host, port, sender, timeout

    def _message(self, notice: Outgoing) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = notice.address
        message["Subject"] = notice.subject
        message["Date"] = formatdate(usegmt=True)
        digest = hashlib.sha256(notice.key.encode()).hexdigest()[:32]
        message["Message-ID"] = f"<{digest}@prepaid-hes>"
        message["X-Idempotency-Key"] = notice.key
        message.set_content(notice.body)
        for name, data in notice.attachments:
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            maintype, subtype = kind.split("/", 1)
            message.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
        return message

    def _send(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as client:
            client.send_message(message)

    async def send(self, notice: Outgoing) -> None:
        message = self._message(notice)
        try:
            await asyncio.to_thread(self._send, message)
        except smtplib.SMTPRecipientsRefused as exc:
            raise DeliveryRefused(f"the mail server refused {notice.address}") from exc
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise DeliveryRefused(f"the mail server refused it: {exc.smtp_code}") from exc
            raise DeliveryError(f"the mail server answered {exc.smtp_code}") from exc
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"mail server {self.host}:{self.port}: {exc}") from exc

    async def close(self) -> None:
        return None
