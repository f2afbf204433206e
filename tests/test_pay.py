"""Payments at the counter through `hes`, on SQLite and PostgreSQL: the split posted to the
ledger with cached balances that match the postings, every ledger transaction on the audit
chain (a posting edited by hand is named), gapless receipts, the first answer again for a
repeat and reference_conflict for a different body, transfer numbers and STS tokens with the
last TID kept, reversals before and after delivery, and refusals that store nothing."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from cli.hes import app
from headend.domain.pricing import Code, PaymentRefused
from headend.domain.registry import Block, MeterRecord, TariffRecord
from headend.services.registry import route_of
from headend.storage import open_database
from headend.storage.audit import verify_chain
from headend.storage.database import MIGRATIONS, head_revision
from headend.storage.ledger import (
    PaymentAnswer,
    PaymentIntake,
    PaymentRequest,
    add_channel,
    channel_for_key,
    check_balances,
    list_attempts,
    pay,
    set_keypad,
)
from headend.storage.registry import add_tariff, import_meters
from headend.storage.schema import (
    AuditEntry,
    CreditTransfer,
    LedgerPosting,
    LedgerTransaction,
    MeterVending,
    Payment,
    Reading,
    Receipt,
)
from headend.vending import VendingKeyData, read_token
from protocols.sts import Pan
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()
VENDING_KEY = "abababababababab"
PAN = "47123456783"


def hes(db: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--db", db], env={"HES_OPERATOR": "amina"})
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def ok(db: str, *args: str) -> Any:
    code, out = hes(db, *args, "--json")
    assert code == 0, out
    return json.loads(out)


def _tariffs() -> list[TariffRecord]:
    return [
        TariffRecord(
            "RES", "KES", -2, (2500,), 5000, 1000, vat_bp=1600, fee=3000, service_charge=20000,
            debt_share_bp=2500, min_vend=1000, max_vend=10_000_000,
        ),
        TariffRecord(
            "STEP", "KES", -2, (3000,), 5000, 1000,
            blocks=(Block(50_000, 1200), Block(200_000, 2000)),
        ),
    ]  # fmt: skip


METERS = [  # id, endpoint, customer, account, tariff, credit unit
    ("M-1", "tcp://127.0.0.1:1/1", "Wanjiru", "A-1", "RES", "money"),
    ("E-1", "tcp://127.0.0.1:1/2", "Otieno", "A-2", "STEP", "energy"),
    ("K-1", "mqtt://127.0.0.1:1/K-1", "Achieng", "A-3", "STEP", "energy"),
    ("N-1", "tcp://127.0.0.1:1/3", "Baraka", "A-4", "", "money"),
]


async def _register(url: str) -> None:
    """The registry through the library calls the CLI makes (quicker than a command each)."""
    database = await open_database(url, check=False)
    now = datetime.now(UTC)
    try:
        await database.upgrade()
        for tariff in _tariffs():
            assert await add_tariff(database, tariff, now, actor="amina")
        rows = [
            (n, MeterRecord(meter, endpoint, route_of(endpoint), customer=customer,
                            account=account, tariff=tariff, credit_unit=unit))  # type: ignore[arg-type]
            for n, (meter, endpoint, customer, account, tariff, unit) in enumerate(METERS, 1)
        ]  # fmt: skip
        assert (await import_meters(database, rows, [], now, actor="amina")).applied
        key = VendingKeyData(bytes.fromhex(VENDING_KEY), Pan.parse(PAN), base_date=2014)
        assert await set_keypad(database, "K-1", key, now, actor="amina", last_tid=100)
        _, api_key = await add_channel(database, "COUNTER-1", "counter", now, actor="amina")
        assert api_key.startswith("hes_")
    finally:
        await database.close()


@pytest.fixture
def db(db_url: str) -> str:
    asyncio.run(_register(db_url))
    return db_url


def pay_json(db: str, ref: str, meter: str, amount: str, *extra: str) -> dict[str, Any]:
    answer: dict[str, Any] = ok(
        db, "pay", "--channel", "COUNTER-1", "--ref", ref, "--meter", meter, "--amount", amount,
        *extra,
    )  # fmt: skip
    return answer


async def _counts(url: str) -> dict[str, int]:
    database = await open_database(url)
    try:
        async with database.read() as session:
            models = (
                Payment, Receipt, LedgerTransaction, LedgerPosting, CreditTransfer, AuditEntry
            )  # fmt: skip
            return {
                model.__tablename__: int(
                    await session.scalar(select(func.count()).select_from(model)) or 0
                )
                for model in models
            }
    finally:
        await database.close()


def counts(url: str) -> dict[str, int]:
    return asyncio.run(_counts(url))


async def _sql(url: str, *statements: str) -> None:
    database = await open_database(url)
    try:
        async with database.engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await database.close()


def balances_agree(url: str) -> dict[str, int]:
    async def run() -> dict[str, int]:
        database = await open_database(url)
        try:
            checks = await check_balances(database)
        finally:
            await database.close()
        assert [c for c in checks if c.cached != c.from_postings] == []
        per_currency: dict[str, int] = {}
        for check in checks:
            currency = check.code.rsplit(":", 1)[1]
            per_currency[currency] = per_currency.get(currency, 0) + check.cached
        assert set(per_currency.values()) <= {0}
        return {c.code: c.cached for c in checks}

    return asyncio.run(run())


def test_a_payment_is_split_posted_numbered_and_owed_to_the_meter(db: str) -> None:
    first = pay_json(db, "R-1", "M-1", "1000.00")
    assert (first["payment_id"], first["receipt"], first["replayed"]) == (1, 1, False)
    assert first["split"] | {"tax": 0} == {
        "amount": 100_000,
        "debt_recovered": 0,
        "fee": 3000,
        "service_charge": 20000,
        "tax": 0,
        "energy_gross": 77000,
        "energy_net": 77000 - 10621,
        "change_in": 0,
        "change_out": 0,
        "credit_unit": "money",
        "credit_value": 66379,
        "credit_amount": 66379,
        "wh": 26551,
    }
    assert first["split"]["tax"] == 414 + 2759 + 10621
    assert first["delivery"] == {"kind": "transfer", "number": 1, "state": "pending_delivery"}
    assert first["token"] is None
    assert balances_agree(db) == {
        "clearing:COUNTER-1:KES": 100_000,
        "fees:KES": -(3000 - 414),
        "prepaid:A-1:KES": -66379,
        "service:KES": -(20000 - 2759),
        "tax:KES": -(414 + 2759 + 10621),
    }
    before = counts(db)
    again = pay_json(db, "R-1", "M-1", "1000.00")
    assert again == first | {"replayed": True}
    code, out = hes(db, "pay", "--channel", "COUNTER-1", "--ref", "R-1", "--meter", "M-1",
                    "--amount", "999.00")  # fmt: skip
    assert code == 1
    assert out.startswith("error: reference_conflict: reference 'R-1' of channel COUNTER-1")
    assert counts(db) == before
    second = pay_json(db, "R-2", "M-1", "50.00")
    assert (second["receipt"], second["split"]["service_charge"]) == (2, 0)  # paid this month
    assert second["delivery"]["number"] == 2
    shown = ok(db, "payments", "show", "1")
    assert shown["state"] == "accepted"
    assert shown["delivery_state"] == "pending_delivery"
    listed = ok(db, "payments", "list", "--meter", "M-1")
    assert [p["payment_id"] for p in listed] == [2, 1]
    code, out = hes(db, "payments", "show", "1", "--receipt")
    assert code == 0
    assert "RECEIPT 00000001" in out
    assert "transfer    no. 1 to the meter" in out
    assert hes(db, "audit", "verify")[0] == 0
    actions = [e["action"] for e in ok(db, "audit", "show", "--meter", "M-1")]
    assert actions == ["meter.register", "ledger.payment", "ledger.payment"]


def test_a_quote_changes_nothing(db: str) -> None:
    before = counts(db)
    quote = ok(db, "quote", "--meter", "E-1", "--amount", "100.00")
    assert quote["tariff_kind"] == "block"
    assert quote["split"]["wh"] == 8333  # 100.00 at 12.00/kWh, to the Wh
    assert counts(db) == before
    first = pay_json(db, "Q-1", "E-1", "700.00")  # 50 kWh at 12.00, 5 kWh at 20.00
    assert (first["split"]["wh"], first["split"]["change_out"]) == (55000, 0)
    assert ok(db, "quote", "--meter", "E-1", "--amount", "20.00")["split"]["wh"] == 1000


def _reading_row(meter: str, last_transfer: int) -> dict[str, Any]:
    now = datetime(2026, 3, 1, tzinfo=UTC)
    numbers = [
        "energy_import_wh", "rate1_wh", "rate2_wh", "rate3_wh", "rate4_wh", "power_w",
        "voltage_dv", "current_ma", "power_factor_milli", "frequency_chz", "credit",
        "emergency_credit", "debt", "low_credit_threshold", "control_state", "control_mode",
        "status", "last_event_seq", "last_command_seq",
    ]  # fmt: skip
    return {"meter_id": meter, "meter_time": 1, "received_at": now, "source": "poll",
            "last_transfer": last_transfer} | dict.fromkeys(numbers, 0)  # fmt: skip


def test_transfer_numbers_go_on_from_what_the_meter_reported(db: str) -> None:
    async def store() -> None:
        database = await open_database(db)
        try:
            async with database.begin() as session:
                session.add(Reading(**_reading_row("E-1", 7)))
        finally:
            await database.close()

    asyncio.run(store())
    numbers = [pay_json(db, f"T-{n}", "E-1", "10.00")["delivery"]["number"] for n in range(3)]
    assert numbers == [8, 9, 10]


def test_a_keypad_meter_gets_tokens_with_rising_tids_kept_in_the_database(db: str) -> None:
    answers = [pay_json(db, f"K-{n}", "K-1", "61.00") for n in range(3)]
    key = VendingKeyData(bytes.fromhex(VENDING_KEY), Pan.parse(PAN), base_date=2014)
    tids = []
    for answer in answers:
        assert answer["delivery"]["kind"] == "token"
        assert answer["delivery"]["state"] == "issued"
        token = read_token(key, answer["token"])
        assert token.wh == answer["split"]["credit_amount"]
        assert token.tid == answer["delivery"]["number"]
        tids.append(token.tid)
    assert tids == sorted(set(tids))
    assert tids[0] > 100
    # 61.00 buys 5083 Wh: a token carries 5.0 kWh (60.00) and the 1.00 left is change, which
    # the next payment spends: 62.00 buys 5.1 kWh (61.20), 0.80 left; then 61.80: 5.1 kWh
    assert [a["split"]["wh"] for a in answers] == [5000, 5100, 5100]
    assert [a["split"]["change_in"] for a in answers] == [0, 100, 80]
    assert [a["split"]["change_out"] for a in answers] == [100, 80, 60]

    async def last_tid() -> int | None:
        database = await open_database(db)
        try:
            async with database.read() as session:
                return (await session.get(MeterVending, "K-1")).last_tid  # type: ignore[union-attr]
        finally:
            await database.close()

    assert asyncio.run(last_tid()) == tids[-1]
    code, out = hes(db, "payments", "show", str(answers[0]["payment_id"]), "--receipt")
    assert code == 0
    assert " ".join(answers[0]["token"][i : i + 4] for i in range(0, 20, 4)) in out
    balances_agree(db)


def test_reversal_before_delivery_cancels_and_after_a_token_becomes_debt(db: str) -> None:
    remote = pay_json(db, "V-1", "E-1", "100.00")
    reversed_remote = ok(db, "payments", "reverse", str(remote["payment_id"]), "--reason", "typo")
    assert (reversed_remote["state"], reversed_remote["delivery_state"]) == (
        "reversed",
        "cancelled",
    )
    balances = balances_agree(db)
    assert balances["clearing:COUNTER-1:KES"] == 0
    assert balances.get("debt:A-2:KES", 0) == 0

    token = pay_json(db, "V-2", "K-1", "100.00")
    value = token["split"]["credit_value"]
    done = ok(db, "payments", "reverse", str(token["payment_id"]), "--reason", "chargeback")
    assert (done["state"], done["delivery_state"]) == ("reversed", "issued")
    balances = balances_agree(db)
    assert balances["debt:A-3:KES"] == value  # the token cannot be revoked: the customer owes
    code, out = hes(db, "payments", "reverse", str(token["payment_id"]), "--reason", "again")
    assert (code, out.strip()) == (1, f"error: already_reversed: payment {token['payment_id']} "
                                      "is reversed already")  # fmt: skip
    code, out = hes(db, "payments", "show", str(token["payment_id"]))
    assert code == 0
    assert "REVERSED" in out


def test_debt_share_of_a_tariff(db: str) -> None:
    first = pay_json(db, "S-1", "M-1", "500.00")
    # the dispatcher's part: the meter acknowledged the transfer
    asyncio.run(_sql(db, "UPDATE credit_transfers SET state = 'delivered' WHERE payment_id = 1"))
    assert (
        hes(db, "payments", "reverse", str(first["payment_id"]), "--reason", "bank recall")[0] == 0
    )
    owed = balances_agree(db)["debt:A-1:KES"]
    assert owed == first["split"]["credit_value"]
    later = pay_json(db, "S-2", "M-1", "400.00")
    assert later["split"]["debt_recovered"] == min(owed, 10000)  # 25 % of 400.00
    assert balances_agree(db)["debt:A-1:KES"] == owed - later["split"]["debt_recovered"]


REFUSALS = [
    (["--meter", "NOPE", "--amount", "10"], "unknown_account: no meter 'NOPE'"),
    (["--meter", "N-1", "--amount", "10"], "not_vendable: meter N-1 has no tariff"),
    (["--meter", "M-1", "--amount", "10.001"], "malformed_field: amount: '10.001' has more"),
    (["--meter", "M-1", "--amount", "9.99"], "amount_out_of_bounds: 999 is below"),
    (["--meter", "M-1", "--amount", "100000.01"], "amount_out_of_bounds: 10000001 is above"),
    (["--meter", "M-1", "--amount", "10", "--currency", "UGX"], "currency_mismatch"),
    (["--meter", "M-1", "--amount", "ten"], "malformed_field: --amount is a positive"),
    (["--meter", "M-1", "--amount", "0"], "amount_out_of_bounds: an amount is more than zero"),
    (["--meter", "RETIRED", "--amount", "10"], "unknown_account: meter RETIRED is retired"),
    (["--meter", "M-1", "--amount", "10", "--channel", "NOBODY"], "unknown_channel"),
    (["--meter", "CLOSED", "--amount", "10"], "account_closed: account A-9 is closed"),
    (["--meter", "M-1", "--amount", "10", "--ref", ""], "malformed_field: reference"),
]


def test_refusals_are_specific_and_store_nothing(db: str) -> None:
    for step in (
        ["meters", "add", "RETIRED", "--endpoint", "tcp://127.0.0.1:1/9", "--tariff", "RES",
         "--customer", "X", "--account", "A-8"],
        ["meters", "retire", "RETIRED"],
        ["meters", "add", "CLOSED", "--endpoint", "tcp://127.0.0.1:1/8", "--tariff", "RES",
         "--customer", "Y", "--account", "A-9"],
    ):  # fmt: skip
        assert hes(db, *step)[0] == 0
    asyncio.run(_sql(db, "UPDATE accounts SET status = 'closed' WHERE id = 'A-9'"))
    pay_json(db, "FIRST", "M-1", "100.00")
    before, ledger = counts(db), balances_agree(db)
    for args, code in REFUSALS:
        result, out = hes(db, "pay", "--channel", "COUNTER-1", "--ref", "R-9", *args)
        assert result == 1
        assert out.strip().splitlines() == [out.strip()]
        assert out.startswith(f"error: {code}"), out
    assert counts(db) == before
    assert balances_agree(db) == ledger


def _drop_posting_guard(url: str) -> str:
    if url.startswith("postgresql"):
        return "ALTER TABLE ledger_postings DISABLE TRIGGER ledger_postings_immutable"
    return "DROP TRIGGER ledger_postings_no_update"


def test_postings_are_immutable_and_an_edit_by_hand_is_named(db: str) -> None:
    pay_json(db, "E-1", "M-1", "100.00")
    pay_json(db, "E-2", "M-1", "100.00")
    with pytest.raises(Exception, match="immutable"):
        asyncio.run(_sql(db, "UPDATE ledger_postings SET amount = amount + 1 WHERE id = 1"))
    with pytest.raises(Exception, match="immutable"):
        asyncio.run(_sql(db, "DELETE FROM ledger_transactions WHERE id = 1"))
    assert hes(db, "audit", "verify")[0] == 0
    # someone with the database's keys drops the guard and moves money between two postings
    asyncio.run(
        _sql(
            db,
            _drop_posting_guard(db),
            "UPDATE ledger_postings SET amount = amount - 100 WHERE transaction_id = 2 AND "
            "amount > 0",
            "UPDATE ledger_postings SET amount = amount + 100 WHERE id = (SELECT MIN(id) FROM "
            "ledger_postings WHERE transaction_id = 2 AND amount < 0)",
        )
    )
    code, out = hes(db, "audit", "verify")
    assert code == 1
    assert "ledger transaction 2 does not match its audit entry (its postings were edited)" in out
    verdict = ok_fail_json(db)
    assert verdict["intact"] is False


def ok_fail_json(db: str) -> dict[str, Any]:
    code, out = hes(db, "audit", "verify", "--json")
    assert code == 1
    result: dict[str, Any] = json.loads(out)
    return result


def test_receipts_are_gapless_across_refusals(db: str) -> None:
    for n in range(4):
        pay_json(db, f"G-{n}", "M-1", "20.00")
        assert hes(db, "pay", "--channel", "COUNTER-1", "--ref", f"X-{n}", "--meter", "M-1",
                   "--amount", "1.00")[0] == 1  # fmt: skip
    receipts = [p["receipt"] for p in ok(db, "payments", "list")]
    assert sorted(receipts) == [1, 2, 3, 4]


async def test_concurrent_requests_with_one_reference_make_one_payment(db: str) -> None:
    first, second = await open_database(db), await open_database(db)
    request = PaymentRequest("COUNTER-1", "SAME", "M-1", "100.00")
    now = datetime.now(UTC)
    try:
        answers = await asyncio.gather(
            pay(first, request, now, actor="a"),
            pay(second, request, now, actor="b"),
            pay(first, request, now, actor="a"),
        )
    finally:
        await first.close()
        await second.close()
    assert len({a.answer["payment_id"] for a in answers}) == 1
    assert sorted(a.replayed for a in answers) == [False, True, True]
    assert (await _counts(db))["payments"] == 1


def test_channels_list_never_shows_a_key(db: str) -> None:
    code, out = hes(db, "channels", "add", "MPESA", "--kind", "mobile")
    assert code == 0
    key = out.strip().splitlines()[0]
    assert key.startswith("hes_")
    listed = ok(db, "channels", "list")
    assert [(c["name"], c["kind"]) for c in listed] == [
        ("COUNTER-1", "counter"),
        ("MPESA", "mobile"),
    ]
    assert key not in json.dumps(listed)
    assert listed[1]["key_prefix"] == key[:12]

    async def lookup(text: str) -> str | None:
        database = await open_database(db)
        try:
            found = await channel_for_key(database, text)
        finally:
            await database.close()
        return None if found is None else found.name

    assert asyncio.run(lookup(key)) == "MPESA"
    assert asyncio.run(lookup(key[:-1] + ("A" if key[-1] != "A" else "B"))) is None
    code, out = hes(db, "channels", "add", "MPESA", "--kind", "mobile")
    assert (code, out.strip()) == (1, "error: channel 'MPESA' exists already")


def test_tariff_charges_through_the_cli_and_back(db: str) -> None:
    code, out = hes(db, "tariffs", "add", "NEW", "--price", "3000", "--block", "50:1200",
                    "--block", "200.5:2000", "--vat", "7.5", "--fee", "1000",
                    "--service-charge", "5000", "--debt-share", "10", "--min-vend", "500",
                    "--max-vend", "900000")  # fmt: skip
    assert code == 0, out
    shown = ok(db, "tariffs", "show", "NEW")
    assert {k: shown[k] for k in ("kind", "blocks", "fee", "service_charge", "vat_bp")} == {
        "kind": "block",
        "blocks": [[50000, 1200], [200500, 2000]],
        "fee": 1000,
        "service_charge": 5000,
        "vat_bp": 750,
    }
    assert (shown["debt_share_bp"], shown["min_vend"], shown["max_vend"]) == (1000, 500, 900000)
    code, out = hes(db, "tariffs", "add", "NEW", "--price", "3000")
    assert (code, out.strip()) == (1, "error: tariff 'NEW' exists with other values")
    code, out = hes(db, "tariffs", "add", "TOU-B", "--price", "1", "--price", "2", "--block", "5:1")
    assert (code, out.strip()) == (
        1,
        "error: a block tariff has one --price (beyond its last block), not rates",
    )


def test_keypad_key_data_is_kept_once(db: str) -> None:
    key = ["--vending-key", VENDING_KEY, "--pan", PAN, "--base-date", "1993"]
    code, out = hes(db, "keypad", "add", "K-1", *key)
    assert code == 1
    assert "has other STS key data" in out
    same = ["--vending-key", VENDING_KEY, "--pan", PAN]
    assert ok(db, "keypad", "add", "K-1", *same)["changed"] is False
    code, out = hes(db, "keypad", "add", "M-1", *same)
    assert (code, out.strip()) == (
        1,
        "error: meter M-1 counts money: a keypad meter's credit is energy (STS tokens)",
    )


def _migrate(connection: Any, revision: str, down: bool) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    (command.downgrade if down else command.upgrade)(config, revision)


async def test_the_migration_goes_down_and_up_again(db: str) -> None:
    database = await open_database(db)
    now = datetime.now(UTC)
    try:
        await pay(database, PaymentRequest("COUNTER-1", "M", "M-1", "100.00"), now, actor="a")
        async with database.engine.begin() as conn:
            await conn.run_sync(_migrate, "0002", True)
        assert await database.revision() == "0002"
        async with database.engine.begin() as conn:
            await conn.run_sync(_migrate, "head", False)
        assert await database.revision() == head_revision()
        await add_channel(database, "COUNTER-1", "counter", now, actor="a")
        again = await pay(
            database, PaymentRequest("COUNTER-1", "M", "M-1", "100.00"), now, actor="a"
        )
        assert (again.answer["receipt"], again.replayed) == (1, False)
    finally:
        await database.close()


async def test_concurrent_payments_to_one_meter_get_distinct_numbers(db: str) -> None:
    first, second = await open_database(db), await open_database(db)
    now = datetime.now(UTC)

    def request(n: int, meter: str) -> PaymentRequest:
        return PaymentRequest("COUNTER-1", f"C-{meter}-{n}", meter, "30.00")

    try:
        answers = await asyncio.gather(
            *(
                pay(first if n % 2 else second, request(n, meter), now, actor="x")
                for n in range(4)
                for meter in ("E-1", "K-1")
            )
        )
    finally:
        await first.close()
        await second.close()
    for meter in ("E-1", "K-1"):
        numbers = [a.answer["delivery"]["number"] for a in answers if a.answer["meter"] == meter]
        assert len(set(numbers)) == 4
    assert [n for n in numbers if n <= 100] == []  # TIDs go on from the kept last TID
    assert sorted(a.answer["receipt"] for a in answers) == list(range(1, 9))
    assert sorted(
        a.answer["delivery"]["number"] for a in answers if a.answer["meter"] == "E-1"
    ) == [1, 2, 3, 4]


async def test_payments_taken_together_are_answered_as_if_taken_in_turn(db: str) -> None:
    """The API's intake writes concurrent payments in one group: each gets the answer it would
    get alone, in the order they came (a second payment to an account is priced after the
    first, a repeat gets the first answer, a conflict and refusals are refused and kept),
    receipts are gapless, the ledger balances and the audit chain verifies."""
    database = await open_database(db)
    intake = PaymentIntake(database)
    now = datetime.now(UTC)
    requests = [
        PaymentRequest("COUNTER-1", "T-1", "M-1", "200.00"),
        PaymentRequest("COUNTER-1", "T-2", "M-1", "200.00"),  # one account: priced after T-1
        PaymentRequest("COUNTER-1", "T-1", "M-1", "200.00"),  # a repeat: T-1's answer
        PaymentRequest("COUNTER-1", "T-1", "M-1", "199.00"),  # another body: a conflict
        PaymentRequest("COUNTER-1", "T-3", "E-1", "50.00"),
        PaymentRequest("COUNTER-1", "T-4", "K-1", "50.00"),  # a token
        PaymentRequest("COUNTER-1", "T-5", "M-1", "1.00"),  # below the minimum vend
        PaymentRequest("COUNTER-1", "T-6", "NOPE", "10.00"),  # no such meter
    ]
    try:
        outcomes = await asyncio.gather(
            *(intake.pay(r, now, actor="x") for r in requests), return_exceptions=True
        )
        checks = await check_balances(database)
        chain = await verify_chain(database)
        attempts = await list_attempts(database)
    finally:
        await database.close()
    first, second, repeat, conflict, energy, token, low, unknown = outcomes
    answers = (first, second, repeat, energy, token)
    assert all(isinstance(a, PaymentAnswer) for a in answers), answers
    assert isinstance(first, PaymentAnswer)
    assert isinstance(second, PaymentAnswer)
    assert isinstance(repeat, PaymentAnswer)
    assert isinstance(energy, PaymentAnswer)
    assert isinstance(token, PaymentAnswer)
    # RES: a fee of 30.00, then the month's service charge of 200.00, then energy
    assert (first.answer["split"]["service_charge"], first.answer["delivery"]) == (17_000, None)
    assert second.answer["split"]["service_charge"] == 3_000
    assert second.answer["delivery"]["number"] == 1
    assert (repeat.answer, repeat.replayed, first.replayed) == (first.answer, True, False)
    refused = [(r.code if isinstance(r, PaymentRefused) else r) for r in (conflict, low, unknown)]
    assert refused == [Code.REFERENCE_CONFLICT, Code.AMOUNT_OUT_OF_BOUNDS, Code.UNKNOWN_ACCOUNT]
    assert len(token.answer["token"]) == 20
    assert token.answer["delivery"]["number"] > 100
    receipts = [a.answer["receipt"] for a in (first, second, energy, token)]
    assert receipts == [1, 4, 2, 3]  # T-2 waited for the transaction after T-1's
    assert intake.groups == 1
    assert sorted(a.reference or "" for a in attempts) == ["T-1", "T-5", "T-6"]
    assert [c for c in checks if c.cached != c.from_postings] == []
    assert chain.broken is None
    assert (await _counts(db))["payments"] == 4
