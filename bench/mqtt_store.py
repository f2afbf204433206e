"""MQTT telemetry into the store: the head-end's ingest with its storage sink beside a bare paho
subscriber doing executemany into the same table, on SQLite and on PostgreSQL.

    .venv/bin/python bench/mqtt_store.py                     # 50 meters x 400 telemetry
    .venv/bin/python bench/mqtt_store.py --db sqlite --meters 100 --messages 200

Runs on a Mosquitto it starts itself (headend.broker.LocalBroker, loopback, a free port). Per
round, the meters (one paho client each, their own broker accounts) publish ``--messages``
telemetry each at QoS 1 while both subscribers are away; their persistent sessions hold the
backlog on the broker. Then each subscriber in turn connects and drains it (the order
alternates between rounds); its time runs from its connect to its last row committed:

* the baseline: a bare paho subscriber (its network thread) decoding each payload into a
  reading row and inserting the rows with one SQLAlchemy Core executemany (insert-or-ignore)
  per ``--batch`` messages, paho acknowledging each message on receipt;
* the project: ``headend.ingest.Ingest`` with ``StorageSink``: topic and schema checks,
  de-duplication, validation against the meter's reading before, the ``telemetry_seen`` key
  and the reading in one transaction per burst, each message acknowledged only once stored.

Each gets a database of its own migrated to head (SQLite in a temporary directory; PostgreSQL
at 127.0.0.1:5432, a database created for the run and dropped at its end), with the meters
registered. Prints msg/s of each, the ratio (target >= 0.8), and this process's CPU time per
message of the median round (less disturbed by other work on the machine than the wall time).
Bounded in meters, messages, rounds and time; everything it starts is stopped, and the files
and databases are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import paho.mqtt.client as paho  # noqa: E402
from amr import POSTGRES_ADMIN, _postgres_answers, fresh_database  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.dialects import postgresql, sqlite  # noqa: E402

from headend.broker import LocalBroker  # noqa: E402
from headend.domain.registry import MeterRecord  # noqa: E402
from headend.domain.validation import Findings  # noqa: E402
from headend.ingest import Ingest  # noqa: E402
from headend.services.ingest_sink import StorageSink  # noqa: E402
from headend.services.registry import route_of  # noqa: E402
from headend.storage import open_database  # noqa: E402
from headend.storage.readings import reading_row  # noqa: E402
from headend.storage.registry import import_meters  # noqa: E402
from headend.storage.schema import Reading  # noqa: E402
from protocols.clock import SystemClock  # noqa: E402
from protocols.disconnect import ControlState  # noqa: E402
from protocols.mqtt import (  # noqa: E402
    BrokerSettings,
    TopicKind,
    TopicScheme,
    decode_telemetry,
    encode_telemetry,
)
from protocols.readings import MeterSnapshot, StatusFlag  # noqa: E402

TOPICS = TopicScheme("bench")
SECRET = secrets.token_hex(32)
RECEIVE_MAXIMUM = 1000
BOOT = 1
BASE = MeterSnapshot(
    meter_id="B00001",
    time=0,
    energy_import_wh=0,
    energy_rates_wh=(0, 0, 0, 0),
    power_w=600,
    voltage_dv=2301,
    current_ma=2600,
    power_factor_milli=998,
    frequency_chz=5000,
    credit=1_000_000,
    emergency_credit=0,
    debt=0,
    credit_unit=2,
    currency="KES",
    currency_scale=-2,
    low_credit_threshold=5000,
    control_state=ControlState.CONNECTED,
    control_mode=6,
    status=StatusFlag.IN_CREDIT,
    last_event_seq=0,
    last_transfer=0,
    last_command_seq=0,
)


def _meter_ids(count: int) -> list[str]:
    return [f"B{n:05d}" for n in range(1, count + 1)]


def _payloads(meter_id: str, first_n: int, count: int, start: int) -> list[bytes]:
    """Telemetry ``first_n ..`` of one meter, a minute apart from ``start``, 10 Wh a minute."""
    out = []
    for n in range(first_n, first_n + count):
        energy = 10 * n
        snapshot = replace(
            BASE,
            meter_id=meter_id,
            time=start + 60 * n,
            energy_import_wh=energy,
            energy_rates_wh=(energy, 0, 0, 0),
        )
        out.append(encode_telemetry(snapshot, BOOT, n))
    return out


def _publish(broker: LocalBroker, first_n: int, args: argparse.Namespace, start: int) -> None:
    """Every meter publishes its telemetry (QoS 1) from a client of its own; returns once the
    broker acknowledged all of it."""
    clients = []
    for meter_id in _meter_ids(args.meters):
        settings = broker.meter_settings(meter_id)
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=meter_id,
            protocol=paho.MQTTv5,
        )
        client.username_pw_set(settings.username, settings.password)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)
        client.connect(settings.host, settings.port)
        client.loop_start()
        clients.append((meter_id, client))
    try:
        infos = []
        for meter_id, client in clients:
            topic = TOPICS.telemetry(meter_id)
            for payload in _payloads(meter_id, first_n, args.messages, start):
                infos.append(client.publish(topic, payload, qos=1))
        deadline = time.monotonic() + args.time_limit
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise SystemExit("the meters' telemetry was not all acknowledged in time")
    finally:
        for _, client in clients:
            client.disconnect()
            client.loop_stop()


def _sync_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


async def _register(url: str, broker: LocalBroker, count: int) -> None:
    db = await open_database(url)
    try:
        rows = []
        for line, meter_id in enumerate(_meter_ids(count), start=2):
            endpoint = f"mqtt://{broker.host}:{broker.port}/{meter_id}"
            rows.append((line, MeterRecord(meter_id, endpoint, route_of(endpoint))))
        report = await import_meters(db, rows, [], datetime.now(UTC), actor="bench")
        if not report.applied:
            raise SystemExit(f"registering the meters failed: {report.refused[:3]}")
    finally:
        await db.close()


class BareSubscriber:
    """The baseline: paho (its own network thread) and one executemany per ``batch`` rows."""

    def __init__(self, settings: BrokerSettings, url: str, batch: int) -> None:
        self.settings = settings
        self.engine = create_engine(_sync_url(url))
        insert = postgresql.insert if url.startswith("postgresql") else sqlite.insert
        self.statement = insert(Reading).on_conflict_do_nothing()
        self.batch = batch
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self.expected = 0
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="bench-paho-store",
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(settings.username, settings.password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(TOPICS.all_meters(TopicKind.TELEMETRY), options=SubscribeOptions(qos=1))

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        snapshot = decode_telemetry(message.payload).snapshot()
        self.rows.append(reading_row(snapshot, Findings(), datetime.now(UTC), "mqtt"))
        self.count += 1
        if len(self.rows) >= self.batch or self.count >= self.expected:
            with self.engine.begin() as conn:
                conn.execute(self.statement, self.rows)
            self.rows = []
            if self.count >= self.expected:
                self.done.set()

    def connect(self, timeout: float) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.subscribed.clear()
        self.client.connect(
            self.settings.host, self.settings.port, clean_start=False, properties=props
        )
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise SystemExit("the paho subscriber did not subscribe")

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drain(self, expected: int, timeout: float) -> float:
        """Connect, take ``expected`` messages into the table; the seconds it took."""
        self.count, self.expected = 0, expected
        self.done.clear()
        started = time.perf_counter()
        self.connect(timeout)
        try:
            if not self.done.wait(timeout):
                raise SystemExit(f"paho stored {self.count} of {expected} in time")
            return time.perf_counter() - started
        finally:
            self.disconnect()

    def close(self) -> None:
        self.engine.dispose()


class ProjectSubscriber:
    """The head-end's ingest and storage sink."""

    def __init__(self, settings: BrokerSettings, url: str, name: str) -> None:
        self.settings = settings
        self.url = url
        self.name = name  # sessions of another store's run are never reused
        self.session = 0  # a new session a round (see open_session)
        self.redelivered = 0  # messages the broker delivered again, stored once (duplicates)

    def _ingest(self, sink: Any) -> Ingest:
        return Ingest(
            self.settings,
            sink,
            TOPICS,
            client_id=f"bench-ingest-{self.name}-{self.session}",
            kinds=(TopicKind.TELEMETRY,),
            receive_maximum=RECEIVE_MAXIMUM,
        )

    async def open_session(self) -> None:
        """A new persistent session for the next round's backlog, so that a round drains
        exactly what its meters published (the ingest acknowledges the messages it stored
        before it closes, so none is delivered again; any that were would be stored once and
        counted as duplicates)."""
        self.session += 1
        db = await open_database(self.url)
        try:
            async with self._ingest(StorageSink(db, SystemClock())):
                pass  # the persistent session exists; backlogs wait in it
        finally:
            await db.close()

    async def drain(self, expected: int, timeout: float) -> float:
        """Connect, store ``expected`` readings (each acknowledged); the seconds it took."""
        db = await open_database(self.url)
        sink = StorageSink(db, SystemClock())
        try:
            started = time.perf_counter()
            async with self._ingest(sink) as ingest:
                async with asyncio.timeout(timeout):  # stored and acknowledged
                    while sink.stats.readings < expected or ingest.backlog:  # noqa: ASYNC110
                        await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - started
                await sink.stop()
            if ingest.stats.dead_lettered:
                raise SystemExit(f"the ingest dead-lettered {ingest.stats.dead_lettered}")
            self.redelivered += sink.stats.duplicates
            return elapsed
        finally:
            await db.close()


