"""MQTT ingest throughput beside a bare paho subscriber, and 1,000 meter agents in one process.

Runs on a Mosquitto it starts itself (headend.broker.LocalBroker, loopback, a free port):

1. live: N meter agents (another process) publish telemetry as fast as the broker acknowledges
   it (QoS 1, one in flight per meter); first a bare paho subscriber, then the head-end ingest
   (validation, de-duplication, an async sink, acknowledgement after the sink) receives it.
   The publishers usually set the pace here, so both rates tend to be close.
2. drain: the same messages are published while the subscriber is away (its persistent session
   queues them on the broker); then the subscriber connects and drains the backlog as fast as
   it can: the subscriber's own ceiling, the fair comparison. Target: ingest >= 0.5 x paho.
3. agents: 1,000 meter agents connect in one process, publish telemetry every second for a
   while; connect time, the process's CPU and RSS, and the broker's CPU are reported.

Every phase is bounded in count and time. ``python bench/mqtt_ingest.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from headend.broker import LocalBroker  # noqa: E402
from headend.ingest import Ingest  # noqa: E402
from meter_sim.config import MeterConfig  # noqa: E402
from meter_sim.mqtt_agent import AgentOptions, run_agents  # noqa: E402
from meter_sim.runtime import MeterRuntime  # noqa: E402
from protocols.clock import ManualClock  # noqa: E402
from protocols.mqtt import (  # noqa: E402
    BrokerSettings,
    EventMessage,
    StateMessage,
    Telemetry,
    TopicKind,
    TopicScheme,
)

TOPICS = TopicScheme("bench")
#: the meters' password secret, made by the first process and inherited by its role processes
SECRET = os.environ.setdefault("BENCH_METER_SECRET", secrets.token_hex(32))
RECEIVE_MAXIMUM = 1000


def _meter_ids(count: int) -> list[str]:
    return [f"B{n:05d}" for n in range(1, count + 1)]


def _runtimes(count: int) -> list[MeterRuntime]:
    clock = ManualClock()
    return [MeterRuntime.open(MeterConfig(meter_id), clock) for meter_id in _meter_ids(count)]


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cpu_seconds(pid: int | None = None) -> float:
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- subprocess roles -----------------------------------------------------------------------------


async def _publisher_role(args: argparse.Namespace) -> dict[str, Any]:
    """N agents, telemetry back to back until each has ``messages`` acknowledged."""
    settings = BrokerSettings.parse_url(args.url)
    options = AgentOptions(
        telemetry_interval=0, telemetry_limit=args.messages, buffer_limit=4, meter_secret=SECRET
    )
    runtimes = _runtimes(args.meters)
    expected = args.meters * args.messages
    async with run_agents(runtimes, settings, prefix=TOPICS.prefix, options=options) as group:
        await group.wait_connected(args.time_limit)
        started = time.perf_counter()
        agents = list(group.agents.values())
        async with asyncio.timeout(args.time_limit):
            while sum(a.stats.telemetry_acked for a in agents) < expected:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
    return {"published": expected, "seconds": elapsed, "rate": expected / elapsed}


async def _agents_role(args: argparse.Namespace) -> dict[str, Any]:
    """``agents`` agents in this one process, telemetry every second for ``duration`` s."""
    settings = BrokerSettings.parse_url(args.url)
    runtimes = _runtimes(args.agents)
    rss_runtimes = _rss_mib()
    options = AgentOptions(telemetry_interval=1.0, backoff_initial=0.2, meter_secret=SECRET)
    started = time.perf_counter()
    async with run_agents(runtimes, settings, prefix=TOPICS.prefix, options=options) as group:
        await group.wait_connected(args.time_limit)
        connect_seconds = time.perf_counter() - started
        await asyncio.sleep(1.5)  # settle: the telemetry buffered while connecting goes out
        agents = list(group.agents.values())
        acked_before = sum(a.stats.telemetry_acked for a in agents)
        cpu_before, broker_before = _cpu_seconds(), _cpu_seconds(args.broker_pid)
        steady_started = time.perf_counter()
        await asyncio.sleep(args.duration)
        steady = time.perf_counter() - steady_started
        cpu = _cpu_seconds() - cpu_before
        broker_cpu = _cpu_seconds(args.broker_pid) - broker_before
        acked = sum(a.stats.telemetry_acked for a in agents) - acked_before
        connected = group.connected_count()
        rss = _rss_mib()
    return {
        "agents": args.agents,
        "connected": connected,
        "connect_seconds": connect_seconds,
        "steady_seconds": steady,
        "telemetry_per_second": acked / steady,
        "process_cpu_percent": 100 * cpu / steady,
        "broker_cpu_percent": 100 * broker_cpu / steady,
        "rss_mib": rss,
        "rss_of_runtimes_mib": rss_runtimes,
    }


def _run_role(role: str, broker: LocalBroker, args: argparse.Namespace, **extra: Any) -> Any:
    url = BrokerSettings(broker.host, broker.port).url()
    command = [sys.executable, __file__, "--role", role, "--url", url]
    command += [
        f"--{key.replace('_', '-')}={value}"
        for key, value in {
            "meters": args.meters,
            "messages": args.messages,
            "agents": args.agents,
            "duration": args.duration,
            "time_limit": args.time_limit,
            **extra,
        }.items()
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=args.time_limit * 3, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{role} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- subscribers ----------------------------------------------------------------------------------


class PahoSubscriber:
    """The baseline: a bare paho subscriber (its own network thread), counting messages."""

    def __init__(self, settings: BrokerSettings, client_id: str, expected: int) -> None:
        self.settings = settings
        self.expected = expected
        self.count = 0
        self.first = self.last = 0.0
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(settings.username, settings.password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe(
            TOPICS.all_meters(TopicKind.TELEMETRY),
            options=SubscribeOptions(qos=1),
        )

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic.endswith("/telemetry"):
            self.count += 1
            now = time.perf_counter()
            if self.count == 1:
                self.first = now
            if self.count == self.expected:
                self.last = now
                self.done.set()

    def connect(self, timeout: float) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 600
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        self.client.connect(
            self.settings.host, self.settings.port, clean_start=False, properties=props
        )
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            raise RuntimeError("the paho subscriber did not subscribe")

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class CountingSink:
    """An ingest sink that only counts: the ingest's own cost, no storage."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = self.last = 0.0
        self.done = asyncio.Event()

    async def telemetry(self, message: Telemetry) -> None:
        self.count += 1
        now = time.perf_counter()
        if self.count == 1:
            self.first = now
        if self.count == self.expected:
            self.last = now
            self.done.set()

    async def event(self, message: EventMessage) -> None:
        return None

    async def state(self, message: StateMessage) -> None:
        return None


