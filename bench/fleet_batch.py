"""A fleet's simulated day in batch, as ``meter-sim run --for 1d --batch`` runs it.

    .venv/bin/python bench/fleet_batch.py                          # 1,000 / 10,000 / 100,000
    .venv/bin/python bench/fleet_batch.py --meters 1000 --steps 60 900 --max-seconds 120
    .venv/bin/python bench/fleet_batch.py --integrations events --meters 100000
    .venv/bin/python bench/fleet_batch.py --tick 3600              # an hour at a time

Each case (N meters, an integration step of S simulated seconds, an integration) runs in a
child process: a fleet of N residential meters (the defaults of ``meter-sim init``) with its
state in a temporary directory is opened, advanced through one simulated day ``--tick``
simulated seconds at a time under a manual clock (a day by default, as
``meter_sim.simulate.run_batch`` does), and saved. Reported: seconds
to open, to simulate (wall clock and the process's CPU), to save, meter-steps per second (the
fixed steps of S seconds the day is made of, whichever way they are integrated) and RSS per
meter.

The two integrations are run side by side: ``fixed`` (the firmware's steps one at a time,
``meter-sim run --batch --integration fixed``) and ``events`` (whole runs of steps between the
instants where something can change, the default; same results). A case whose estimate (from
the cases before it) exceeds ``--max-seconds`` simulates only the first hours of the day and
scales the time to a day (marked "extrapolated"); a case whose estimated RSS exceeds
``--max-rss-mib`` is skipped. After the cases, the CPU seconds of ``events`` over ``fixed`` at
the same size and step are printed as a ratio.

Figures from a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400


def run_case(meters: int, step: int, hours: int, integration: str, tick: int) -> dict[str, Any]:
    from meter_sim.config import fleet_from_mapping
    from meter_sim.firmware import INTEGRATIONS
    from meter_sim.fleet import Fleet
    from protocols.clock import ManualClock

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = fleet_from_mapping(
        {
            "simulation": {"start": START, "step_seconds": step},
            "defaults": {"initial_credit": 1_000_000},
            "meters": [{"count": meters}],
        }
    )
    with tempfile.TemporaryDirectory(prefix="fleet-batch-") as work:
        clock = ManualClock(START)
        way = next(way for way in INTEGRATIONS if way == integration)
        started = time.perf_counter()
        fleet = Fleet.from_config(config, clock, Path(work), way)
        opened = time.perf_counter()
        cpu = time.process_time()
        end = START + hours * 3600
        while clock.now() < end:
            clock.set(min(clock.now() + tick, end))
            fleet.sync_all()
        simulated = time.perf_counter()
        cpu = time.process_time() - cpu
        fleet.save_all()
        saved = time.perf_counter()
    steps = meters * hours * 3600 // step
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {
        "meters": meters,
        "step": step,
        "integration": integration,
        "tick": tick,
        "hours": hours,
        "open_s": opened - started,
        "simulate_s": simulated - opened,
        "simulate_cpu_s": cpu,
        "save_s": saved - simulated,
        "steps": steps,
        "rss_kib_per_meter": rss / 1024 / meters,
    }


def _child(
    meters: int, step: int, hours: int, integration: str, *, tick: int, timeout: float
) -> dict[str, Any]:
    case = [str(meters), str(step), str(hours), integration, str(tick)]
    done = subprocess.run(
        [sys.executable, __file__, "--case", *case],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"case {meters} x {step} s {integration} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--meters", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--steps", type=int, nargs="+", default=[60, 900])
    parser.add_argument(
        "--integrations", nargs="+", default=["fixed", "events"], choices=["fixed", "events"]
    )
    parser.add_argument(
        "--tick", type=int, default=86400, help="simulated seconds advanced at a time"
    )
    parser.add_argument("--max-seconds", type=float, default=120.0, help="bound of one case")
    parser.add_argument("--max-rss-mib", type=float, default=3000.0, help="bound of one case")
    parser.add_argument("--case", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        meters, step, hours, integration, tick = args.case
        print(json.dumps(run_case(int(meters), int(step), int(hours), integration, int(tick))))
        return
    if not all(1 <= n <= 200_000 for n in args.meters) or not all(
        1 <= s <= 3600 for s in args.steps
    ):
        parser.error("--meters are 1..200000, --steps 1..3600")
    if not 1 <= args.tick <= DAY:
        parser.error("--tick is 1..86400")
    print(
        f"one simulated day per case, advanced {args.tick:,} s at a time "
        "(busy machine: compare ratios)"
    )
    print(
        "meters    step  integration  open s  simulate s (1 day)  CPU s (1 day)  save s  "
        "meter-steps/s  KiB/meter  note"
    )
    cpu_day: dict[tuple[int, int, str], float] = {}
    for step in args.steps:
        for integration in args.integrations:
            rate: float | None = None  # meter-steps per CPU second seen so far at this step
            kib: float | None = None
            for meters in sorted(args.meters):
                if kib is not None and kib * meters / 1024 > args.max_rss_mib:
                    print(
                        f"{meters:>7,}  {step:>4}  {integration:<11}  skipped: about "
                        f"{kib * meters / 1024:,.0f} MiB of RSS, past --max-rss-mib "
                        f"{args.max_rss_mib:,.0f}"
                    )
                    continue
                hours = 24
                if rate is not None:
                    estimate = meters * DAY / step / rate
                    if estimate > args.max_seconds:
                        hours = max(1, int(24 * args.max_seconds / estimate))
                timeout = args.max_seconds * 5 + 600
                result = _child(meters, step, hours, integration, tick=args.tick, timeout=timeout)
                rate = result["steps"] / max(result["simulate_cpu_s"], 1e-9)
                kib = result["rss_kib_per_meter"]
                day = result["simulate_s"] * 24 / hours
                cpu = result["simulate_cpu_s"] * 24 / hours
                cpu_day[meters, step, integration] = cpu
                wall_rate = result["steps"] / result["simulate_s"]
                note = "" if hours == 24 else f"extrapolated from {hours} h"
                print(
                    f"{meters:>7,}  {step:>4}  {integration:<11}  {result['open_s']:6.1f}  "
                    f"{day:18.1f}  {cpu:13.1f}  {result['save_s']:6.1f}  {wall_rate:13,.0f}  "
                    f"{kib:9.1f}  {note}",
                    flush=True,
                )
    for (meters, step, integration), cpu in sorted(cpu_day.items()):
        fixed = cpu_day.get((meters, step, "fixed"))
        if integration == "events" and fixed:
            print(f"{meters:>7,} x {step} s: events / fixed CPU = {cpu / fixed:.3f}")


if __name__ == "__main__":
    main()