async def compare(
    dialect: str, broker: LocalBroker, args: argparse.Namespace, workdir: Path, first_n: int
) -> tuple[float, int]:
    expected = args.meters * args.messages
    start = int(time.time()) - 60 * (args.rounds + 1) * args.messages
    async with (
        fresh_database(dialect, workdir, "mqtt_bare") as bare_url,
        fresh_database(dialect, workdir, "mqtt_ingest") as project_url,
    ):
        await _register(bare_url, broker, args.meters)
        await _register(project_url, broker, args.meters)
        bare = BareSubscriber(broker.settings(), bare_url, args.batch)
        project = ProjectSubscriber(broker.settings(), project_url, dialect)
        bare_times: list[float] = []
        project_times: list[float] = []
        bare_cpu: list[float] = []
        project_cpu: list[float] = []

        async def run_bare() -> None:
            cpu = time.process_time()
            bare_times.append(await asyncio.to_thread(bare.drain, expected, args.time_limit))
            bare_cpu.append(time.process_time() - cpu)

        async def run_project() -> None:
            cpu = time.process_time()
            project_times.append(await project.drain(expected, args.time_limit))
            project_cpu.append(time.process_time() - cpu)

        try:
            bare.connect(args.time_limit)
            bare.disconnect()
            for round_ in range(args.rounds):
                await project.open_session()
                await asyncio.to_thread(_publish, broker, first_n, args, start)
                first_n += args.messages
                if round_ % 2 == 0:
                    await run_bare()
                    await run_project()
                else:
                    await run_project()
                    await run_bare()
        finally:
            bare.close()
    bare_rate = expected / statistics.median(bare_times)
    project_rate = expected / statistics.median(project_times)
    ratio = project_rate / bare_rate
    print(
        f"{dialect}: {args.meters} meters x {args.messages} telemetry a round, {args.rounds} rounds"
    )
    for name, times, cpu in (
        ("bare paho + Core executemany", bare_times, bare_cpu),
        ("ingest + StorageSink", project_times, project_cpu),
    ):
        print(
            f"  {name:<29} {expected / statistics.median(times):9,.0f} msg/s"
            f"  {statistics.median(cpu) / expected * 1e6:5.0f} us CPU/msg  rounds (s) "
            + ", ".join(f"{t:.2f}" for t in times)
        )
    if project.redelivered:
        print(f"  the broker delivered {project.redelivered} messages again: stored once")
    verdict = "met" if ratio >= 0.8 else "NOT met"
    print(f"  ratio ingest / bare: {ratio:.2f} (target >= 0.80: {verdict})")
    return ratio, first_n


