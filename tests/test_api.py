"""The payment API over HTTP, on SQLite and PostgreSQL: payments with the first answer again
for a repeat and reference_conflict for a different body, every refusal as {code, detail}
that changes no balance and is kept as an attempt, lookups, reversals, reprints with the same
token, receipts as JSON and PDF, accounts with their forecast, quotes, signed channels with
replay memory shared by workers, concurrent retries, `hes api` and `hes serve --api-port`
serving over real sockets, and schemathesis against the served OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from cli.hes import app as hes_app
from headend.api import ApiServer, create_app, openapi_document
from headend.domain.registry import Block, MeterRecord, TariffRecord
from headend.domain.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from headend.services.registry import route_of
from headend.services.serve import Ready, ServeSettings, serve
from headend.storage import Database, open_database
from headend.storage.database import insert_ignore
from headend.storage.ledger import add_channel, check_balances, list_attempts, set_keypad
from headend.storage.registry import add_tariff, import_meters
from headend.storage.schema import (
    LedgerTransaction,
    Payment,
    PaymentAttempt,
    Reading,
    RequestSignature,
)
from headend.vending import VendingKeyData, read_token
from protocols.clock import ManualClock
from protocols.sts import Pan
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

REPO = Path(__file__).resolve().parent.parent
VENDING_KEY = "abababababababab"
PAN = "47123456783"
runner = CliRunner()

TARIFFS = [
    TariffRecord(
        "RES", "KES", -2, (2500,), 5000, 1000, vat_bp=1600, fee=3000, debt_share_bp=2500,
        min_vend=1000, max_vend=10_000_000,
    ),
    TariffRecord(
        "STEP", "KES", -2, (3000,), 5000, 1000,
        blocks=(Block(50_000, 1200), Block(200_000, 2000)),
    ),
]  # fmt: skip
METERS = [  # id, endpoint, customer, account, tariff, credit unit
    ("M-1", "tcp://127.0.0.1:1/1", "Wanjiru", "A-1", "RES", "money"),
    ("K-1", "mqtt://127.0.0.1:1/K-1", "Achieng", "A-3", "STEP", "energy"),
    ("M-2", "tcp://127.0.0.1:1/2", "Baraka", "A-5", "RES", "money"),
    ("M-3", "tcp://127.0.0.1:1/3", "Baraka", "A-5", "RES", "money"),
    ("C-1", "tcp://127.0.0.1:1/4", "Juma", "A-9", "RES", "money"),
]


@dataclass
class Api:
    db: Database
    url: str
    clock: ManualClock
    client: httpx.AsyncClient
    keys: dict[str, str]  # channel -> API key
    secret: str  # the signing secret of channel SIGNED

    def auth(self, channel: str = "COUNTER-1") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[channel]}"}

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    def body(self, ref: str, **fields: Any) -> dict[str, Any]:
        document: dict[str, Any] = {
            "reference": ref,
            "meter_id": "M-1",
            "amount": 10_000,
            "currency": "KES",
            "paid_at": self.now().isoformat(),
        }
        document.update(fields)
        return {k: v for k, v in document.items() if v is not None}

    async def pay(self, ref: str, caller: str = "COUNTER-1", **fields: Any) -> httpx.Response:
        return await self.client.post(
            "/v1/payments", json=self.body(ref, **fields), headers=self.auth(caller)
        )


async def register(db: Database, now: datetime) -> tuple[dict[str, str], str]:
    for tariff in TARIFFS:
        assert await add_tariff(db, tariff, now, actor="amina")
    rows = [
        (n, MeterRecord(meter, endpoint, route_of(endpoint), customer=customer, account=account,
                        tariff=tariff, credit_unit=unit))  # type: ignore[arg-type]
        for n, (meter, endpoint, customer, account, tariff, unit) in enumerate(METERS, 1)
    ]  # fmt: skip
    assert (await import_meters(db, rows, [], now, actor="amina")).applied
    key = VendingKeyData(bytes.fromhex(VENDING_KEY), Pan.parse(PAN), base_date=2014)
    assert await set_keypad(db, "K-1", key, now, actor="amina", last_tid=100)
    async with db.begin() as session:
        await session.execute(text("UPDATE accounts SET status = 'closed' WHERE id = 'A-9'"))
    keys = {}
    for name, kind in (("COUNTER-1", "counter"), ("WALLET", "mobile")):
        keys[name] = (await add_channel(db, name, kind, now, actor="amina"))[1]
    view, keys["SIGNED"] = await add_channel(
        db, "SIGNED", "bank", now, actor="amina", require_signature=True
    )
    assert view.signing_secret is not None
    return keys, view.signing_secret


async def open_registered(url: str, now: datetime) -> tuple[Database, dict[str, str], str]:
    db = await open_database(url, check=False)
    await db.upgrade()
    keys, secret = await register(db, now)
    return db, keys, secret


@pytest_asyncio.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    clock = ManualClock(time.time())
    db, keys, secret = await open_registered(db_url, datetime.fromtimestamp(clock.now(), UTC))
    transport = httpx.ASGITransport(app=create_app(db, clock))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://hes") as client:
            yield Api(db, db_url, clock, client, keys, secret)
    finally:
        await db.close()


async def hes(api: Api, *args: str) -> Any:
    """A `hes` command on the API's database (in a thread: the CLI runs its own loop)."""
    return await asyncio.to_thread(runner.invoke, hes_app, [*args, "--db", api.url])


