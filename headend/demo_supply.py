"""The demo's supply-control story: a meter running down under `hes serve`, in process.

Two meters that leave the cut-off to the head-end (``local_disconnect = false``) are served
over Modbus TCP on an accelerated clock shared with the head-end; both run out of credit in the
evening, inside the tariff's friendly period. The head-end raises one low-credit notice, waits
for the friendly period to end, disconnects one meter and verifies it, and leaves the other,
whose account is protected, on. A top-up brings one reconnect, which arms the relay; the
customer is told to press the button, and does. Every notice goes out as an SMS (written to a
JSON-lines file standing in for the gateway), and the audit trail verifies.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from headend.domain.policy import Calendar
from headend.domain.registry import CustomerRecord, MeterRecord, TariffRecord
from headend.links.base import send_command
from headend.links.endpoint import LinkOptions, open_link
from headend.links.pool import LinkPool
from headend.services.dispatcher import DispatchSettings
from headend.services.poller import PollPlan
from headend.services.registry import route_of
from headend.services.senders import JsonLinesSender, LogSender
from headend.services.serve import ServeSettings, clock_limits, serve
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.commands import CommandView, list_commands
from headend.storage.notices import latest
from headend.storage.registry import add_customer, add_tariff, import_meters
from headend.storage.supply import first_exhausted, set_protection
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock
from protocols.commands import Command
from protocols.disconnect import ControlState

START = datetime(2026, 1, 1, 16, 0, tzinfo=UTC)  # a Thursday afternoon
FRIENDLY = (19 * 60, 20 * 60)  # the tariff's evening: no cut-off from 19:00 to 20:00 UTC
SPEED = 1200.0  # 20 simulated minutes a real second
KEY = "00112233445566778899aabbccddeeff"
CUT, CARE = "EVE-1", "EVE-2"  # run down; and protected (medical need)
HEAD_END_DECIDES = {
    "auth_key": KEY,
    "initial_credit": 5600,  # 56.00: below the low threshold within the hour
    "emergency_credit": 0,
    "local_disconnect": False,
    "friendly_hours": (),
    "friendly_days": (),
}


class Checks(Protocol):
    def check(self, what: str, passed: bool) -> None: ...


class Reporter(Protocol):
    def section(self, title: str) -> None: ...

    def note(self, text: str) -> None: ...

    def table(self, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None: ...


async def _until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    try:
        async with asyncio.timeout(timeout):
            while not await check():  # noqa: ASYNC110 - the store is polled, nothing signals
                await asyncio.sleep(0.1)
    except TimeoutError:
        return False
    return True


def _at(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%H:%M")


async def _register(db: Database, port: int) -> None:
    now = START
    calendar = Calendar(friendly_hours=(FRIENDLY,))
    await add_tariff(
        db, TariffRecord("EVENING", "KES", -2, (2500,), 5000, 1000, calendar), now, actor="demo"
    )
    rows = []
    for n, (meter_id, name) in enumerate(((CUT, "Amina Otieno"), (CARE, "Joseph Mwangi")), 1):
        customer = CustomerRecord(name, None, f"+2547000001{n:02d}", "sms")
        await add_customer(db, customer, f"ACC-{meter_id}", now, actor="demo")
        endpoint = f"tcp://127.0.0.1:{port}/{n}"
        record = MeterRecord(
            meter_id=meter_id,
            endpoint=endpoint,
            route=route_of(endpoint),
            customer=name,
            account=f"ACC-{meter_id}",
            tariff="EVENING",
            auth_key=bytes.fromhex(KEY),
        )
        rows.append((n + 1, record))
    report = await import_meters(db, rows, [], now, actor="demo")
    if not report.applied:
        raise RuntimeError(f"the demo's meters were refused: {report}")
    await set_protection(
        db,
        f"ACC-{CARE}",
        until=now + timedelta(days=90),
        reason="medical need",
        actor="operator:demo",
        now=now,
    )


async def _notices(db: Database) -> list[tuple[str, str, str]]:
    return [(n.meter_id or "", n.kind, n.state) for n in reversed(await latest(db, None, 1000))]


async def supply_control(checks: Checks, reporter: Reporter, workdir: Path) -> None:
    """Run the story (about half a minute) and record its checks."""
    reporter.section("Supply control by policy: a meter runs down under hes serve")
    reporter.note(
        f"{CUT} and {CARE} keep supply when credit runs out and leave the cut-off to the "
        f"head-end; their tariff is friendly from {FRIENDLY[0] // 60}:00 to "
        f"{FRIENDLY[1] // 60}:00 UTC; {CARE}'s account is protected (medical need). "
        f"Both start at 16:00 with 56.00 KES, at {SPEED:g}x real time."
    )
    clock = AcceleratedClock(SPEED, START.timestamp())
    runtimes = [  # state in memory: each run tells the same story
        MeterRuntime.open(MeterConfig(m, modbus_unit=n, **HEAD_END_DECIDES), clock)  # type: ignore[arg-type]
        for n, m in enumerate((CUT, CARE), start=1)
    ]
    path = workdir / "supply.db"
    path.unlink(missing_ok=True)
    sms = workdir / "sms.jsonl"
    sms.unlink(missing_ok=True)
    db = await open_database(f"sqlite:///{path}", check=False)
    stop = asyncio.Event()
    pool = LinkPool()
    try:
        await db.upgrade()
        async with serve_tcp(runtimes) as service:
            await _register(db, service.port)
            settings = ServeSettings(
                db_url=db.url,
                plan=PollPlan(interval=900, read_deadline=5.0, lease=20.0,
                              limits=clock_limits(SPEED)),
                worker="demo-supply",
                link_options=LinkOptions(timeout=2.0, retries=0),
                housekeeping=0.5,
                senders={"sms": JsonLinesSender(sms), "log": LogSender()},
                monitor_every=0.3,
                dispatch=DispatchSettings(
                    grace=timedelta(minutes=15), deadline=timedelta(hours=12),
                    retry_base=timedelta(minutes=1),
                ),
                policy_every=0.3,
            )  # fmt: skip
            task = asyncio.create_task(serve(settings, clock, stop))

            async def cut() -> bool:
                return any(
                    c.kind == "disconnect" and c.state == "verified"
                    for c in await list_commands(db, meter_id=CUT)
                )

            if not await _until(cut, 60.0):
                checks.check(f"{CUT} was disconnected after the friendly period", False)
                return
            commands = await list_commands(db, meter_id=CUT)
            disconnect = commands[0]
            exhausted = await first_exhausted(db, CUT)
            friendly_end = START.replace(hour=FRIENDLY[1] // 60, minute=0)
            reporter.note(
                f"{CUT}: out of credit at {_at(exhausted) if exhausted else '?'} (in the friendly "
                f"period); the disconnect was queued at {_at(disconnect.created_at)}: "
                f"{disconnect.reason}"
            )
            checks.check(
                "the policy waited for the friendly period to end before cutting supply",
                exhausted is not None and exhausted < friendly_end <= disconnect.created_at,
            )
            checks.check(
                f"{CUT}'s disconnect was sent and verified by reading the relay back",
                runtimes[0].snapshot().control_state is ControlState.DISCONNECTED,
            )
            # a top-up through today's credit path
            link = await open_link(settings_endpoint(service.port, 1), pool=pool)
            before = await link.read_snapshot()
            top_up = Command.credit_transfer(before.last_transfer + 1, 50_000)
            applied = await send_command(link, top_up, bytes.fromhex(KEY))
            reporter.note(
                f"{CUT}: a top-up of 500.00 KES at {_at(datetime.fromtimestamp(clock.now(), UTC))}"
                f" ({applied.code.name.lower()})"
            )

            async def restored() -> bool:
                return any(
                    c.kind == "reconnect" and c.state == "verified"
                    for c in await list_commands(db, meter_id=CUT)
                )

            back = await _until(restored, 30.0)
            armed = runtimes[0].snapshot().control_state
            checks.check(
                f"the top-up brought one reconnect, which armed {CUT}'s relay",
                back and armed is ControlState.READY_FOR_RECONNECTION,
            )
            runtimes[0].press_button()
            checks.check(
                "the customer pressed the button and the supply is back",
                runtimes[0].snapshot().control_state is ControlState.CONNECTED,
            )

            async def told() -> bool:
                kinds = {(m, k, s) for m, k, s in await _notices(db)}
                return (CUT, "ready_for_reconnection", "sent") in kinds

            await _until(told, 10.0)
            await asyncio.sleep(3 * 900 / SPEED)  # more rounds: nothing more happens
            stop.set()
            await asyncio.wait_for(task, 15)
        care = runtimes[1].snapshot()
        care_commands = await list_commands(db, meter_id=CARE)
        checks.check(
            f"{CARE} (protected) was never cut off, though out of credit",
            not care_commands and care.control_state is ControlState.CONNECTED and care.credit <= 0,
        )
        commands = await list_commands(db, meter_id=CUT)
        checks.check(
            f"exactly one disconnect and one reconnect for {CUT}",
            sorted((c.kind, c.state) for c in commands)
            == [("disconnect", "verified"), ("reconnect", "verified")],
        )
        notices = await _notices(db)
        low = [n for n in notices if n[0] == CUT and n[1] == "low_credit"]
        checks.check(f"one low-credit notice for {CUT}", len(low) == 1)
        reporter.table(
            "Commands", ["id", "meter", "kind", "by", "state", "reason"], _rows(commands)
        )
        sent = [json.loads(line) for line in sms.read_text().splitlines()] if sms.exists() else []
        reporter.table(
            f"SMS sent (written to {sms.name})",
            ["to", "kind", "text"],
            [[s.get("to", ""), s.get("kind", ""), s.get("body", s.get("text", ""))] for s in sent],
        )
        checks.check(
            "every notice for the customers was sent, once",
            len({s.get("idempotency_key") for s in sent}) == len(sent) > 0
            and all(state == "sent" for m, _, state in notices if m in (CUT, CARE)),
        )
        checks.check(
            "its audit chain verifies, commands included", (await verify_chain(db)).broken is None
        )
    finally:
        stop.set()
        await pool.close()
        await db.close()


def settings_endpoint(port: int, unit: int) -> str:
    return f"tcp://127.0.0.1:{port}/{unit}"


def _rows(commands: list[CommandView]) -> list[list[str]]:
    return [[str(c.id), c.meter_id, c.kind, c.actor, c.state, c.reason] for c in reversed(commands)]