@dataclass
class Rate:
    messages: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def _paho_run(broker: LocalBroker, args: argparse.Namespace, drain: bool) -> Rate:
    expected = args.meters * args.messages
    subscriber = PahoSubscriber(broker.settings(), f"paho-{'drain' if drain else 'live'}", expected)
    subscriber.connect(args.time_limit)
    if drain:
        subscriber.disconnect()
        _run_role("publish", broker, args)
        subscriber.subscribed.clear()
        subscriber.connect(args.time_limit)
    else:
        _run_role("publish", broker, args)
    try:
        if not subscriber.done.wait(args.time_limit):
            raise RuntimeError(f"paho received {subscriber.count} of {expected}")
    finally:
        subscriber.disconnect()
    return Rate(expected, subscriber.last - subscriber.first)


async def _ingest_run(broker: LocalBroker, args: argparse.Namespace, drain: bool) -> Rate:
    expected = args.meters * args.messages
    sink = CountingSink(expected)
    client_id = f"ingest-{'drain' if drain else 'live'}"

    def ingest() -> Ingest:
        return Ingest(
            broker.settings(),
            sink,
            TOPICS,
            client_id=client_id,
            kinds=(TopicKind.TELEMETRY,),
            receive_maximum=RECEIVE_MAXIMUM,
        )

    if drain:
        async with ingest():
            pass  # the persistent session exists; the backlog will wait in it
        await asyncio.to_thread(_run_role, "publish", broker, args)
        async with ingest():
            await asyncio.wait_for(sink.done.wait(), args.time_limit)
    else:
        async with ingest():
            await asyncio.to_thread(_run_role, "publish", broker, args)
            await asyncio.wait_for(sink.done.wait(), args.time_limit)
    return Rate(expected, sink.last - sink.first)


