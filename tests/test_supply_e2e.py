"""Supply control end to end: `hes serve` (in process) polls simulated meters over Modbus TCP
and ingests an MQTT meter through a real Mosquitto, on the fleet's accelerated clock. Meters
that keep their relay closed when credit runs out (the head-end decides) are disconnected
exactly once after the grace period, a protected account never is, and a top-up brings
exactly one reconnect; the audit chain verifies after all of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from headend.broker import LocalBroker
from headend.domain.registry import CustomerRecord, MeterRecord
from headend.links.base import send_command
from headend.links.endpoint import LinkOptions, open_link
from headend.links.pool import LinkPool
from headend.services.dispatcher import DispatchSettings
from headend.services.poller import PollPlan
from headend.services.registry import route_of
from headend.services.serve import ServeSettings, clock_limits, serve
from headend.storage import Database, open_database
from headend.storage.audit import verify_chain
from headend.storage.registry import add_customer, import_meters
from headend.storage.schema import CommandRow, Notification
from headend.storage.supply import set_protection
from meter_sim.config import MeterConfig
from meter_sim.modbus_server import serve_tcp
from meter_sim.mqtt_agent import AgentOptions, run_agents
from meter_sim.runtime import MeterRuntime
from protocols.clock import AcceleratedClock
from protocols.commands import Command
from protocols.disconnect import ControlState
from tests.mqtt_broker import TEST_KEY, TEST_METERS, TEST_SECRET

pytestmark = pytest.mark.mqtt

T0 = 1_767_268_800.0  # 2026-01-01T12:00:00Z, a Thursday noon
SPEED = 600.0  # a 15-minute poll interval every 1.5 real seconds
KEY = bytes.fromhex(TEST_KEY)
MQTT_METER = TEST_METERS[0]
#: the meter keeps supply when credit runs out; no friendly periods of its own
HEAD_END_DECIDES = {
    "auth_key": TEST_KEY,
    "initial_credit": 1500,
    "emergency_credit": 0,
    "local_disconnect": False,
    "friendly_hours": (),
    "friendly_days": (),
}


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - the store is polled, nothing signals
            await asyncio.sleep(0.1)


async def _commands(db: Database) -> list[tuple[str, str, str, str]]:
    async with db.read() as session:
        rows = await session.execute(
            select(
                CommandRow.meter_id, CommandRow.kind, CommandRow.state, CommandRow.actor
            ).order_by(CommandRow.id)
        )
        return [tuple(row) for row in rows.all()]  # type: ignore[misc]


async def _register(db: Database, endpoints: dict[str, str], now: datetime) -> None:
    await db.upgrade()
    for n, meter_id in enumerate(endpoints, start=1):
        customer = CustomerRecord(f"Customer {n}", None, f"+2547000000{n:02d}", "sms")
        await add_customer(db, customer, f"ACC-{meter_id}", now, actor="test")
    rows = [
        (
            n,
            MeterRecord(
                meter_id=meter_id,
                endpoint=endpoint,
                route=route_of(endpoint),
                customer=f"Customer {n - 1}",
                account=f"ACC-{meter_id}",
                auth_key=KEY,
            ),
        )
        for n, (meter_id, endpoint) in enumerate(endpoints.items(), start=2)
    ]
    assert (await import_meters(db, rows, [], now, actor="test")).applied


async def test_exhaustion_disconnects_once_and_a_top_up_reconnects_once(
    tmp_path: Path, broker: LocalBroker
) -> None:
    clock = AcceleratedClock(SPEED, T0)
    now = datetime.fromtimestamp(T0, UTC)
    tcp = [
        MeterRuntime.open(
            MeterConfig(f"MTR-{n}", modbus_unit=n, **HEAD_END_DECIDES),  # type: ignore[arg-type]
            clock,
            tmp_path / "m",
        )
        for n in (1, 2)
    ]
    mqtt = MeterRuntime.open(
        MeterConfig(MQTT_METER, **HEAD_END_DECIDES),  # type: ignore[arg-type]
        clock,
        tmp_path / "q",
    )
    headend = broker.settings()
    mqtt_url = headend.url(with_password=True)
    db = await open_database(f"sqlite:///{tmp_path / 'hes.db'}", check=False)
    stop = asyncio.Event()
    pool = LinkPool()
    options = AgentOptions(telemetry_interval=0.2, meter_secret=TEST_SECRET)
    try:
        async with (
            serve_tcp(tcp) as service,
            run_agents([mqtt], headend, options=options) as agents,
        ):
            await agents.wait_connected(5)
            endpoints = {r.meter_id: f"tcp://127.0.0.1:{service.port}/{n}"
                         for n, r in enumerate(tcp, start=1)}  # fmt: skip
            endpoints[MQTT_METER] = f"{mqtt_url}/{MQTT_METER}"
            await _register(db, endpoints, now)
            await set_protection(
                db, "ACC-MTR-2", until=now + timedelta(days=30), reason="medical need",
                actor="op", now=now,
            )  # fmt: skip
            settings = ServeSettings(
                db_url=db.url,
                plan=PollPlan(interval=900, read_deadline=8.0, lease=20.0,
                              limits=clock_limits(SPEED)),
                worker="e2e",
                link_options=LinkOptions(timeout=1.0, retries=1),
                broker=headend,
                monitor_every=0.5,
                dispatch=DispatchSettings(
                    attempt_timeout=3.0, grace=timedelta(minutes=30),
                    deadline=timedelta(hours=12), retry_base=timedelta(minutes=1),
                ),
                policy_every=0.3,
            )  # fmt: skip
            task = asyncio.create_task(serve(settings, clock, stop))

            async def both_cut() -> bool:
                done = {(m, k, s) for m, k, s, _ in await _commands(db)}
                return {("MTR-1", "disconnect", "verified"),
                        (MQTT_METER, "disconnect", "verified")} <= done  # fmt: skip

            await _until(both_cut)
            assert tcp[0].snapshot().control_state is ControlState.DISCONNECTED
            assert mqtt.snapshot().control_state is ControlState.DISCONNECTED
            assert tcp[1].snapshot().control_state is ControlState.CONNECTED  # protected
            assert tcp[1].snapshot().credit <= 0
            # a top-up, over each meter's own link (the credit path of today)
            for meter_id in ("MTR-1", MQTT_METER):
                link = await open_link(endpoints[meter_id], LinkOptions(timeout=2.0), pool=pool)
                before = await link.read_snapshot()
                transfer = Command.credit_transfer(before.last_transfer + 1, 500_000)
                assert (await send_command(link, transfer, KEY)).accepted
                await link.close()

            async def both_back() -> bool:
                done = {(m, k, s) for m, k, s, _ in await _commands(db)}
                return {("MTR-1", "reconnect", "verified"),
                        (MQTT_METER, "reconnect", "verified")} <= done  # fmt: skip

            await _until(both_back)
            await asyncio.sleep(4 * 900 / SPEED)  # more polls and policy passes: nothing more
            stop.set()
            await asyncio.wait_for(task, 15)
    finally:
        stop.set()
        await pool.close()
        await db.close()
    db = await open_database(f"sqlite:///{tmp_path / 'hes.db'}")
    try:
        commands = await _commands(db)
        assert sorted((m, k, s) for m, k, s, _ in commands) == sorted([
            ("MTR-1", "disconnect", "verified"),
            ("MTR-1", "reconnect", "verified"),
            (MQTT_METER, "disconnect", "verified"),
            (MQTT_METER, "reconnect", "verified"),
        ])  # fmt: skip
        assert {actor for *_, actor in commands} == {"policy"}
        for runtime in (tcp[0], mqtt):  # control mode 6: armed; the customer presses
            assert runtime.snapshot().control_state is ControlState.READY_FOR_RECONNECTION
            runtime.press_button()
            assert runtime.snapshot().control_state is ControlState.CONNECTED
        async with db.read() as session:
            kinds = (
                await session.execute(
                    select(Notification.meter_id, Notification.kind).order_by(Notification.id)
                )
            ).all()
        sent = {(m, k) for m, k in kinds}
        assert ("MTR-1", "disconnected") in sent
        assert (MQTT_METER, "disconnected") in sent
        assert ("MTR-1", "ready_for_reconnection") in sent
        assert (MQTT_METER, "ready_for_reconnection") in sent
        assert not any(c[0] == "MTR-2" for c in commands)  # protected: never cut off
        assert (await verify_chain(db)).broken is None
    finally:
        await db.close()