async def count(db: Database, model: Any) -> int:
    async with db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def ledger_state(db: Database) -> tuple[int, int, list[Any]]:
    checks = await check_balances(db)
    assert all(c.cached == c.from_postings for c in checks)
    return await count(db, Payment), await count(db, LedgerTransaction), checks


# -- payments -------------------------------------------------------------------------------------


async def test_a_payment_then_the_same_body_again_then_a_different_one(api: Api) -> None:
    first = await api.pay("R-1")
    assert first.status_code == 201, first.text
    answer = first.json()
    assert answer["receipt"] == 1
    assert answer["channel"] == "COUNTER-1"
    assert answer["split"]["amount"] == 10_000
    assert answer["split"]["fee"] == 3000
    assert answer["delivery"] == {"kind": "transfer", "number": 1, "state": "pending_delivery"}
    assert answer["token"] is None
    assert (
        sum(answer["split"][k] for k in ("debt_recovered", "fee", "service_charge"))
        + answer["split"]["energy_gross"]
        == 10_000
    )
    api.clock.advance(30)  # a retry after a time-out: the same body, later
    again = await api.pay("R-1", paid_at=answer["paid_at"])
    assert again.status_code == 200
    assert again.json() == answer
    before = await ledger_state(api.db)
    conflict = await api.pay("R-1", amount=12_000, paid_at=answer["paid_at"])
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "reference_conflict"
    assert await ledger_state(api.db) == before
    shown = await api.client.get("/v1/payments/R-1", headers=api.auth())
    assert shown.status_code == 200
    assert shown.json() | {} == answer | {
        "state": "accepted",
        "delivery_state": "pending_delivery",
        "reversal_reason": None,
    }
    # another channel's reference is not this channel's
    other = await api.client.get("/v1/payments/R-1", headers=api.auth("WALLET"))
    assert (other.status_code, other.json()["code"]) == (404, "unknown_payment")
    (attempt,) = await list_attempts(api.db)
    assert (attempt.channel, attempt.reference, attempt.code, attempt.source) == (
        "COUNTER-1",
        "R-1",
        "reference_conflict",
        "api",
    )


async def test_a_keypad_payment_answers_with_its_token_and_an_account_with_one_meter(
    api: Api,
) -> None:
    response = await api.pay("K-1", meter_id=None, account_id="A-3", amount=10_000)
    assert response.status_code == 201, response.text
    answer = response.json()
    assert answer["meter"] == "K-1"
    assert answer["delivery"]["kind"] == "token"
    token = read_token(
        VendingKeyData(bytes.fromhex(VENDING_KEY), Pan.parse(PAN), base_date=2014),
        answer["token"],
    )
    assert token.tid == answer["delivery"]["number"] > 100
    several = await api.pay("A5", meter_id=None, account_id="A-5")
    assert (several.status_code, several.json()["code"]) == (422, "malformed_field")
    assert "meter_id: account A-5 has 2 meters (M-2, M-3)" in several.json()["detail"]


