"""Notices: templates and quiet hours (pure), then the outbox and the notifier against real
servers the tests start: an HTTP server for the webhook and the SMS gateway, an SMTP server
(aiosmtpd), a JSON-lines file; on SQLite and PostgreSQL. A sender that is down for a while
gets each notice once when it recovers; a crash between sending and marking repeats the same
notice under the same idempotency key, never a different one."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select

from headend.broker import free_port
from headend.domain.notices import Channel, Kind, QuietHours, deliver_at, render
from headend.services.notifier import Notifier
from headend.services.senders import (
    JsonLinesSender,
    LogSender,
    SmsGatewaySender,
    SmtpSender,
    WebhookSender,
    signature,
)
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.notices import enqueue, failed
from headend.storage.schema import Notification
from protocols.clock import ManualClock
from protocols.errors import ValidationError
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

T0 = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
VALUES = {"meter": "MTR-0001", "balance": "12.50 KES"}


# -- pure ------------------------------------------------------------------------------------------


def test_templates_in_two_languages() -> None:
    english = render(Kind.LOW_CREDIT, "en", VALUES, Channel.SMS)
    assert (
        english.body == "Your electricity credit on meter MTR-0001 is low: 12.50 KES left. "
        "Top up soon."
    )
    chinese = render(Kind.LOW_CREDIT, "zh", VALUES, Channel.SMS)
    assert "余额不足" in chinese.body
    assert "12.50 KES" in chinese.body
    assert render(Kind.LOW_CREDIT, "fr", VALUES, Channel.SMS) == english  # English otherwise
    with pytest.raises(ValidationError, match="needs balance"):
        render(Kind.LOW_CREDIT, "en", {"meter": "M"}, Channel.SMS)
    with pytest.raises(ValidationError, match="at most"):
        render(Kind.LOW_CREDIT, "en", {"meter": "M" * 500, "balance": "1"}, Channel.SMS)


@pytest.mark.parametrize(
    ("kind", "channel", "hour", "at_hour"),
    [
        (Kind.LOW_CREDIT, Channel.SMS, 12, 12),
        (Kind.LOW_CREDIT, Channel.SMS, 22, 7 + 24),  # next morning
        (Kind.LOW_CREDIT, Channel.SMS, 3, 7),
        (Kind.DISCONNECTED, Channel.SMS, 22, 22),  # a cut-off is told at once
        (Kind.LOW_CREDIT, Channel.EMAIL, 22, 22),  # quiet hours hold back SMS only
    ],
)
def test_quiet_hours(kind: Kind, channel: Channel, hour: int, at_hour: int) -> None:
    now = T0.replace(hour=hour)
    expected = T0.replace(hour=0) + timedelta(hours=at_hour)
    assert deliver_at(kind, channel, now, QuietHours()) == expected


def test_quiet_hours_in_the_customers_time_zone() -> None:
    nairobi = QuietHours(utc_offset_minutes=180)  # 21:00 there is 18:00 UTC
    assert deliver_at(Kind.LOW_CREDIT, Channel.SMS, T0.replace(hour=19), nairobi) == T0.replace(
        hour=4
    ) + timedelta(days=1)


# -- servers ---------------------------------------------------------------------------------------


class Hook:
    """A local HTTP server that records requests and can be told to fail."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 200
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests.append((self.path, dict(self.headers.items()), body))
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def hook() -> Iterator[Hook]:
    with Hook() as server:
        yield server


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    port = free_port()
    controller = Controller(box, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield box, port
    finally:
        controller.stop()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    database = await open_database(db_url, check=False)
    await database.upgrade()
    try:
        yield database
    finally:
        await database.close()


async def _enqueue(db: Database, key: str, channel: str, address: str, **kw: Any) -> bool:
    async with db.begin() as session:
        return await enqueue(
            session,
            key=key,
            kind=kw.pop("kind", "low_credit"),
            channel=channel,
            address=address,
            language=kw.pop("language", "en"),
            values=kw.pop("values", VALUES),
            now=T0,
            deliver_at=kw.pop("deliver_at", T0),
            expires_at=kw.pop("expires_at", T0 + timedelta(hours=6)),
        )


async def test_every_channel_delivers_once_with_its_key(
    db: Database, hook: Hook, mailbox: tuple[Mailbox, int], tmp_path: Path
) -> None:
    box, smtp_port = mailbox
    secret = b"hook-secret"
    senders = {
        "webhook": WebhookSender(f"{hook.url}/hook", secret),
        "sms": SmsGatewaySender(f"{hook.url}/sms", "gateway-token"),
        "email": SmtpSender("127.0.0.1", smtp_port, "hes@example.org"),
        "file": JsonLinesSender(tmp_path / "notices.jsonl"),
        "log": LogSender(),
    }
    clock = ManualClock(T0.timestamp())
    notifier = Notifier(db, senders, clock)
    for channel, address in [
        ("webhook", "ops"),
        ("sms", "+254700000001"),
        ("email", "wanjiru@example.org"),
        ("file", "-"),
        ("log", "-"),
    ]:
        assert await _enqueue(db, f"k-{channel}", channel, address)
        assert not await _enqueue(db, f"k-{channel}", channel, address)  # one per cause
    try:
        assert (await notifier.deliver_once()).sent == 5
        assert (await notifier.deliver_once()).sent == 0  # nothing twice
    finally:
        await notifier.close()
    by_path = {path: (headers, body) for path, headers, body in hook.requests}
    headers, body = by_path["/hook"]
    assert headers["Idempotency-Key"] == "k-webhook"
    expected = signature(secret, headers["X-Signature-Timestamp"], body)
    assert headers["X-Signature"] == "sha256=" + expected
    assert hmac.compare_digest(
        expected,
        hmac.new(
            secret, headers["X-Signature-Timestamp"].encode() + b"." + body, hashlib.sha256
        ).hexdigest(),
    )
    assert json.loads(body)["kind"] == "low_credit"
    sms_headers, sms_body = by_path["/sms"]
    assert sms_headers["Authorization"] == "Bearer gateway-token"
    assert json.loads(sms_body)["to"] == "+254700000001"
    (mail,) = [message_from_bytes(m) for m in box.messages]
    assert mail["To"] == "wanjiru@example.org"
    assert mail["X-Idempotency-Key"] == "k-email"
    assert "MTR-0001" in mail["Subject"]
    lines = (tmp_path / "notices.jsonl").read_text().splitlines()
    assert [json.loads(line)["idempotency_key"] for line in lines] == ["k-file"]
    assert (await verify_chain(db)).broken is None


async def test_a_sender_down_for_a_while_sends_each_notice_once(db: Database, hook: Hook) -> None:
    clock = ManualClock(T0.timestamp())
    notifier = Notifier(
        db,
        {"sms": SmsGatewaySender(f"{hook.url}/sms", "t")},
        clock,
        retry_base=60,
        retry_cap=600,
        draw=lambda: 0.0,
    )
    for n in range(3):
        await _enqueue(db, f"down-{n}", "sms", "+254700000001")
    hook.status = 503
    try:
        first = await notifier.deliver_once()
        assert (first.sent, first.retried) == (0, 3)
        assert (await notifier.deliver_once()).retried == 0  # not due yet: back-off
        clock.advance(30)
        assert (await notifier.deliver_once()).retried == 3  # still down
        hook.status = 200
        clock.advance(120)
        assert (await notifier.deliver_once()).sent == 3
        clock.advance(3600)
        assert (await notifier.deliver_once()).sent == 0
    finally:
        await notifier.close()
    sent = [json.loads(body)["reference"] for path, _, body in hook.requests if path == "/sms"]
    assert sent.count("down-0") == 3  # two refused attempts, one delivery: the same notice
    accepted = [r for r in hook.requests[-3:]]
    assert sorted(json.loads(b)["reference"] for _, _, b in accepted) == [
        "down-0",
        "down-1",
        "down-2",
    ]


async def test_refused_and_expired_notices_fail_and_are_shown(db: Database, hook: Hook) -> None:
    clock = ManualClock(T0.timestamp())
    notifier = Notifier(db, {"sms": SmsGatewaySender(f"{hook.url}/sms", "t")}, clock)
    await _enqueue(db, "refused", "sms", "+254700000001")
    await _enqueue(db, "late", "sms", "+254700000002", expires_at=T0 + timedelta(seconds=1))
    await _enqueue(db, "nobody", "pigeon", "roof", expires_at=T0 + timedelta(hours=1))
    hook.status = 400
    clock.advance(2)
    try:
        assert (await notifier.deliver_once()).failed == 2
        # a channel this worker cannot send on waits for one that can, until it expires
        clock.advance(3600)
        assert (await notifier.deliver_once()).failed == 1
    finally:
        await notifier.close()
    reasons = {n.idempotency_key: n.last_error for n in await failed(db)}
    assert "400" in (reasons["refused"] or "")
    assert "expired" in (reasons["late"] or "")
    assert "expired" in (reasons["nobody"] or "")


async def test_a_crash_after_sending_repeats_the_same_notice(db: Database, hook: Hook) -> None:
    """The first worker sends and dies before marking; once its lease expires another worker
    sends again: the same key and the same text, which the receiver de-duplicates."""
    clock = ManualClock(T0.timestamp())
    first = Notifier(
        db, {"sms": SmsGatewaySender(f"{hook.url}/sms", "t")}, clock, worker="a", lease=60
    )
    await _enqueue(db, "once", "sms", "+254700000001")

    async def dies_after_sending(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    first._record = dies_after_sending  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        await first.deliver_once()
    await first.close()
    second = Notifier(db, {"sms": SmsGatewaySender(f"{hook.url}/sms", "t")}, clock, worker="b")
    try:
        assert (await second.deliver_once()).sent == 0  # a's lease still holds
        clock.advance(61)
        assert (await second.deliver_once()).sent == 1
    finally:
        await second.close()
    bodies = [body for _, _, body in hook.requests]
    assert len(bodies) == 2
    assert bodies[0] == bodies[1]
    async with db.begin() as session:
        row = (await session.scalars(select(Notification))).one()
        assert (row.state, row.attempts) == ("sent", 1)
