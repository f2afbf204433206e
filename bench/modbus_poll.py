"""Poll the standard snapshot of N simulated meters over Modbus TCP: the head-end's link against
a bare pymodbus client loop issuing the same reads.

    .venv/bin/python bench/modbus_poll.py                 # 100 meters
    .venv/bin/python bench/modbus_poll.py --meters 1000 --rounds 5

The meters are served by the simulator in a *subprocess* (one listener per meter on loopback,
``serve_tcp_per_meter``), so that the server's CPU does not compete with the masters' and both
masters poll the very same server: one connection per meter, every meter read concurrently in
each round, the same function-04 read of the snapshot block (``SNAPSHOT_SIZE`` input
registers). The bare loop only receives the registers; the link also decodes them into a
``MeterSnapshot``, checks its unit id and handles time-outs and retries. The two are run
alternately, ``--repeat`` times each; the medians are reported with their ratio.

Bounded: ``--meters`` <= 2000, ``--rounds`` <= 1000, each phase stops early after
``--max-seconds``; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from headend.links.modbus import LinkSettings, ModbusTcpLink
from protocols import registermap as rm

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


async def serve(count: int) -> None:
    """The simulator's side: ``count`` meters, one port each, until stdin closes."""
    from meter_sim.config import default_fleet
    from meter_sim.modbus_server import serve_tcp_per_meter
    from meter_sim.runtime import MeterRuntime
    from protocols.clock import AcceleratedClock

    fleet = default_fleet(count, initial_credit=1_000_000)
    clock = AcceleratedClock(fleet.simulation.speed)
    runtimes = [MeterRuntime.open(meter, clock) for meter in fleet.meters]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with serve_tcp_per_meter(runtimes, HOST) as services:
        targets = [
            [service.port, runtime.config.modbus_unit]
            for service, runtime in zip(services, runtimes, strict=True)
        ]
        sys.stdout.write(json.dumps({"targets": targets}) + "\n")
        sys.stdout.flush()
        await stdin.read()


Rate = tuple[float, float]  # (reads per second, client CPU microseconds per read)


async def _rounds(
    poll: Callable[[int], Awaitable[Any]], count: int, rounds: int, max_seconds: float
) -> Rate:
    """Run ``rounds`` rounds of ``poll(i)`` for every meter concurrently, after one untimed
    warm-up round."""
    await asyncio.gather(*(poll(index) for index in range(count)))
    started = time.perf_counter()
    cpu = time.process_time()
    reads = 0
    for _ in range(rounds):
        await asyncio.gather(*(poll(index) for index in range(count)))
        reads += count
        if time.perf_counter() - started > max_seconds:
            break
    seconds = time.perf_counter() - started
    return reads / seconds, (time.process_time() - cpu) / reads * 1e6


async def bare_phase(targets: list[list[int]], rounds: int, max_seconds: float) -> Rate:
    clients = [AsyncModbusTcpClient(HOST, port=port, timeout=10, retries=0) for port, _ in targets]
    try:
        connected = await asyncio.gather(*(client.connect() for client in clients))
        if not all(connected):
            raise SystemExit("the bare clients could not connect")

        async def poll(index: int) -> list[int]:
            response = await clients[index].read_input_registers(
                rm.SNAPSHOT_START, count=rm.SNAPSHOT_SIZE, device_id=targets[index][1]
            )
            if response.isError():
                raise SystemExit(f"bare read failed: {response}")
            return list(response.registers)

        return await _rounds(poll, len(targets), rounds, max_seconds)
    finally:
        for client in clients:
            client.close()


async def link_phase(targets: list[list[int]], rounds: int, max_seconds: float) -> Rate:
    settings = LinkSettings(timeout=10, retries=1)
    links = [ModbusTcpLink(HOST, port, unit, settings=settings) for port, unit in targets]
    try:
        await asyncio.gather(*(link.connect() for link in links))  # identify before timing

        async def poll(index: int) -> Any:
            return await links[index].read_snapshot()

        return await _rounds(poll, len(targets), rounds, max_seconds)
    finally:
        await asyncio.gather(*(link.close() for link in links))


async def full_poll(targets: list[list[int]]) -> tuple[int, float]:
    """Every meter's snapshot once through the link, as a poller would: (meters read, seconds)."""
    settings = LinkSettings(timeout=10, retries=2)
    links = [ModbusTcpLink(HOST, port, unit, settings=settings) for port, unit in targets]
    started = time.perf_counter()
    try:
        snapshots = await asyncio.gather(*(link.read_snapshot() for link in links))
    finally:
        await asyncio.gather(*(link.close() for link in links))
    ids = {snapshot.meter_id for snapshot in snapshots}
    return len(ids), time.perf_counter() - started


async def measure(args: argparse.Namespace) -> None:
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        str(args.meters),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert server.stdout is not None
    assert server.stdin is not None
    try:
        line = await asyncio.wait_for(server.stdout.readline(), 300)
        if not line:
            raise SystemExit(f"the simulator exited with {await server.wait()}")
        targets: list[list[int]] = json.loads(line)["targets"]
        print(f"{len(targets)} meters served by a simulator subprocess, one port each")
        meters, seconds = await full_poll(targets)
        print(f"full poll through the link: {meters} distinct meters in {seconds:.2f} s")
        bare: list[Rate] = []
        link: list[Rate] = []
        for _ in range(args.repeat):
            bare.append(await bare_phase(targets, args.rounds, args.max_seconds))
            link.append(await link_phase(targets, args.rounds, args.max_seconds))
        print(
            f"reads of {rm.SNAPSHOT_SIZE} input registers, "
            f"{args.rounds} rounds x {len(targets)} meters, {args.repeat} runs each"
        )
        print("                     reads/s (median)  client CPU us/read  runs (reads/s)")
        for name, runs in (("bare pymodbus loop", bare), ("head-end link", link)):
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            text = ", ".join(f"{r:.0f}" for r, _ in runs)
            print(f"{name:<20} {rate:16.0f}  {cpu:18.0f}  {text}")
        ratio = statistics.median(r for r, _ in link) / statistics.median(r for r, _ in bare)
        verdict = "met" if ratio >= 0.8 else "NOT met"
        print(f"ratio link / bare: {ratio:.2f} (target >= 0.80: {verdict})")
    finally:
        server.stdin.close()
        try:
            await asyncio.wait_for(server.wait(), 60)
        except TimeoutError:
            server.kill()
            await server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, default=100, help="meters to serve (1..2000)")
    parser.add_argument(
        "--rounds", type=int, default=50, help="polls of every meter per run (1..1000)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each master (1..9)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time bound of one run")
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if not (1 <= args.meters <= 2000 and 1 <= args.rounds <= 1000 and 1 <= args.repeat <= 9):
        parser.error("--meters is 1..2000, --rounds 1..1000, --repeat 1..9")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