REFUSALS: list[tuple[dict[str, Any], int, str, str]] = [
    ({"meter_id": "NOPE"}, 404, "unknown_account", "no meter 'NOPE'"),
    ({"meter_id": None, "account_id": "NOPE"}, 404, "unknown_account", "no account 'NOPE'"),
    ({"meter_id": "C-1"}, 422, "account_closed", "account A-9 is closed"),
    ({"amount": 500}, 422, "amount_out_of_bounds", ""),
    ({"amount": 0}, 422, "malformed_field", "amount:"),
    ({"amount": 20_000_000}, 422, "amount_out_of_bounds", ""),
    ({"currency": "UGX"}, 422, "currency_mismatch", "pays in KES, not UGX"),
    ({"currency": "kes"}, 422, "malformed_field", "currency:"),
    ({"amount": "100.00"}, 422, "malformed_field", "amount: Input should be a valid integer"),
    ({"amount": 100.5}, 422, "malformed_field", "amount:"),
    ({"paid_at": None}, 422, "malformed_field", "paid_at: Field required"),
    ({"paid_at": "2026-01-01T00:00:00"}, 422, "malformed_field", "paid_at:"),
    ({"paid_at": "2020-01-01T00:00:00Z"}, 422, "malformed_field", "paid_at: 2020-01-01"),
    ({"account_id": "A-1"}, 422, "malformed_field", "meter_id or account_id"),
    ({"meter_id": None}, 422, "malformed_field", "meter_id or account_id"),
    ({"colour": "red"}, 422, "malformed_field", "colour: Extra inputs are not permitted"),
    ({"reference": ""}, 422, "malformed_field", "reference:"),
    ({"reference": "R\x00"}, 422, "malformed_field", "reference: String should match"),
    ({"meter_id": "M 1"}, 422, "malformed_field", "meter_id: String should match"),
    ({"channel": "WALLET"}, 403, "forbidden", "channel COUNTER-1 cannot pay as WALLET"),
]