# -- main -----------------------------------------------------------------------------------------


def _raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        limit = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=50, help="publishing agents")
    parser.add_argument("--messages", type=int, default=400, help="telemetry per publishing agent")
    parser.add_argument("--agents", type=int, default=1000, help="agents in the connect phase")
    parser.add_argument("--duration", type=float, default=10.0, help="agents phase, seconds")
    parser.add_argument("--time-limit", type=float, default=60.0, help="bound of every phase, s")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--role", choices=["main", "publish", "agents"], default="main")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--broker-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (1 <= args.meters <= 2000 and 1 <= args.messages <= 100_000):
        parser.error("--meters is 1..2000 and --messages 1..100000")
    if not (1 <= args.agents <= 5000 and 0 < args.duration <= 120 and 0 < args.time_limit <= 600):
        parser.error("--agents is 1..5000, --duration at most 120 s, --time-limit at most 600 s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _raise_file_limit(2 * max(args.meters, args.agents) + 256)
    if args.role == "publish":
        print(json.dumps(asyncio.run(_publisher_role(args))))
        return 0
    if args.role == "agents":
        print(json.dumps(asyncio.run(_agents_role(args))))
        return 0
    results: dict[str, Any] = {"meters": args.meters, "messages_per_meter": args.messages}
    with tempfile.TemporaryDirectory() as tmp:
        broker = LocalBroker(
            Path(tmp),
            _meter_ids(max(args.meters, args.agents)),
            topics=TOPICS,
            persistence=False,
            meter_secret=SECRET,
        )
        with broker:
            for mode in ("live", "drain"):
                drain = mode == "drain"
                paho_rate = _paho_run(broker, args, drain)
                ingest_rate = asyncio.run(_ingest_run(broker, args, drain))
                results[mode] = {
                    "paho_per_second": round(paho_rate.per_second),
                    "ingest_per_second": round(ingest_rate.per_second),
                    "ratio": round(ingest_rate.per_second / paho_rate.per_second, 2),
                }
            assert broker.process is not None
            results["agents"] = _run_role("agents", broker, args, broker_pid=broker.process.pid)
            results["broker_dropped_messages"] = "being dropped" in broker.log_text()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"MQTT ingest, {args.meters} meters x {args.messages} telemetry, QoS 1, "
        f"receive maximum {RECEIVE_MAXIMUM}"
    )
    print(f"{'':8} {'paho msg/s':>12} {'ingest msg/s':>13} {'ratio':>6}")
    for mode in ("live", "drain"):
        row = results[mode]
        print(
            f"{mode:8} {row['paho_per_second']:>12,} {row['ingest_per_second']:>13,} "
            f"{row['ratio']:>6.2f}"
        )
    agents = results["agents"]
    print(
        f"\n{agents['connected']}/{agents['agents']} agents in one process: connected in "
        f"{agents['connect_seconds']:.2f} s; steady {agents['telemetry_per_second']:.0f} "
        f"telemetry/s at {agents['process_cpu_percent']:.0f} % of one core "
        f"(broker {agents['broker_cpu_percent']:.0f} %), RSS {agents['rss_mib']:.0f} MiB "
        f"({agents['rss_of_runtimes_mib']:.0f} MiB before the agents started)"
    )
    if results["broker_dropped_messages"]:
        print("warning: the broker dropped messages (see max_queued_messages)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
