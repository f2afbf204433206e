"""`meter-sim serve` at fleet scale: N meters behind Modbus TCP gateways.

    .venv/bin/python bench/fleet_serve.py                       # 1,000 and 10,000 meters
    .venv/bin/python bench/fleet_serve.py --meters 1000 --stall-seconds 10
    .venv/bin/python bench/fleet_serve.py --meters 10000 --speed 3600     # keeps up?

For each N the real command runs as a child process (``meter-sim serve --modbus-port 0
--ready-json`` on a fresh fleet file of N meters, state in a temporary directory), and this
process measures:

* ready: seconds from the spawn to the ready line; RSS of the child, in total and per meter;
  the child's CPU while idle (share of one core over ``--idle-seconds``);
* a full poll, two ways, each by the head-end and by a bare pymodbus client issuing the same
  reads (the identification block, then the snapshot block), alternately ``--repeat`` times;
  medians and their ratio:
  - a connection per meter: for every meter connect, identify, read the snapshot, close
    (the head-end's ``ModbusTcpLink`` with a connection of its own), ``--concurrency`` meters
    at a time;
  - a connection per gateway, as the head-end's poller reads a fleet behind gateways (its
    ``LinkPool`` shares one connection per gateway: ``open_link`` identifies each meter, then
    its snapshot is read), one request at a time per gateway, every gateway at once;
* the longest stall: one reader polls one meter in a loop on one connection for
  ``--stall-seconds`` while the fleet saves every ``--save-seconds``; the longest gap between
  two answers (and the 99th percentile);
* the clock: one reader reads one meter's snapshot in a loop for ``--lag-seconds`` and compares
  the meter's clock with the simulated time the ready line gave plus ``--speed`` times the real
  seconds since, at the request's sending (the meter must never be behind it; the line reaches
  us a little after it was written, which only makes the check stricter) and at the answer's
  arrival (the reader's latency times the speed); and the fleet's ticks that overran their
  interval (the meters advanced less often than every tick), with the longest, from the
  child's log;
* shutdown: seconds from SIGTERM to the exit (the last save included).

Bounded: N <= 20,000, loopback only, every phase has a time-out. Figures from a shared
machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from headend.links.endpoint import LinkOptions, open_link
from headend.links.modbus import LinkSettings, ModbusTcpLink
from headend.links.pool import LinkPool
from protocols import registermap as rm

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
IDENT = rm.BLOCKS[rm.Block.IDENTIFICATION]
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")

Target = tuple[str, int, int]  # meter id, port, unit


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def _bounded(
    targets: list[Target], concurrency: int, one: Callable[[Target], Awaitable[None]]
) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def guarded(target: Target) -> None:
        async with gate:
            await one(target)

    started = time.perf_counter()
    await asyncio.gather(*(guarded(target) for target in targets))
    return time.perf_counter() - started


async def link_poll(targets: list[Target], concurrency: int) -> float:
    settings = LinkSettings(timeout=10, retries=1)

    async def one(target: Target) -> None:
        meter_id, port, unit = target
        link = ModbusTcpLink(HOST, port, unit, settings=settings)
        try:
            await link.connect()  # identifies the meter
            snapshot = await link.read_snapshot()
        finally:
            await link.close()
        if snapshot.meter_id != meter_id:
            raise SystemExit(f"{HOST}:{port}/{unit} is {snapshot.meter_id}, not {meter_id}")

    return await _bounded(targets, concurrency, one)


async def _bare_reads(client: AsyncModbusTcpClient, unit: int) -> None:
    """The two reads of a full poll, bare: the identification block, then the snapshot."""
    for start, count in (
        (IDENT.start, IDENT.end - IDENT.start),
        (rm.SNAPSHOT_START, rm.SNAPSHOT_SIZE),
    ):
        response = await client.read_input_registers(start, count=count, device_id=unit)
        if response.isError():
            raise SystemExit(f"bare read failed: {response}")


async def bare_poll(targets: list[Target], concurrency: int) -> float:
    async def one(target: Target) -> None:
        _, port, unit = target
        client = AsyncModbusTcpClient(HOST, port=port, timeout=10, retries=0)
        try:
            if not await client.connect():
                raise SystemExit(f"cannot connect to {HOST}:{port}")
            await _bare_reads(client, unit)
        finally:
            client.close()

    return await _bounded(targets, concurrency, one)


def _by_gateway(targets: list[Target]) -> list[list[Target]]:
    gateways: dict[int, list[Target]] = {}
    for target in targets:
        gateways.setdefault(target[1], []).append(target)
    return list(gateways.values())


async def gateway_link_poll(targets: list[Target]) -> float:
    """The head-end's own way behind gateways: its link pool holds one connection per gateway
    (``open_link`` over a ``LinkPool``, as the poller's ``EndpointLinks`` does), each meter's
    link identifies the meter and reads its snapshot, one request at a time per gateway, the
    gateways at once; the connections are opened at the start and closed at the end."""
    options = LinkOptions(timeout=10, retries=1)

    async def gateway(meters: list[Target]) -> None:
        for meter_id, port, unit in meters:
            link = await open_link(f"tcp://{HOST}:{port}/{unit}", options, pool=pool)
            snapshot = await link.read_snapshot()
            await link.close()
            if snapshot.meter_id != meter_id:
                raise SystemExit(f"{HOST}:{port}/{unit} is {snapshot.meter_id}, not {meter_id}")

    pool = LinkPool()
    started = time.perf_counter()
    try:
        await asyncio.gather(*(gateway(meters) for meters in _by_gateway(targets)))
    finally:
        await pool.close()
    return time.perf_counter() - started


async def gateway_bare_poll(targets: list[Target]) -> float:
    """The bare loop behind gateways: one pymodbus client per gateway issuing the same two
    reads per unit id (identification block, snapshot block), the gateways at once."""

    async def gateway(meters: list[Target]) -> None:
        client = AsyncModbusTcpClient(HOST, port=meters[0][1], timeout=10, retries=0)
        try:
            if not await client.connect():
                raise SystemExit(f"cannot connect to {HOST}:{meters[0][1]}")
            for _, _, unit in meters:
                await _bare_reads(client, unit)
        finally:
            client.close()

    started = time.perf_counter()
    await asyncio.gather(*(gateway(meters) for meters in _by_gateway(targets)))
    return time.perf_counter() - started


async def stall(target: Target, seconds: float) -> tuple[float, float, int]:
    """(longest gap, 99th percentile gap, reads) of one reader polling one meter."""
    _, port, unit = target
    client = AsyncModbusTcpClient(HOST, port=port, timeout=10, retries=0)
    if not await client.connect():
        raise SystemExit(f"cannot connect to {HOST}:{port}")
    gaps: list[float] = []
    try:
        last = started = time.perf_counter()
        while last - started < seconds:
            response = await client.read_input_registers(
                rm.SNAPSHOT_START, count=rm.SNAPSHOT_SIZE, device_id=unit
            )
            if response.isError():
                raise SystemExit(f"read failed: {response}")
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
    finally:
        client.close()
    gaps.sort()
    return gaps[-1], gaps[int(len(gaps) * 0.99)], len(gaps)


async def clock_lag(
    target: Target, seconds: float, ready_time: float, line_at: float, speed: float
) -> tuple[float, float, int]:
    """One reader reading one meter's clock for ``seconds``, each read against the simulated
    time the ready line gave plus ``speed`` x the real seconds since: (the least the clock
    shown was ahead of that time at the request's sending, the most it was behind it at the
    answer's arrival, reads), in simulated seconds. The first is >= 0 when the meter is never
    behind; the second is what a master sees of its own latency, times the speed."""
    meter_id, port, unit = target
    client = AsyncModbusTcpClient(HOST, port=port, timeout=10, retries=0)
    if not await client.connect():
        raise SystemExit(f"cannot connect to {HOST}:{port}")
    ahead: list[float] = []
    behind: list[float] = []
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sent = time.perf_counter()
            response = await client.read_input_registers(
                rm.SNAPSHOT_START, count=rm.SNAPSHOT_SIZE, device_id=unit
            )
            arrived = time.perf_counter()
            if response.isError():
                raise SystemExit(f"read failed: {response}")
            shown = rm.decode_snapshot(response.registers, meter_id).time
            ahead.append(shown + 1 - (ready_time + speed * (sent - line_at)))  # whole seconds
            behind.append(ready_time + speed * (arrived - line_at) - shown)
    finally:
        client.close()
    return min(ahead), max(behind), len(ahead)


def _overruns(log: Path, since: int) -> list[float]:
    """The durations of the fleet ticks that overran, logged after byte ``since`` of ``log``."""
    with log.open("rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    return [float(m) for m in re.findall(r"a fleet tick took ([0-9.]+) s", text)]


async def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fleet-serve-") as work:
        fleet = Path(work) / "fleet.toml"
        fleet.write_text(
            f'[simulation]\nstate_dir = "{work}/state"\nsave_seconds = {args.save_seconds}\n'
            f"speed = {args.speed}\n\n[defaults]\ninitial_credit = 1000000\n\n"
            f"[[meters]]\ncount = {count}\n"
        )
        log = Path(work) / "serve.log"
        log_file = log.open("wb")
        spawned = time.perf_counter()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cli.meter_sim",
            "serve",
            "--config",
            str(fleet),
            "--modbus-port",
            "0",
            "--ready-json",
            "--integration",
            args.integration,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            limit=2**24,  # the ready line names every meter
        )
        assert child.stdout is not None
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 300)
            if not line:
                raise SystemExit(f"meter-sim serve exited with {await child.wait()}")
            line_at = time.perf_counter()
            ready = line_at - spawned
            shape = json.loads(line)
            targets: list[Target] = [
                (meter_id, gateway["port"], unit)
                for gateway in shape["gateways"]
                for meter_id, unit in gateway["meters"].items()
            ]
            rss = _rss(child.pid)
            cpu = _cpu(child.pid)
            await asyncio.sleep(args.idle_seconds)  # measuring idle CPU: nothing to wait for
            idle = (_cpu(child.pid) - cpu) / args.idle_seconds
            results: dict[str, Any] = {
                "meters": count,
                "gateways": len(shape["gateways"]),
                "ready_s": ready,
                "rss_mib": rss / 2**20,
                "rss_kib_per_meter": rss / 1024 / count,
                "idle_core": idle,
            }
            runs: dict[str, list[float]] = {"link": [], "bare": [], "gw_link": [], "gw_bare": []}
            for _ in range(0 if args.no_poll else args.repeat):
                runs["link"].append(await link_poll(targets, args.concurrency))
                runs["bare"].append(await bare_poll(targets, args.concurrency))
                runs["gw_link"].append(await gateway_link_poll(targets))
                runs["gw_bare"].append(await gateway_bare_poll(targets))
            for name, times in runs.items():
                results[f"poll_{name}_s"] = statistics.median(times) if times else None
            results["poll_runs"] = runs
            longest, p99, reads = await stall(targets[len(targets) // 2], args.stall_seconds)
            results.update(stall_max_s=longest, stall_p99_s=p99, stall_reads=reads)
            logged = log.stat().st_size
            simulation = shape["simulation"]
            ahead, behind, reads = await clock_lag(
                targets[-1], args.lag_seconds, simulation["time"], line_at, simulation["speed"]
            )
            overran = _overruns(log, logged)
            results.update(
                speed=simulation["speed"],
                integration=simulation["integration"],
                clock_ahead_at_send_s=ahead,
                clock_behind_at_arrival_s=behind,
                lag_reads=reads,
                ticks_overran=len(overran),
                longest_tick_s=max(overran, default=0.0),
                rss_kib_per_meter_later=_rss(child.pid) / 1024 / count,
            )
            stopping = time.perf_counter()
            child.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(child.wait(), 120)
            results["shutdown_s"] = time.perf_counter() - stopping
            results["exit"] = code
            return results
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
            log_file.close()


def _report_poll(n: int, results: dict[str, Any], args: argparse.Namespace) -> None:
    runs = results["poll_runs"]
    for title, link, bare in (
        (
            f"a connection per meter (connect, identify, snapshot, close; {args.concurrency} "
            "meters at a time)",
            "link",
            "bare",
        ),
        (
            "a connection per gateway, as the head-end's link pool holds them (identify, "
            "snapshot; one request at a time per gateway, the gateways at once)",
            "gw_link",
            "gw_bare",
        ),
    ):
        print(f"full poll over {title}, median of {args.repeat}:")
        for name, key in (("head-end link", link), ("bare pymodbus", bare)):
            seconds = results[f"poll_{key}_s"]
            print(
                f"  {name:<17} {seconds:6.2f} s  ({n / seconds:,.0f} meters/s)  runs "
                + ", ".join(f"{r:.2f}" for r in runs[key])
            )
        ratio = results[f"poll_{link}_s"] / results[f"poll_{bare}_s"]
        print(f"  ratio link / bare time: {ratio:.2f}")


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    n = results["meters"]
    print(f"== {n:,} meters behind {results['gateways']} gateway(s)")
    print(
        f"ready after {results['ready_s']:.2f} s; RSS {results['rss_mib']:.0f} MiB "
        f"({results['rss_kib_per_meter']:.1f} KiB per meter); idle CPU "
        f"{100 * results['idle_core']:.0f} % of a core"
    )
    if results["poll_link_s"] is None:
        print("full poll: not measured (--no-poll)")
    else:
        _report_poll(n, results, args)
    print(
        f"one reader polling one meter for {args.stall_seconds:.0f} s, saves every "
        f"{args.save_seconds:g} s: longest gap {1000 * results['stall_max_s']:.0f} ms, "
        f"p99 {1000 * results['stall_p99_s']:.1f} ms over {results['stall_reads']:,} reads"
    )
    print(
        f"clock at speed {results['speed']:g} ({results['integration']} integration), one "
        f"reader for {args.lag_seconds:g} s over {results['lag_reads']:,} reads: the meter's "
        f"clock at least {results['clock_ahead_at_send_s']:.1f} simulated s ahead of the ready "
        f"line's time + speed x real time at each request's sending, at most "
        f"{results['clock_behind_at_arrival_s']:.1f} s behind it at the answer's arrival"
    )
    print(
        f"  {results['ticks_overran']} fleet tick(s) overran their interval in that window "
        f"(longest {results['longest_tick_s']:.2f} s); RSS then "
        f"{results['rss_kib_per_meter_later']:.1f} KiB per meter"
    )
    print(f"shutdown after SIGTERM: {results['shutdown_s']:.2f} s, exit {results['exit']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--concurrency", type=int, default=100, help="meters polled at once")
    parser.add_argument("--repeat", type=int, default=3, help="full polls by each master (1..9)")
    parser.add_argument("--save-seconds", type=float, default=5.0)
    parser.add_argument("--stall-seconds", type=float, default=15.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--lag-seconds", type=float, default=15.0)
    parser.add_argument("--speed", type=float, default=60.0, help="simulated s per real s")
    parser.add_argument("--integration", choices=["events", "fixed"], default="events")
    parser.add_argument("--no-poll", action="store_true", help="leave the full polls out")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    if not all(1 <= n <= 20_000 for n in args.meters) or not 1 <= args.repeat <= 9:
        parser.error("--meters are 1..20000, --repeat 1..9")
    if not 1 <= args.concurrency <= 1000 or not 0 < args.stall_seconds <= 300:
        parser.error("--concurrency is 1..1000, --stall-seconds 0..300")
    if not 0 < args.lag_seconds <= 300 or not 0 < args.speed <= 1e6:
        parser.error("--lag-seconds is 0..300, --speed 0..1e6")
    for count in args.meters:
        results = asyncio.run(measure(count, args))
        report(results, args)
        if args.json:
            print(json.dumps(results))


if __name__ == "__main__":
    main()