async def measure(args: argparse.Namespace) -> None:
    dialects = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if "postgresql" in dialects and not _postgres_answers():
        if args.db == "postgresql":
            raise SystemExit(f"PostgreSQL at {POSTGRES_ADMIN} does not answer")
        print(f"PostgreSQL at {POSTGRES_ADMIN} does not answer: SQLite only")
        dialects.remove("postgresql")
    with tempfile.TemporaryDirectory(prefix="hes-bench-mqtt-") as tmp:
        broker = LocalBroker(
            Path(tmp) / "broker",
            _meter_ids(args.meters),
            topics=TOPICS,
            persistence=False,
            meter_secret=SECRET,
        )
        (Path(tmp) / "broker").mkdir()
        with broker:
            first_n = 1
            for dialect in dialects:
                _, first_n = await compare(dialect, broker, args, Path(tmp), first_n)
            if "being dropped" in broker.log_text():
                print("warning: the broker dropped messages (see max_queued_messages)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=50, help="publishing meters (1..1000)")
    parser.add_argument("--messages", type=int, default=400, help="telemetry per meter a round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (1..10)")
    parser.add_argument("--batch", type=int, default=1000, help="the baseline's executemany size")
    parser.add_argument(
        "--db", choices=("both", "sqlite", "postgresql"), default="both", help="the stores"
    )
    parser.add_argument("--time-limit", type=float, default=120.0, help="bound of each phase, s")
    args = parser.parse_args()
    if not (1 <= args.meters <= 1000 and 1 <= args.messages <= 10_000 and 1 <= args.rounds <= 10):
        parser.error("--meters is 1..1000, --messages 1..10000, --rounds 1..10")
    if not (1 <= args.batch <= 10_000 and 0 < args.time_limit <= 600):
        parser.error("--batch is 1..10000, --time-limit at most 600 s")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
