"""The demo's payments story: money from every kind of channel reaches the meters, once.

A small fleet on the accelerated clock, in process: two meters on Modbus TCP, one on MQTT and a
keypad (STS) meter on MQTT (all on Modbus when there is no broker). `hes serve` (``serve()``)
reads them, runs the balance monitor and the notifier, dispatches, delivers credit and serves
the payment API on a free loopback port. Over real HTTP:

* a mobile wallet pays, and sends the same request again: 200 and the first answer;
* a bank's request times out on its side; the bank looks the reference up and retries with
  the same body: one payment;
* the bank pays for a meter whose line is down, then reverses the payment before the credit
  could be delivered: nothing reaches the meter once its line is back;
* an agent pays on a customer's behalf for that meter;
* a kiosk sells a token for the keypad meter; the customer keys it in, the meter reports it
  accepted and the head-end marks it delivered; a reprint gives the same token;
* an auto-debit mandate pays when the balance monitor sees a meter cross its low threshold
  (the customer is told of the low credit too).

Then every receipt is written as text and PDF, the wallet's settlement file of the day is
reconciled (one payment matched, one missing in the ledger), and the story ends with, for every
meter, the credit the ledger confirmed equal to what the meter reports it received, the
ledger's balances equal to its postings, and the audit chain verifying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from headend.broker import free_port
from headend.demo_supply import Checks, Reporter
from headend.domain.reconcile import parse_settlement
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.links.endpoint import LinkOptions
from headend.services.dispatcher import DispatchSettings
from headend.services.poller import PollPlan
from headend.services.registry import route_of
from headend.services.senders import JsonLinesSender, LogSender
from headend.services.serve import Ready, ServeSettings, clock_limits, serve
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.delivery import TransferView, list_transfers
from headend.storage.ledger import add_channel, check_balances, set_keypad
from headend.storage.mandates import add_mandate, list_charges
from headend.storage.notices import latest
from headend.storage.reconcile import currency_exponents, reconcile_channel
from headend.storage.registry import add_customer, add_tariff, import_meters
from meter_sim.config import LoadConfig, MeterConfig, StsConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.mqtt_agent import AgentOptions, run_agents
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock
from protocols.mqtt import BrokerSettings
from protocols.readings import EventCode
from protocols.sts import KeyData
from protocols.units import decimal_text

log = logging.getLogger(__name__)

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)  # a Monday morning
SPEED = 1200.0  # 20 simulated minutes a real second: a poll of each meter every 0.75 s
KEY = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
VENDING_KEY = "abababababababab"
DRN = "47123456783"
WALLET_METER, BANK_METER, MANDATE_METER, KEYPAD_METER = "PAY-1", "PAY-2", "PAY-3", "KEY-1"
#: the meters on MQTT when there is a broker (the demo provisions them on it)
MQTT_METERS = (MANDATE_METER, KEYPAD_METER)
PRICE = 2500  # 25.00 KES a kWh, net of VAT, at the head-end and on the meters by day
VAT_BP = 1600
LOW = 5000  # 50.00 KES: the tariff's low threshold
MANDATE_AMOUNT = "300.00"  # the mandate pays this, and at most this in a month
STEP_TIMEOUT = 20.0  # real seconds any one step may wait


def _meter(meter_id: str, unit: int, credit: int, watts: int, **more: Any) -> MeterConfig:
    return MeterConfig(
        meter_id,
        modbus_unit=unit,
        auth_key=KEY,
        initial_credit=credit,
        low_credit_threshold=more.pop("low_credit_threshold", LOW),
        emergency_credit=0,
        load=LoadConfig(model="constant", watts=watts),
        **more,
    )


CONFIGS = (
    _meter(WALLET_METER, 1, 20_000, 400),
    _meter(BANK_METER, 2, 20_000, 400),
    # 65.00 KES at 900 W and 25.00 KES a kWh: below the low threshold in 40 minutes
    _meter(MANDATE_METER, 3, 6_500, 900),
    _meter(
        KEYPAD_METER,
        4,
        8_000,  # 8 kWh at 200 W: well above its low threshold all day
        200,
        credit_unit="energy",
        low_credit_threshold=1_000,
        sts=StsConfig(VENDING_KEY, DRN, base_date=2014),
    ),
)
CUSTOMERS = {
    WALLET_METER: "Wanjiru Kamau",
    BANK_METER: "Otieno Ouma",
    MANDATE_METER: "Grace Njeri",
    KEYPAD_METER: "Hassan Ali",
}
CHANNELS = (
    ("WALLET", "mobile"),
    ("BANK", "bank"),
    ("AGENT", "agent"),
    ("KIOSK", "kiosk"),
    ("AUTO", "autodebit"),
)


def _account(meter_id: str) -> str:
    return f"ACC-{meter_id}"


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = STEP_TIMEOUT) -> bool:
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - the store is polled, nothing signals
                await asyncio.sleep(0.1)
    except TimeoutError:
        return False
    return True


def _kes(minor: int) -> str:
    return f"{decimal_text(minor, -2)} KES"


@dataclass(slots=True)
class _Story:
    """What the steps share: the store, the clock, the meters, the API and its keys."""

    checks: Checks
    reporter: Reporter
    workdir: Path
    db: Database
    clock: AcceleratedClock
    runtimes: dict[str, MeterRuntime]
    client: httpx.AsyncClient
    keys: dict[str, str]  # channel -> API key
    mandate: int  # the mandate's id
    on_mqtt: bool
    paid: list[tuple[str, str]] = field(default_factory=list)  # (channel, reference)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), UTC)

    def auth(self, channel: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[channel]}"}

    def body(self, reference: str, meter_id: str, amount: int, payer: str) -> dict[str, Any]:
        return {
            "reference": reference,
            "meter_id": meter_id,
            "amount": amount,
            "currency": "KES",
            "paid_at": self.now().isoformat(),
            "payer": payer,
        }

    async def pay(
        self, channel: str, body: dict[str, Any], timeout: httpx.Timeout | None = None
    ) -> httpx.Response:
        headers = self.auth(channel)
        if timeout is None:
            return await self.client.post("/v1/payments", json=body, headers=headers)
        return await self.client.post("/v1/payments", json=body, headers=headers, timeout=timeout)

    async def payment(self, channel: str, reference: str) -> dict[str, Any]:
        answer = await self.client.get(f"/v1/payments/{reference}", headers=self.auth(channel))
        document: dict[str, Any] = answer.json()
        return document

    async def delivered(self, channel: str, reference: str) -> bool:
        async def done() -> bool:
            return (await self.payment(channel, reference)).get("delivery_state") == "delivered"

        return await _until(done)

    def received(self, meter_id: str) -> list[tuple[str, int, int]]:
        """What the meter logged receiving: (kind, transfer number or TID class, amount)."""
        events = self.runtimes[meter_id].events_since(0, 1000)
        return [
            ("transfer" if e.code is EventCode.TOPUP_ACCEPTED else "token", e.a, e.b)
            for e in events
            if e.code in (EventCode.TOPUP_ACCEPTED, EventCode.TOKEN_ACCEPTED)
        ]

    def note_payment(self, channel: str, answer: dict[str, Any]) -> None:
        self.paid.append((channel, answer["reference"]))
        split = answer["split"]
        credit = (
            f"{decimal_text(split['credit_amount'], -3)} kWh"
            if split["credit_unit"] == "energy"
            else _kes(split["credit_amount"])
        )
        kind = "token of TID" if answer["delivery"]["kind"] == "token" else "transfer"
        self.reporter.note(
            f"{channel} {answer['reference']}: {_kes(split['amount'])} for "
            f"{answer['meter']}, receipt {answer['receipt']}, VAT {_kes(split['tax'])}, "
            f"credit {credit}, {kind} {answer['delivery']['number']} {answer['delivery']['state']}"
        )


async def payments_loop(
    checks: Checks,
    reporter: Reporter,
    workdir: Path,
    broker: BrokerSettings | None,
    meter_secret: str | None,
) -> None:
    """Run the story (about ten seconds) and record its checks. ``broker`` has the
    :data:`MQTT_METERS` provisioned with passwords derived from ``meter_secret``."""
    reporter.section("Payments: every channel, one ledger, credit delivered exactly once")
    clock = AcceleratedClock(SPEED, START.timestamp())
    runtimes = {c.meter_id: MeterRuntime.open(c, clock) for c in CONFIGS}  # state in memory
    on_mqtt = broker is not None and meter_secret is not None
    path = workdir / "payments.db"
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    sms = workdir / "payments-sms.jsonl"
    sms.unlink(missing_ok=True)
    db = await open_database(f"sqlite:///{path}", check=False)
    stop = asyncio.Event()
    task: asyncio.Task[Any] | None = None
    try:
        await db.upgrade()
        async with contextlib.AsyncExitStack() as stack:
            if on_mqtt:
                assert broker is not None
                on_mqtt = await _agents(stack, broker, meter_secret, runtimes, reporter)
                if not on_mqtt:  # the wait ran their clock on: the story starts again
                    clock = AcceleratedClock(SPEED, START.timestamp())
                    runtimes = {c.meter_id: MeterRuntime.open(c, clock) for c in CONFIGS}
            local = [runtimes[m] for m in runtimes if m != BANK_METER]
            if on_mqtt:
                local = [r for r in local if r.meter_id not in MQTT_METERS]
            service = await stack.enter_async_context(serve_tcp(local))
            bank_port = free_port()  # the bank meter's line: down until the story mends it
            endpoints = {
                m: f"tcp://127.0.0.1:{service.port}/{runtimes[m].config.modbus_unit}"
                for m in runtimes
            }
            endpoints[BANK_METER] = f"tcp://127.0.0.1:{bank_port}/2"
            if on_mqtt:
                assert broker is not None
                for meter_id in MQTT_METERS:
                    endpoints[meter_id] = f"{broker.url(with_password=True)}/{meter_id}"
            keys, mandate = await _register(db, endpoints, runtimes)
            reporter.note(
                "meters: "
                + "; ".join(
                    f"{m} {'(keypad) ' if m == KEYPAD_METER else ''}over "
                    f"{'MQTT' if endpoints[m].startswith('mqtt') else 'Modbus TCP'}"
                    for m in runtimes
                )
                + f"; {BANK_METER}'s line is down; channels "
                + ", ".join(f"{n} ({k})" for n, k in CHANNELS)
                + f"; {_account(MANDATE_METER)} holds an auto-debit mandate of "
                f"{MANDATE_AMOUNT} KES (at most {MANDATE_AMOUNT} a month)"
            )
            run = secrets.token_hex(4)
            ready: asyncio.Future[Ready] = asyncio.get_running_loop().create_future()
            settings = ServeSettings(
                db_url=db.url,
                plan=PollPlan(interval=900, read_deadline=5.0, lease=20.0,
                              limits=clock_limits(SPEED)),
                worker=f"demo-payments-{run}",
                link_options=LinkOptions(timeout=2.0, retries=0),
                broker=broker if on_mqtt else None,
                group=f"demo-payments-{run}",
                housekeeping=0.5,
                senders={"sms": JsonLinesSender(sms), "log": LogSender()},
                monitor_every=0.3,
                dispatch=DispatchSettings(retry_base=timedelta(minutes=1)),
                policy_every=1.0,
                api_port=0,
            )  # fmt: skip

            def started(announced: Ready) -> None:
                if not ready.done():
                    ready.set_result(announced)

            task = asyncio.create_task(serve(settings, clock, stop, started))
            done, _ = await asyncio.wait({task, ready}, timeout=STEP_TIMEOUT,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if ready not in done:
                if task.done():
                    task.result()  # its own error
                checks.check("hes serve started with the payment API", False)
                return
            port = ready.result().api_port
            reporter.note(
                f"hes serve --api-port 0: reading, monitoring, dispatching and delivering, "
                f"the API on http://127.0.0.1:{port} (at {SPEED:g}x real time from "
                f"{START:%Y-%m-%d %H:%M} UTC)"
            )
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=10.0
            ) as client:
                story = _Story(
                    checks, reporter, workdir, db, clock, runtimes, client, keys, mandate, on_mqtt
                )
                await _wallet(story)
                await _bank(story)
                await _down_line(story, stack, bank_port)
                await _kiosk(story)
                await _mandate(story)
                await _receipts(story)
                await _reconcile(story)

            async def told() -> bool:  # the notifier has sent what the story raised
                return all(n.state != "pending" for n in await latest(db, None, 1000))

            await _until(told)
            stop.set()
            await asyncio.wait_for(task, 15)
            task = None
        deliveries = await _totals(checks, reporter, db, runtimes)
        await _notices(checks, reporter, db, sms, deliveries)
        verification = await verify_chain(db)
        reporter.note(
            f"hes audit verify: {verification.entries} entries, "
            + ("intact" if verification.broken is None else f"broken: {verification.broken.why}")
        )
        checks.check(
            "the payments' audit chain verifies, the ledger's transactions included",
            verification.broken is None and verification.entries > 0,
        )
    finally:
        stop.set()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        await db.close()


async def _agents(
    stack: contextlib.AsyncExitStack,
    broker: BrokerSettings,
    meter_secret: str | None,
    runtimes: dict[str, MeterRuntime],
    reporter: Reporter,
) -> bool:
    """The MQTT meters' agents, running until ``stack`` closes; False (and none running) when
    the broker does not take them, so that they run on Modbus instead."""
    agents = contextlib.AsyncExitStack()
    group = await agents.enter_async_context(
        run_agents(
            [runtimes[m] for m in MQTT_METERS],
            broker,
            options=AgentOptions(telemetry_interval=0.5, meter_secret=meter_secret),
        )
    )
    try:
        await group.wait_connected(10.0)
    except TimeoutError:
        await agents.aclose()
        reporter.note(
            f"the broker did not take {', '.join(MQTT_METERS)} in time: they run on Modbus"
        )
        return False
    stack.push_async_exit(agents)
    return True


async def _register(
    db: Database, endpoints: dict[str, str], runtimes: dict[str, MeterRuntime]
) -> tuple[dict[str, str], int]:
    """The registry as an operator sets it up (`hes tariffs add`, `hes meters add`, `hes keypad
    add`, `hes channels add`, `hes mandates add`), through the calls those commands make."""
    now = START
    tariff = TariffRecord("HOME", "KES", -2, (PRICE,), LOW, 1000, vat_bp=VAT_BP, min_vend=5000)
    await add_tariff(db, tariff, now, actor="demo")
    rows = []
    for n, (meter_id, name) in enumerate(CUSTOMERS.items(), start=2):
        customer = CustomerRecord(name, None, f"+2547100000{n:02d}", "sms")
        await add_customer(db, customer, _account(meter_id), now, actor="demo")
        record = MeterRecord(
            meter_id=meter_id,
            endpoint=endpoints[meter_id],
            route=route_of(endpoints[meter_id]),
            customer=name,
            account=_account(meter_id),
            tariff="HOME",
            credit_unit=runtimes[meter_id].config.credit_unit,
            auth_key=bytes.fromhex(KEY),
        )
        rows.append((n, record))
    report = await import_meters(db, rows, [], now, actor="demo")
    if not report.applied:
        raise RuntimeError(f"the demo's meters were refused: {report}")
    key = KeyData.create(VENDING_KEY, DRN, base_date=2014)
    await set_keypad(db, KEYPAD_METER, key, now, actor="demo")
    keys = {}
    for name, kind in CHANNELS:
        keys[name] = (await add_channel(db, name, kind, now, actor="demo"))[1]
    mandate = await add_mandate(
        db,
        _account(MANDATE_METER),
        "AUTO",
        mode="fixed",
        amounts=(MANDATE_AMOUNT, MANDATE_AMOUNT),
        now=now,
        actor="demo",
    )
    return keys, mandate.mandate_id


async def _wallet(story: _Story) -> None:
    say, check = story.reporter.note, story.checks.check
    body = story.body("MPESA-QK71XZ", WALLET_METER, 30_000, "+254710000002")
    first = await story.pay("WALLET", body)
    if first.status_code != 201:
        check(f"the wallet's payment was accepted ({first.status_code}: {first.text})", False)
        return
    story.note_payment("WALLET", first.json())
    again = await story.pay("WALLET", body)
    say(f"the wallet sends the same request again: {again.status_code}, the first answer")
    delivered = await story.delivered("WALLET", "MPESA-QK71XZ")
    check(
        f"the wallet's payment was accepted (201) and delivered to {WALLET_METER} over Modbus",
        delivered,
    )
    check(
        "the identical repeat got 200 and the first answer, unchanged",
        again.status_code == 200 and again.json() == first.json(),
    )


async def _bank(story: _Story) -> None:
    say, check = story.reporter.note, story.checks.check
    reference = "BANK-20260302-0001"
    body = story.body(reference, WALLET_METER, 20_000, "KE12 0001 2345 6789")
    impatient = httpx.Timeout(10.0, read=0.001)  # the bank gives up before the answer
    try:
        answer = await story.pay("BANK", body, timeout=impatient)
        say(f"the bank's request was answered in time after all ({answer.status_code})")
    except httpx.TimeoutException as exc:
        say(f"the bank's request timed out on its side ({type(exc).__name__})")

    async def looked_up() -> bool:  # the bank asks whether it landed
        found = await story.client.get(f"/v1/payments/{reference}", headers=story.auth("BANK"))
        return found.status_code == 200

    landed = await _until(looked_up, 5.0)
    say(f"GET /v1/payments/{reference}: " + ("it landed" if landed else "not there"))
    retry = await story.pay("BANK", body)
    say(f"the bank retries with the same reference and body: {retry.status_code}")
    if retry.status_code in (200, 201):
        story.note_payment("BANK", retry.json())
    delivered = await story.delivered("BANK", reference)
    transfers = [
        t for t in await list_transfers(story.db, meter_id=WALLET_METER) if t.state == "delivered"
    ]
    check(
        "the bank's retry after its time-out made one payment, delivered once",
        retry.status_code in (200, 201) and delivered and len(transfers) == 2,
    )


async def _down_line(story: _Story, stack: contextlib.AsyncExitStack, port: int) -> None:
    say, check = story.reporter.note, story.checks.check
    db = story.db
    reference = "BANK-20260302-0002"
    body = story.body(reference, BANK_METER, 25_000, "KE12 0001 2345 6790")
    answer = await story.pay("BANK", body)
    if answer.status_code != 201:
        check(f"the bank's payment was accepted ({answer.status_code}: {answer.text})", False)
        return
    story.note_payment("BANK", answer.json())

    async def tried() -> bool:  # the deliverer tried, and could not reach the meter
        (transfer,) = await list_transfers(db, meter_id=BANK_METER)
        return transfer.attempts > 0 or transfer.last_error is not None

    await _until(tried)
    (waiting,) = await list_transfers(db, meter_id=BANK_METER)
    say(
        f"{BANK_METER} cannot be reached: transfer {waiting.number} waits "
        f"({waiting.state}: {waiting.last_error or 'not tried yet'})"
    )
    busy = 0
    while True:  # in_delivery: the deliverer holds the transfer for an attempt; retry shortly
        reversal = await story.client.post(
            f"/v1/payments/{reference}/reversal",
            json={"reason": "paid to the wrong meter number"},
            headers=story.auth("BANK"),
        )
        if reversal.status_code != 409 or reversal.json().get("code") != "in_delivery":
            break
        busy += 1
        if busy > 50:
            break
        await asyncio.sleep(0.1)
    if busy:
        say(f"the reversal was answered in_delivery {busy} time(s) (an attempt held it)")
    reversed_ = reversal.json() if reversal.status_code == 200 else {}
    say(
        f"the bank reverses it: {reversal.status_code}, payment {reversed_.get('state')}, "
        f"credit {reversed_.get('delivery_state')}"
    )
    await stack.enter_async_context(serve_tcp([story.runtimes[BANK_METER]], port=port))
    # an agent pays for the same meter on the customer's behalf, once its line is back

    async def read_again() -> bool:
        account = await story.client.get(
            f"/v1/accounts/{_account(BANK_METER)}", headers=story.auth("AGENT")
        )
        meters = account.json().get("meters", []) if account.status_code == 200 else []
        return any((m.get("last_reading") or {}).get("at") for m in meters)

    await _until(read_again)
    say(f"{BANK_METER}'s line is mended and the poller reads it again")
    agent = await story.pay(
        "AGENT", story.body("AG17-000451", BANK_METER, 15_000, "agent 17 for +254710000003")
    )
    if agent.status_code == 201:
        story.note_payment("AGENT", agent.json())
    delivered = await story.delivered("AGENT", "AG17-000451")
    transfers = {t.number: t.state for t in await list_transfers(db, meter_id=BANK_METER)}
    received = story.received(BANK_METER)
    check(
        "the reversal before delivery cancelled the transfer: nothing of it reached the meter",
        reversal.status_code == 200
        and reversed_.get("state") == "reversed"
        and transfers.get(waiting.number) == "cancelled"
        and all(number != waiting.number for _, number, _ in received),
    )
    check(
        f"the agent's payment for {BANK_METER} was delivered once its line was back",
        delivered
        and [(k, n) for k, n, _ in received] == [("transfer", agent.json()["delivery"]["number"])],
    )


async def _kiosk(story: _Story) -> None:
    say, check = story.reporter.note, story.checks.check
    reference = "KIOSK-7-000031"
    answer = await story.pay("KIOSK", story.body(reference, KEYPAD_METER, 10_000, "+254710000005"))
    if answer.status_code != 201:
        check(f"the kiosk's payment was accepted ({answer.status_code}: {answer.text})", False)
        return
    document = answer.json()
    story.note_payment("KIOSK", document)
    token = document["token"]
    printed = await story.client.get(
        f"/v1/receipts/{document['receipt']}", headers=story.auth("KIOSK")
    )
    slip = story.workdir / "kiosk-slip.txt"
    slip.write_text(printed.json()["text"] + "\n", encoding="utf-8")
    say(f"the kiosk prints the slip ({slip.name}) with the token {_grouped(token)}")
    before = story.runtimes[KEYPAD_METER].snapshot().credit
    entered = story.runtimes[KEYPAD_METER].enter_token(token)
    after = story.runtimes[KEYPAD_METER].snapshot().credit
    say(
        f"keyed into {KEYPAD_METER}: {entered.status.name.lower()} "
        f"({decimal_text(before, -3)} kWh -> {decimal_text(after, -3)} kWh)"
    )
    delivered = await story.delivered("KIOSK", reference)
    say(
        f"the meter reported the token's TID accepted; the head-end marked it "
        f"{(await story.payment('KIOSK', reference)).get('delivery_state')}"
    )
    reprint = await story.client.post(
        f"/v1/payments/{reference}/reprint", headers=story.auth("KIOSK")
    )
    check(
        "the kiosk's token was keyed in, accepted by the meter and confirmed by the head-end",
        entered.result.accepted and after > before and delivered,
    )
    check(
        "a reprint gives the same token, never a new one",
        reprint.status_code == 200
        and reprint.json().get("token") == token
        and reprint.json().get("reprint") is True,
    )


def _grouped(token: str) -> str:
    return " ".join(token[i : i + 4] for i in range(0, len(token), 4))


async def _mandate(story: _Story) -> None:
    say, check = story.reporter.note, story.checks.check
    db = story.db

    async def charged() -> bool:
        for transfer in await list_transfers(db, meter_id=MANDATE_METER):
            if transfer.state == "delivered":
                return True
        return False

    paid = await _until(charged, STEP_TIMEOUT * 2)
    mandate_charges = await list_charges(db, story.mandate)
    for charge in mandate_charges:
        say(
            f"auto-debit: {MANDATE_METER} crossed its low threshold; charge "
            f"{charge.get('reference')} {charge.get('state')} "
            f"{_kes(int(charge.get('amount') or 0))}"
        )
    paid_charges = [c for c in mandate_charges if c.get("state") == "paid"]
    if paid_charges:
        reference = str(paid_charges[0]["reference"])
        story.paid.append(("AUTO", reference))
    check(
        f"the auto-debit mandate paid once when {MANDATE_METER} crossed its low threshold, "
        "and the credit was delivered over " + ("MQTT" if story.on_mqtt else "Modbus"),
        paid and len(paid_charges) == 1 and len(story.received(MANDATE_METER)) == 1,
    )


async def _receipts(story: _Story) -> None:
    check = story.checks.check
    directory = story.workdir / "receipts"
    directory.mkdir(exist_ok=True)
    for old in directory.iterdir():
        old.unlink()
    numbers = []
    pdfs = True
    for channel, reference in story.paid:
        document = await story.payment(channel, reference)
        number = int(document["receipt"])
        numbers.append(number)
        auth = story.auth(channel)
        text = await story.client.get(f"/v1/receipts/{number}", headers=auth)
        pdf = await story.client.get(f"/v1/receipts/{number}.pdf", headers=auth)
        (directory / f"receipt-{number:08d}.txt").write_text(
            text.json()["text"] + "\n", encoding="utf-8"
        )
        (directory / f"receipt-{number:08d}.pdf").write_bytes(pdf.content)
        pdfs &= pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    story.reporter.note(f"{len(numbers)} receipts written as text and PDF to {directory.name}/")
    check(
        "every payment has one receipt, numbered without a gap, written as text and PDF",
        sorted(numbers) == list(range(1, len(numbers) + 1)) and len(numbers) >= 6 and pdfs,
    )


async def _reconcile(story: _Story) -> None:
    say, check = story.reporter.note, story.checks.check
    first = await story.payment("WALLET", "MPESA-QK71XZ")
    if "paid_at" not in first:
        check("the wallet's payment is there to reconcile", False)
        return
    paid_at = first["paid_at"]
    settlement = story.workdir / "wallet-settlement.csv"
    settlement.write_text(
        "reference,amount,currency,paid_at\n"
        f"MPESA-QK71XZ,{decimal_text(first['split']['amount'], -2)},KES,{paid_at}\n"
        f"MPESA-QK93LM,120.00,KES,{paid_at}\n",
        encoding="utf-8",
    )
    rows = parse_settlement(
        settlement.read_text(encoding="utf-8"), await currency_exponents(story.db)
    )
    day = START.date()
    report = await reconcile_channel(story.db, "WALLET", day, rows, story.now(), actor="demo")
    document = report.document()
    (story.workdir / "wallet-reconciliation.json").write_text(
        json.dumps(document, indent=2) + "\n", encoding="utf-8"
    )
    counts = {k: v for k, v in document["counts"].items() if v}
    say(
        f"hes reconcile --channel WALLET --date {day} {settlement.name}: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; deliveries disagreeing with the meters: {document['deliveries_disagreeing']}"
    )
    check(
        "the wallet's settlement file reconciles: one payment matched, one missing in the ledger",
        counts == {"matched": 1, "missing_in_ledger": 1}
        and document["deliveries_disagreeing"] == 0,
    )


async def _totals(
    checks: Checks, reporter: Reporter, db: Database, runtimes: dict[str, MeterRuntime]
) -> int:
    """Check each meter's credit against the ledger; returns how many deliveries there were."""
    deliveries = 0
    rows = []
    for meter_id, runtime in runtimes.items():
        transfers: list[TransferView] = await list_transfers(db, meter_id=meter_id, limit=1000)
        confirmed = [t for t in transfers if t.state == "delivered"]
        deliveries += len(confirmed)
        credit = sum(t.amount for t in confirmed)
        money = sum(t.value for t in confirmed)
        events = runtime.events_since(0, 1000)
        received = sum(
            e.b for e in events if e.code in (EventCode.TOPUP_ACCEPTED, EventCode.TOKEN_ACCEPTED)
        )
        energy = runtime.config.credit_unit == "energy"
        shown = (lambda v: f"{decimal_text(v, -3)} kWh") if energy else _kes
        rows.append([meter_id, _kes(money), shown(credit), shown(received)])
        checks.check(
            f"{meter_id}: the credit the ledger confirmed ({shown(credit)}) is what the meter "
            "reports it received",
            credit == received,
        )
    reporter.table(
        "Per meter: confirmed in the ledger, received by the meter",
        ["meter", "money confirmed", "credit confirmed", "meter received"],
        rows,
    )
    balances = await check_balances(db)
    checks.check(
        "every ledger balance equals the sum of its postings",
        bool(balances) and all(b.cached == b.from_postings for b in balances),
    )
    return deliveries


async def _notices(
    checks: Checks, reporter: Reporter, db: Database, sms: Path, deliveries: int
) -> None:
    notices = list(reversed(await latest(db, None, 1000)))
    low = [n for n in notices if n.meter_id == MANDATE_METER and n.kind == "low_credit"]
    received = [n for n in notices if n.kind == "payment_received"]
    sent = await asyncio.to_thread(_lines, sms)
    reporter.table(
        f"SMS sent (written to {sms.name})",
        ["to", "kind", "text"],
        [[s.get("to", ""), s.get("kind", ""), s.get("body", s.get("text", ""))] for s in sent],
    )
    checks.check(
        f"{MANDATE_METER}'s customer was told of the low credit once, and every customer of "
        "a delivered payment got a payment-received SMS",
        len(low) == 1
        and len(received) == deliveries
        and all(n.state == "sent" for n in received)
        and len({s.get("idempotency_key") for s in sent}) == len(sent),
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


__all__ = ["MQTT_METERS", "payments_loop"]
