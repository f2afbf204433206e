"""One simulated meter against a static pymodbus SimDevice holding the same registers.

    .venv/bin/python bench/serve_vs_static.py
    .venv/bin/python bench/serve_vs_static.py --seconds 5 --repeat 3
    .venv/bin/python bench/serve_vs_static.py --speed 3600   # nearly every read advances it

Two servers, each in its own child process on loopback, answer the same function-04 read of
the snapshot block (``SNAPSHOT_SIZE`` input registers from ``SNAPSHOT_START``): the
simulator's Modbus TCP server (``serve_tcp`` over a live meter whose clock runs ``--speed``
times real time: a read advances the meter when its clock shows another second, and the
blocks are encoded again when its snapshot fields changed) and a pymodbus ``ModbusTcpServer``
over a ``SimDevice`` whose registers are that meter's snapshot, encoded once. A minimal
asyncio master (raw MBAP frames, so the client costs little) reads as fast as it can over 1 and
over 50 connections for ``--seconds``; the servers run alternately, ``--repeat`` times each.
Reported: reads/s, the server's CPU per read (from /proc), and the ratios simulator / static.

Bounded: at most 200 connections and 60 s a run; loopback only. Figures from a shared machine
are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
START = 1_767_225_600.0


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _until_stdin_closes() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()


def _meter(speed: float) -> object:
    from meter_sim.config import MeterConfig
    from meter_sim.runtime import MeterRuntime
    from protocols.clock import AcceleratedClock

    config = MeterConfig("BENCH-1", initial_credit=1_000_000)
    return MeterRuntime.open(config, AcceleratedClock(speed, START))


async def serve_simulator(speed: float) -> None:
    from meter_sim.modbus_server import serve_tcp
    from meter_sim.runtime import MeterRuntime

    runtime = _meter(speed)
    assert isinstance(runtime, MeterRuntime)
    async with serve_tcp([runtime], HOST, 0) as service:
        sys.stdout.write(json.dumps({"port": service.port}) + "\n")
        sys.stdout.flush()
        await _until_stdin_closes()


async def serve_static(speed: float) -> None:
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    from meter_sim.runtime import MeterRuntime
    from protocols import registermap as rm

    runtime = _meter(speed)
    assert isinstance(runtime, MeterRuntime)
    registers = rm.encode_snapshot(runtime.snapshot())
    device = SimDevice(
        1, simdata=[SimData(rm.SNAPSHOT_START, values=registers, datatype=DataType.REGISTERS)]
    )
    server = ModbusTcpServer([device], address=(HOST, 0))
    await server.serve_forever(background=True)
    try:
        port = server.transport.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        sys.stdout.write(json.dumps({"port": port}) + "\n")
        sys.stdout.flush()
        await _until_stdin_closes()
    finally:
        await server.shutdown()


def _request(transaction: int) -> bytes:
    from protocols import registermap as rm

    pdu = bytes([4]) + rm.SNAPSHOT_START.to_bytes(2, "big") + rm.SNAPSHOT_SIZE.to_bytes(2, "big")
    header = (transaction & 0xFFFF).to_bytes(2, "big") + b"\0\0" + (len(pdu) + 1).to_bytes(2, "big")
    return header + b"\x01" + pdu


async def _reader(port: int, deadline: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    transaction = 0
    try:
        while time.perf_counter() < deadline:
            transaction += 1
            writer.write(_request(transaction))
            header = await reader.readexactly(6)
            body = await reader.readexactly(int.from_bytes(header[4:6], "big"))
            if body[1] != 4:
                raise SystemExit(f"the server answered with an exception: {body.hex()}")
            counts[0] += 1
    finally:
        writer.close()
        await writer.wait_closed()


async def run(kind: str, connections: int, seconds: float, speed: float) -> tuple[float, float]:
    """(reads per second, server CPU microseconds per read) of one server kind."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--serve",
        kind,
        "--speed",
        str(speed),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    assert child.stdin is not None
    try:
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        if not line:
            raise SystemExit(f"the {kind} server exited with {await child.wait()}")
        port = json.loads(line)["port"]
        await asyncio.gather(*(_reader(port, time.perf_counter() + 0.5, [0]) for _ in range(2)))
        counts = [0]
        cpu = _cpu(child.pid)
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(_reader(port, deadline, counts) for _ in range(connections)))
        wall = time.perf_counter() - started
        used = _cpu(child.pid) - cpu
        return counts[0] / wall, used / counts[0] * 1e6
    finally:
        child.stdin.close()
        await asyncio.wait_for(child.wait(), 30)


async def measure(args: argparse.Namespace) -> None:
    from protocols import registermap as rm

    print(
        f"function 04, {rm.SNAPSHOT_SIZE} input registers; meter clock x{args.speed:g}; "
        f"{args.seconds:g} s a run, "
        f"{args.repeat} runs each, servers alternating (busy machine: compare ratios)"
    )
    print("connections  server     reads/s (median)  server CPU us/read  runs (reads/s)")
    for connections in args.connections:
        results: dict[str, list[tuple[float, float]]] = {"static": [], "simulator": []}
        for _ in range(args.repeat):
            for kind in ("static", "simulator"):
                results[kind].append(await run(kind, connections, args.seconds, args.speed))
        medians = {}
        for kind, runs in results.items():
            rate = statistics.median(r for r, _ in runs)
            cpu = statistics.median(c for _, c in runs)
            medians[kind] = (rate, cpu)
            text = ", ".join(f"{r:.0f}" for r, _ in runs)
            print(f"{connections:>11}  {kind:<9}  {rate:16.0f}  {cpu:18.1f}  {text}")
        ratio = medians["simulator"][0] / medians["static"][0]
        cpu_ratio = medians["simulator"][1] / medians["static"][1]
        verdict = "met" if ratio >= 0.9 else "NOT met"
        print(
            f"{connections:>11}  ratio simulator / static: reads/s {ratio:.2f} "
            f"(target >= 0.90: {verdict}), server CPU per read {cpu_ratio:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 50])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each server (1..9)")
    parser.add_argument(
        "--speed", type=float, default=60.0, help="the meter's clock speed (1..1e7 x real time)"
    )
    parser.add_argument("--serve", choices=["simulator", "static"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 1 <= args.speed <= 1e7:
        parser.error("--speed is 1..1e7")
    if args.serve == "simulator":
        asyncio.run(serve_simulator(args.speed))
        return
    if args.serve == "static":
        asyncio.run(serve_static(args.speed))
        return
    if not all(1 <= c <= 200 for c in args.connections) or not 0 < args.seconds <= 60:
        parser.error("--connections are 1..200, --seconds 0..60")
    if not 1 <= args.repeat <= 9:
        parser.error("--repeat is 1..9")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