async def test_every_refusal_is_specific_changes_no_balance_and_is_kept(api: Api) -> None:
    assert (await api.pay("OK-1")).status_code == 201
    before = await ledger_state(api.db)
    for n, (fields, status, code, detail) in enumerate(REFUSALS):
        response = await api.pay(f"X-{n}", **fields)
        problem = response.json()
        assert "code" in problem, (fields, response.status_code, problem)
        assert (response.status_code, problem["code"]) == (status, code), (fields, problem)
        assert set(problem) == {"code", "detail"}
        assert detail in problem["detail"], (fields, problem)
    garbage = await api.client.post(
        "/v1/payments",
        content=b"{not json",
        headers=api.auth() | {"Content-Type": "application/json"},
    )
    assert (garbage.status_code, garbage.json()["code"]) == (422, "malformed_field")
    for headers in ({}, {"Authorization": "Bearer hes_wrong"}, {"Authorization": "Basic x"}):
        refused = await api.client.post("/v1/payments", json=api.body("U-1"), headers=headers)
        assert (refused.status_code, refused.json()["code"]) == (401, "unauthorized")
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    # an unknown caller with a malformed body is unauthorized, not told about the body
    anonymous = await api.client.post("/v1/payments", json={"amount": "x"})
    assert (anonymous.status_code, anonymous.json()["code"]) == (401, "unauthorized")
    assert await ledger_state(api.db) == before
    attempts = await list_attempts(api.db, limit=100)
    assert len(attempts) == len(REFUSALS) + 1  # the garbage too; never the unknown callers
    assert {a.code for a in attempts} == {code for _, _, code, _ in REFUSALS}
    assert all(a.channel == "COUNTER-1" and a.source == "api" for a in attempts)
    listed = await hes(api, "payments", "attempts", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert rows[0]["request"] == "{not json"
    assert rows[-1]["code"] == "unknown_account"
    assert "NOPE" in rows[-1]["request"]


async def test_reversal_reprint_and_receipts(api: Api) -> None:
    token_answer = (await api.pay("T-1", meter_id="K-1")).json()
    transfer_answer = (await api.pay("T-2")).json()
    reversed_ = await api.client.post(
        "/v1/payments/T-2/reversal", json={"reason": "paid twice"}, headers=api.auth()
    )
    assert reversed_.status_code == 200, reversed_.text
    state = reversed_.json()
    assert (state["state"], state["delivery_state"], state["reversal_reason"]) == (
        "reversed",
        "cancelled",
        "paid twice",
    )
    again = await api.client.post(
        "/v1/payments/T-2/reversal", json={"reason": "paid twice"}, headers=api.auth()
    )
    assert again.json() == state  # an advice sent again: the same answer, nothing new
    assert await count(api.db, LedgerTransaction) == 3
    for path, body, code in (
        ("/v1/payments/NOPE/reversal", {"reason": "x"}, "unknown_payment"),
        ("/v1/payments/T-1/reversal", {"reason": ""}, "malformed_field"),
        ("/v1/payments/T-1/reversal", {"reason": "   "}, "malformed_field"),
        ("/v1/payments/T-1/reversal", {}, "malformed_field"),
    ):
        refused = await api.client.post(path, json=body, headers=api.auth())
        assert refused.json()["code"] == code
    reprinted = await api.client.post("/v1/payments/T-1/reprint", headers=api.auth())
    assert reprinted.status_code == 200
    copy = reprinted.json()
    assert copy["token"] == token_answer["token"]
    assert copy["receipt"] == token_answer["receipt"]
    assert copy["reprint"] is True
    grouped = " ".join(token_answer["token"][i : i + 4] for i in range(0, 20, 4))
    assert f"TOKEN       {grouped}" in copy["text"]
    assert "REPRINT" in copy["text"]
    cli = await hes(api, "payments", "reprint", str(token_answer["payment_id"]))
    assert cli.exit_code == 0, cli.output
    assert f"TOKEN       {grouped}" in cli.output
    assert "REPRINT" in cli.output
    assert await count(api.db, LedgerTransaction) == 3  # a reprint issues nothing

    number = transfer_answer["receipt"]
    receipt = await api.client.get(f"/v1/receipts/{number}", headers=api.auth())
    assert receipt.status_code == 200
    assert receipt.json()["text"].startswith(f"RECEIPT {number:08d}\n")
    assert "REVERSED" in receipt.json()["text"]
    for headers, path in (
        ({"Accept": "application/pdf"}, f"/v1/receipts/{number}"),
        ({}, f"/v1/receipts/{number}.pdf"),
    ):
        pdf = await api.client.get(path, headers=api.auth() | headers)
        assert pdf.status_code == 200
        assert pdf.headers["content-type"] == "application/pdf"
        assert pdf.content.startswith(b"%PDF-")
        assert f"RECEIPT {number:08d}".encode() in pdf.content
    others = await api.client.get(f"/v1/receipts/{number}", headers=api.auth("WALLET"))
    assert (others.status_code, others.json()["code"]) == (403, "forbidden")
    missing = await api.client.get("/v1/receipts/999", headers=api.auth())
    assert (missing.status_code, missing.json()["code"]) == (404, "unknown_receipt")
    bad = await api.client.get("/v1/receipts/abc", headers=api.auth())
    assert (bad.status_code, bad.json()["code"]) == (422, "malformed_field")
    assert bad.json()["detail"].startswith("number:")


def _reading(meter_time: int, credit: int) -> dict[str, Any]:
    zero = dict.fromkeys(
        ("energy_import_wh", "rate1_wh", "rate2_wh", "rate3_wh", "rate4_wh", "power_w",
         "voltage_dv", "current_ma", "power_factor_milli", "frequency_chz", "emergency_credit",
         "debt", "status", "last_event_seq", "last_transfer", "last_command_seq", "flags"),
        0,
    )  # fmt: skip
    return zero | {
        "meter_id": "M-1",
        "meter_time": meter_time,
        "received_at": datetime.fromtimestamp(meter_time, UTC),
        "source": "poll",
        "credit": credit,
        "low_credit_threshold": 1000,
        "control_state": 1,
        "control_mode": 6,
    }


async def test_an_account_its_meters_forecast_and_this_channels_payments(api: Api) -> None:
    start = int(api.clock.now()) - 3 * 86400
    async with api.db.begin() as session:  # 1,000 minor units a day spent, 8,000 left
        await insert_ignore(
            session, Reading, [_reading(start + d * 86400, 11_000 - d * 1000) for d in range(4)]
        )
    await api.pay("P-1")
    await api.pay("P-2", caller="WALLET")
    response = await api.client.get("/v1/accounts/A-1", headers=api.auth())
    assert response.status_code == 200, response.text
    account = response.json()
    assert account["account_id"] == "A-1"
    assert (account["status"], account["currency"], account["currency_scale"]) == (
        "active",
        "KES",
        -2,
    )
    paid = (await api.client.get("/v1/payments/P-1", headers=api.auth())).json()
    assert account["prepaid"] == 2 * paid["split"]["energy_net"]  # not delivered yet
    assert account["debt"] == 0
    (meter,) = account["meters"]
    assert meter["meter_id"] == "M-1"
    assert meter["last_reading"]["credit"] == 8000
    assert meter["last_reading"]["relay"] == "connected"
    assert meter["days_left"] == 8
    assert [p["reference"] for p in account["recent_payments"]] == ["P-1"]  # its own only
    missing = await api.client.get("/v1/accounts/NOPE", headers=api.auth())
    assert (missing.status_code, missing.json()["code"]) == (404, "unknown_account")
    fresh = (await api.client.get("/v1/accounts/A-3", headers=api.auth())).json()
    assert fresh["meters"][0]["last_reading"] is None
    assert fresh["meters"][0]["days_left"] is None


async def test_a_quote_changes_nothing(api: Api) -> None:
    before = await ledger_state(api.db)
    response = await api.client.post(
        "/v1/quotes", json={"meter_id": "K-1", "amount": 10_000}, headers=api.auth()
    )
    assert response.status_code == 200, response.text
    quoted = response.json()
    assert (quoted["delivery"], quoted["split"]["amount"]) == ("token", 10_000)
    by_account = await api.client.post(
        "/v1/quotes", json={"account_id": "A-3", "amount": 10_000}, headers=api.auth()
    )
    assert by_account.json() == quoted
    paid = (await api.pay("Q-1", meter_id="K-1")).json()
    assert paid["split"] == quoted["split"]
    for body, code in (
        ({"meter_id": "M-1", "amount": 1}, "amount_out_of_bounds"),
        ({"meter_id": "NOPE", "amount": 10_000}, "unknown_account"),
        ({"amount": 10_000}, "malformed_field"),
    ):
        refused = await api.client.post("/v1/quotes", json=body, headers=api.auth())
        assert refused.json()["code"] == code, refused.text
    assert (await ledger_state(api.db))[0] == before[0] + 1


# -- signatures -----------------------------------------------------------------------------------


def signed(api: Api, method: str, path: str, body: bytes, at: float) -> dict[str, str]:
    stamp = str(int(at))
    return api.auth("SIGNED") | {
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(api.secret.encode(), stamp, method, path, body),
        "Content-Type": "application/json",
    }


async def test_a_signing_channel_refuses_unsigned_stale_wrong_and_replayed_requests(
    api: Api,
) -> None:
    body = json.dumps(api.body("S-1")).encode()
    now = api.clock.now()

    async def post(headers: dict[str, str], content: bytes = body) -> httpx.Response:
        return await api.client.post("/v1/payments", content=content, headers=headers)

    unsigned = await post(api.auth("SIGNED") | {"Content-Type": "application/json"})
    assert (unsigned.status_code, unsigned.json()["code"]) == (401, "signature_required")
    stale = await post(signed(api, "POST", "/v1/payments", body, now - 301))
    assert (stale.status_code, stale.json()["code"]) == (401, "stale_timestamp")
    tampered = await post(
        signed(api, "POST", "/v1/payments", body, now), body.replace(b"10000", b"99999")
    )
    assert (tampered.status_code, tampered.json()["code"]) == (401, "bad_signature")
    other_path = await post(signed(api, "POST", "/v1/quotes", body, now))
    assert other_path.json()["code"] == "bad_signature"
    headers = signed(api, "POST", "/v1/payments", body, now)
    first = await post(headers)
    assert first.status_code == 201, first.text
    replay = await post(headers)
    assert (replay.status_code, replay.json()["code"]) == (401, "replayed_signature")
    # another worker (its own app and database connection) remembers it too
    second_db = await open_database(api.url)
    try:
        transport = httpx.ASGITransport(app=create_app(second_db, api.clock))
        async with httpx.AsyncClient(transport=transport, base_url="http://hes") as other:
            elsewhere = await other.post("/v1/payments", content=body, headers=headers)
            assert elsewhere.json()["code"] == "replayed_signature"
            api.clock.advance(1)
            retry = await other.post(
                "/v1/payments",
                content=body,
                headers=signed(api, "POST", "/v1/payments", body, api.clock.now()),
            )
            assert retry.status_code == 200  # a retry signed anew: the first answer
            assert retry.json() == first.json()
    finally:
        await second_db.close()
    path = "/v1/payments/S-1"
    shown = await api.client.get(path, headers=signed(api, "GET", path, b"", api.clock.now()))
    assert shown.status_code == 200
    assert await count(api.db, RequestSignature) == 3
    api.clock.advance(11 * 60)  # past twice the window: forgotten as new ones arrive
    later = await api.client.get(path, headers=signed(api, "GET", path, b"", api.clock.now()))
    assert later.status_code == 200
    assert await count(api.db, RequestSignature) == 1
    # a malformed body from a signing channel: authenticated (signature checked) first
    bad = b'{"amount": "x"}'
    refused = await post(signed(api, "POST", "/v1/payments", bad, api.clock.now() + 1), bad)
    assert (refused.status_code, refused.json()["code"]) == (422, "malformed_field")


def test_channels_add_prints_the_signing_secret_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hes.db'}"
    assert runner.invoke(hes_app, ["db", "upgrade", "--db", url]).exit_code == 0
    added = runner.invoke(
        hes_app, ["channels", "add", "BANK-1", "--kind", "bank", "--require-signature", "--db", url]
    )
    assert added.exit_code == 0, added.output
    key, secret = added.stdout.split()
    assert key.startswith("hes_")
    assert secret.startswith("hss_")
    listed = runner.invoke(hes_app, ["channels", "list", "--json", "--db", url])
    assert json.loads(listed.output)[0]["require_signature"] is True
    assert secret not in listed.output


async def test_a_channel_suspended_or_given_another_key_once_known_pays_nothing(
    api: Api,
) -> None:
    assert (await api.pay("KNOWN-1")).status_code == 201  # the worker keeps the channel now
    before = await ledger_state(api.db)
    async with api.db.begin() as session:
        await session.execute(
            text("UPDATE payment_channels SET status = 'suspended' WHERE name = 'COUNTER-1'")
        )
    suspended = await api.pay("KNOWN-2")
    assert suspended.status_code == 401
    assert suspended.json() == {
        "code": "unauthorized",
        "detail": "no active channel has this API key",
    }
    assert await ledger_state(api.db) == before
    assert (await api.client.get("/v1/payments/KNOWN-1", headers=api.auth())).status_code == 401
    async with api.db.begin() as session:
        await session.execute(
            text("UPDATE payment_channels SET status = 'active' WHERE name = 'COUNTER-1'")
        )
    assert (await api.pay("KNOWN-3")).status_code == 201
    before = await ledger_state(api.db)
    async with api.db.begin() as session:  # a new key: the one kept is no longer it
        await session.execute(
            text("UPDATE payment_channels SET key_hash = 'x' WHERE name = 'COUNTER-1'")
        )
    replaced = await api.pay("KNOWN-4")
    assert replaced.status_code == 401
    assert await ledger_state(api.db) == before


# -- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_identical_requests_make_one_payment(api: Api) -> None:
    second_db = await open_database(api.url)
    try:
        transport = httpx.ASGITransport(app=create_app(second_db, api.clock))
        async with httpx.AsyncClient(transport=transport, base_url="http://hes") as other:
            body = api.body("SAME")
            responses = await asyncio.gather(
                api.client.post("/v1/payments", json=body, headers=api.auth()),
                other.post("/v1/payments", json=body, headers=api.auth()),
                api.client.post("/v1/payments", json=body, headers=api.auth()),
                other.post("/v1/payments", json=body, headers=api.auth()),
            )
    finally:
        await second_db.close()
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201]
    assert len({json.dumps(r.json(), sort_keys=True) for r in responses}) == 1
    assert await count(api.db, Payment) == 1
    assert await count(api.db, PaymentAttempt) == 0


