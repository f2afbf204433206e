"""The event-driven integration gives exactly what the fixed-step one gives.

Two copies of one meter are driven through the same random life, one advanced with
``integration="fixed"`` and one with ``integration="events"``; after every operation their whole
saved state (Wh per rate, residues, credit, debt, emergency credit, every event with its code and
time, every profile row), their snapshot and their status are equal. The lives mix whole-second
and fractional times, clock changes, top-ups, relay commands, a limiter, friendly periods, time
zones, tariffs, step lengths and load models, so that both the whole runs and the fallback to
single steps are taken.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_sim.config import LoadConfig, MeterConfig, TariffConfig, fleet_from_mapping
from meter_sim.firmware import Integration, Meter
from meter_sim.fleet import Fleet
from meter_sim.loads import CsvLoad, ResidentialLoad, load_for
from meter_sim.simulate import run_batch
from protocols.clock import ManualClock
from protocols.commands import Command, CommandCode, CommandEnvelope

JAN1 = 1_767_225_600  # 2026-01-01T00:00:00Z, a Thursday
HOUR = 3600
CSV_DIR = Path(tempfile.mkdtemp(prefix="integration-paths-"))  # this process's own
atexit.register(shutil.rmtree, CSV_DIR, ignore_errors=True)

loads = st.one_of(
    st.builds(
        lambda mean, seed: LoadConfig(model="residential", mean_watts=mean, seed=seed),
        st.integers(0, 5000),
        st.integers(0, 2**32 - 1),
    ),
    st.builds(lambda w: LoadConfig(model="constant", watts=w), st.integers(0, 6000)),
    st.builds(
        lambda rows: LoadConfig(model="csv", csv_path=_csv(rows)),
        st.lists(st.tuples(st.integers(1, 2 * HOUR), st.integers(0, 5000)), min_size=2),
    ),
)

tariffs = st.builds(
    lambda prices, switches, weekend: TariffConfig(
        prices=tuple(prices),
        weekday=((0, 1), *((m, 1 + i % len(prices)) for i, m in enumerate(sorted(switches)))),
        weekend=((0, weekend % len(prices) + 1),),
    ),
    st.lists(st.integers(0, 5000), min_size=1, max_size=4),
    st.sets(st.integers(1, 1439), max_size=4),
    st.integers(0, 3),
)

configs = st.builds(
    lambda unit, load, tariff, friendly, days, extra: MeterConfig(
        "E1",
        credit_unit=unit,
        load=load,
        tariff=tariff,
        friendly_hours=friendly,
        friendly_days=days,
        **extra,
    ),
    st.sampled_from(["money", "energy"]),
    loads,
    tariffs,
    st.sampled_from([(), ((0, 360), (18 * 60, 1440)), ((7 * 60 + 13, 7 * 60 + 14),)]),
    st.sampled_from([(), (7,), (4,)]),
    st.fixed_dictionaries(
        {
            "emergency_auto": st.booleans(),
            "emergency_credit": st.sampled_from([0, 500, 2000]),
            "debt_recovery_percent": st.sampled_from([1, 50, 100]),
            "control_mode": st.integers(0, 6),
            "initial_credit": st.integers(0, 8000),
            "low_credit_threshold": st.sampled_from([0, 1000, 3000]),
            "local_disconnect": st.booleans(),
            "limiter_watts": st.sampled_from([0, 0, 2500]),
            "limiter_over_seconds": st.sampled_from([0, 60, 200]),
            "limiter_under_seconds": st.sampled_from([0, 300]),
            "timezone_minutes": st.sampled_from([0, 180, -330, 345]),
            "profile_period": st.sampled_from([60, 900, 3600]),
            "min_topup": st.just(1),
            "max_topup": st.just(50_000),
        }
    ),
)

KINDS = (
    *["advance"] * 8,
    "advance_fraction",
    *["topup"] * 3,
    "set_clock",
    "host_back",
    "disconnect",
    "reconnect",
    "button",
    "emergency",
    "threshold",
    "tamper",
    "weld",
    "power_cycle",
)
ops = st.tuples(st.sampled_from(KINDS), st.integers(0, 2**31), st.floats(0, 1))


def _csv(rows: list[tuple[int, int]]) -> str:
    text = "timestamp,watts\n"
    moment = JAN1 - 2 * HOUR
    for gap, watts in rows:
        text += f"{moment},{watts}\n"
        moment += gap
    path = CSV_DIR / f"load-{abs(hash(text))}.csv"
    path.write_text(text)
    return str(path)


class Twin:
    """One meter as each integration runs it."""

    def __init__(self, config: MeterConfig, start: float, step: int) -> None:
        self.config = config
        self.step = step
        self.now = start
        self.meters = {way: Meter(config, start, load_for(config)) for way in ("fixed", "events")}
        self.seq = 0
        self.transfer = 0

    def advance(self, now: float) -> None:
        for way, m in self.meters.items():
            m.advance(now, self.step, way)  # type: ignore[arg-type]

    def send(self, command: Command) -> None:
        self.seq += 1
        envelope = CommandEnvelope(self.config.meter_id, self.seq, command)
        results = [m.execute(envelope) for m in self.meters.values()]
        assert results[0] == results[1]

    def run(self, op: tuple[str, int, float]) -> None:
        kind, number, size = op
        if kind == "advance":
            self.now += 1 + number % (6 * HOUR)
            self.advance(self.now)
        elif kind == "advance_fraction":
            self.now += size * HOUR
            self.advance(self.now)
        elif kind == "topup":
            self.transfer += 1
            self.send(Command.credit_transfer(self.transfer, 1 + number % 20_000))
        elif kind == "set_clock":
            base = int(self.meters["fixed"].meter_time)
            self.send(Command.set_clock(base + number % (4 * 86400) - 2 * 86400))
        elif kind == "host_back":
            self.advance(self.now - 1 - number % HOUR)
        elif kind == "disconnect":
            self.send(Command.remote_disconnect())
        elif kind == "reconnect":
            self.send(Command.remote_reconnect())
        elif kind == "button":
            results = [m.press_button(self.now) for m in self.meters.values()]
            assert results[0] == results[1]
        elif kind == "emergency":
            self.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
        elif kind == "threshold":
            self.send(Command(CommandCode.SET_LOW_CREDIT_THRESHOLD, (number % 5000,)))
        elif kind == "tamper":
            for m in self.meters.values():
                m.set_tamper(self.now)
        elif kind == "weld":
            for m in self.meters.values():
                m.set_relay_welded(self.now, welded=number % 2 == 0)
        elif kind == "power_cycle":
            self.now += number % (8 * HOUR)
            for way, m in list(self.meters.items()):
                state = json.loads(json.dumps(m.to_state()))
                self.meters[way] = Meter.from_state(self.config, state, self.now, m.load)

    def check(self) -> None:
        fixed, events = self.meters["fixed"], self.meters["events"]
        assert events.to_state() == fixed.to_state()
        assert events.snapshot() == fixed.snapshot()
        assert events.status == fixed.status
        assert events.demand_w == fixed.demand_w
        for attribute in ("available_credit", "aggregated_debt", "current_credit_in_use"):
            assert getattr(events.account, attribute) == getattr(fixed.account, attribute)
        assert events.account.current_credit_status == fixed.account.current_credit_status


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs,
    start=st.sampled_from([JAN1, JAN1 + 9 * HOUR + 17, JAN1 + 0.25]),
    step=st.sampled_from([60, 60, 900, 7, 3600]),
    life=st.lists(ops, min_size=1, max_size=25),
)
def test_events_and_fixed_steps_agree(
    config: MeterConfig, start: float, step: int, life: list[tuple[str, int, float]]
) -> None:
    twin = Twin(config, start, step)
    twin.check()
    for op in life:
        twin.run(op)
        twin.check()


@settings(max_examples=15, deadline=None)
@given(
    meters=st.integers(1, 6),
    hours=st.integers(1, 30),
    start=st.sampled_from([JAN1, JAN1 + 1234.5]),
    step=st.sampled_from([60, 900]),
)
def test_a_batch_run_of_a_fleet_is_the_same_either_way_and_whatever_the_tick(
    meters: int, hours: int, start: float, step: int
) -> None:
    document: dict[str, Any] = {
        "simulation": {"start": start, "step_seconds": step},
        "defaults": {"initial_credit": 900, "low_credit_threshold": 500},
        "meters": [
            {"count": meters},
            {"id_prefix": "ENE-", "count": 2, "credit_unit": "energy", "initial_credit": 300},
        ],
    }
    states = {}
    ticks = (HOUR, 86400.0) if start % step == 0 else (HOUR,)  # ticks on the step grid
    for way in ("fixed", "events"):
        for tick in ticks:
            config = fleet_from_mapping(document)
            clock = ManualClock(start)
            with tempfile.TemporaryDirectory(prefix="integration-fleet-") as work:
                fleet = Fleet.from_config(config, clock, Path(work), integration=way)
                run_batch(fleet, clock, hours * HOUR, tick)
                states[way, tick] = {
                    meter_id: rt.meter.to_state() for meter_id, rt in fleet.runtimes.items()
                }
    for key, state in states.items():
        assert state == states["fixed", HOUR], key


def test_the_load_models_say_where_their_demand_holds() -> None:
    load = ResidentialLoad(450, seed=5, timezone_minutes=345)
    for t in range(JAN1, JAN1 + 86400, 97):
        watts, end = load.segment(float(t))
        assert watts == load.demand(t)
        assert end > t
        assert load.demand(end - 1) == watts  # whole seconds: constant up to the end
        assert (end + 345 * 60) % ResidentialLoad.SLOT == 0
    csv = CsvLoad(Path(_csv([(600, 100), (900, 900), (300, 300)])))
    for t in range(JAN1 - 2 * HOUR, JAN1 + 4 * HOUR, 53):
        watts, end = csv.segment(float(t))
        assert watts == csv.demand(t)
        assert all(csv.demand(t + k) == watts for k in range(0, int(end - t), 29))


def test_a_run_of_steps_is_integrated_at_once() -> None:
    """The event-driven path does not evaluate the load per step: a constant load over a day
    is asked for its demand once per load-profile capture (and per tick), not per minute."""
    config = MeterConfig("E2", load=LoadConfig(model="constant", watts=1000), initial_credit=10**7)
    asked: dict[Integration, int] = {}
    for way in ("fixed", "events"):
        m = Meter(config, JAN1, load_for(config))
        calls = 0
        inner_demand, inner_segment = m.load.demand, m.load.segment  # type: ignore[attr-defined]

        def demand(t: float, inner: Any = inner_demand) -> int:
            nonlocal calls
            calls += 1
            return inner(t)  # type: ignore[no-any-return]

        def segment(t: float, inner: Any = inner_segment) -> tuple[int, float]:
            nonlocal calls
            calls += 1
            return inner(t)  # type: ignore[no-any-return]

        m.load.demand = demand  # type: ignore[method-assign]
        m._segment = segment
        for hour in range(1, 25):
            m.advance(JAN1 + hour * HOUR, 60, way)
        asked[way] = calls
        assert m.energy.value == 24_000
    assert asked["fixed"] == 24 * 60
    assert asked["events"] <= 24 * 4 + 24 + 4  # a capture each 15 min, the ticks, the tariff


def test_the_residential_integral_is_the_sum_of_its_seconds() -> None:
    load = ResidentialLoad(900, seed=11, timezone_minutes=-330)
    start = JAN1 - 5000 + 7
    stops = [start, start + 1, start + 299, start + 86400, start + 3 * 86400 - 13]
    by_second = [load.demand(t) for t in range(start, stops[-1])]
    expected = [sum(by_second[: stop - start]) for stop in stops]
    assert load.watt_seconds(start, stops) == expected
    chained: list[tuple[int, float]] = []
    moment: float = start
    while moment < start + 900:
        chained.append(load.segment(moment))
        moment = chained[-1][1]
    assert load.segments(start, start + 900) == chained
    assert load.aligned(60, 0)
    assert load.aligned(300, -330 * 60)
    assert not load.aligned(60, 17)
    assert not load.aligned(900, 0)