# -- served over real sockets ---------------------------------------------------------------------


@pytest.fixture
def served_db(tmp_path: Path) -> tuple[str, dict[str, str]]:
    url = f"sqlite:///{tmp_path / 'hes.db'}"

    async def setup() -> dict[str, str]:
        db, keys, _ = await open_registered(url, datetime.now(UTC))
        await db.close()
        return keys

    return url, asyncio.run(setup())


def test_hes_api_serves_payments_over_http(served_db: tuple[str, dict[str, str]]) -> None:
    url, keys = served_db
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")} | {
        "PYTHONPATH": str(REPO)
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.hes", "api", "--port", "0", "--db", url],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("serving the payment API on http://127.0.0.1:"), line
        base = line.split()[5]
        with httpx.Client(base_url=base, timeout=10) as client:
            headers = {"Authorization": f"Bearer {keys['COUNTER-1']}"}
            body = {
                "reference": "HTTP-1",
                "meter_id": "M-1",
                "amount": 10_000,
                "paid_at": datetime.now(UTC).isoformat(),
            }
            first = client.post("/v1/payments", json=body, headers=headers)
            assert first.status_code == 201, first.text
            assert client.post("/v1/payments", json=body, headers=headers).json() == first.json()
            assert (
                client.get("/openapi.json").json()["info"]["title"]
                == openapi_document()["info"]["title"]
            )
        process.terminate()
        _, stderr = process.communicate(timeout=15)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_hes_serve_runs_the_api_in_its_loop(served_db: tuple[str, dict[str, str]]) -> None:
    url, keys = served_db
    stop = asyncio.Event()
    ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
    settings = ServeSettings(
        db_url=url, worker="w-api", monitor_every=None, dispatch=None, poll=False, api_port=0
    )
    task = asyncio.create_task(serve(settings, ManualClock(time.time()), stop, ready.set_result))
    try:
        port = (await asyncio.wait_for(ready, 20)).api_port
        assert port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            response = await client.post(
                "/v1/payments",
                json={"reference": "SRV-1", "meter_id": "M-1", "amount": 10_000,
                      "paid_at": datetime.now(UTC).isoformat()},
                headers={"Authorization": f"Bearer {keys['WALLET']}"},
            )  # fmt: skip
            assert response.status_code == 201, response.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    with pytest.raises(httpx.ConnectError):  # stopped with the daemon
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{port}/openapi.json")


async def test_a_port_in_use_is_a_clear_error(api: Api) -> None:
    first = ApiServer(create_app(api.db), "127.0.0.1", 0)
    try:
        with pytest.raises(Exception, match=f"cannot listen on 127.0.0.1:{first.port}"):
            ApiServer(create_app(api.db), "127.0.0.1", first.port)
    finally:
        await first.stop()


# -- schemathesis ---------------------------------------------------------------------------------


def test_schemathesis_finds_no_server_error_and_no_answer_off_the_schema(tmp_path: Path) -> None:
    """Cases generated from the served OpenAPI document, as the channel COUNTER-1, each
    answer checked against the document: no 5xx, every status, media type and body as
    documented. In-process over ASGI, on one event loop of the test's own."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    loop = asyncio.new_event_loop()
    url = f"sqlite:///{tmp_path / 'hes.db'}"
    clock = ManualClock(time.time())
    db, keys, _ = loop.run_until_complete(
        open_registered(url, datetime.fromtimestamp(clock.now(), UTC))
    )
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(db, clock)), base_url="http://hes"
    )
    headers = {"Authorization": f"Bearer {keys['COUNTER-1']}"}
    try:
        # some payments to look up, reverse, reprint and read receipts of
        for n, meter in enumerate(("M-1", "K-1", "M-2")):
            body = {"reference": str(n), "meter_id": meter, "amount": 10_000,
                    "paid_at": datetime.fromtimestamp(clock.now(), UTC).isoformat()}  # fmt: skip
            paid = loop.run_until_complete(client.post("/v1/payments", json=body, headers=headers))
            assert paid.status_code == 201, paid.text
        served = loop.run_until_complete(client.get("/openapi.json"))
        assert served.json() == openapi_document()
        schema = schemathesis.openapi.from_dict(served.json())
        statuses: list[int] = []
        for result in schema.get_all_operations():
            operation = result.ok()

            @settings(
                max_examples=30,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(headers=headers))
            def check(case: Any) -> None:
                kwargs = case.as_transport_kwargs(base_url="http://hes")
                kwargs.pop("cookies", None)
                response = loop.run_until_complete(client.request(**kwargs))
                statuses.append(response.status_code)
                case.validate_response(response, checks=checks)

            check()
        assert 200 in statuses  # the generated requests reached the handlers, not only refusals
        assert max(statuses) < 500
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(db.close())
        loop.close()
