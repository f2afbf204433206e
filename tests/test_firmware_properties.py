"""Hypothesis properties of the firmware: credit conservation, energy registers.

Conservation is checked from the registers alone, not from the firmware's own counters: in a
monetary account the charges are (sum over rates of Wh x unit price - the carried fraction) / 1000,
in an energy account they are the Wh imported; accepted top-ups are counted by the test from the
command results. Then ``initial credit + accepted top-ups - charges = credit + emergency balance
- emergency owed - debt`` after every step, exactly.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols.commands import Command, CommandCode, CommandEnvelope, ResultCode
from protocols.readings import EventCode

JAN1 = 1_767_225_600.0  # Thursday
HOUR = 3600

_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

configs = st.builds(
    lambda unit, watts, residential, friendly, auto, emergency, percent, mode, initial: MeterConfig(
        "P1",
        credit_unit=unit,
        load=(
            LoadConfig(model="residential", mean_watts=watts, seed=7)
            if residential
            else LoadConfig(model="constant", watts=watts)
        ),
        friendly_hours=((0, 360), (18 * 60, 1440)) if friendly else (),
        friendly_days=(7,) if friendly else (),
        emergency_auto=auto,
        emergency_credit=emergency,
        debt_recovery_percent=percent,
        control_mode=mode,
        initial_credit=initial,
        low_credit_threshold=1000,
        min_topup=1,
        max_topup=50_000,
    ),
    st.sampled_from(["money", "energy"]),
    st.integers(0, 4000),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 500, 2000]),
    st.sampled_from([1, 50, 100]),
    st.integers(0, 6),
    st.integers(0, 8000),
)

KINDS = (
    *["advance"] * 6,
    *["topup"] * 3,
    "repeat_topup",
    "old_topup",
    "big_topup",
    "emergency",
    "set_clock",
    "host_back",
    "disconnect",
    "reconnect",
    "button",
    "retry",
    "power_cycle",
)
#: (kind, a fraction that sizes it, a small integer)
ops = st.tuples(st.sampled_from(KINDS), st.floats(0, 1), st.integers(1, 3))


def charges_from_registers(m: Meter) -> int:
    if m.config.credit_unit == "energy":
        return m.energy.value
    cost_milli = sum(r.value * p for r, p in zip(m.rates, m.config.tariff.prices, strict=False))
    assert 0 <= m.charge_residue < 1000
    charges, rest = divmod(cost_milli - m.charge_residue, 1000)
    assert rest == 0
    return charges


class Driver:
    def __init__(self, config: MeterConfig) -> None:
        self.config = config
        self.now = JAN1 + 9 * HOUR
        self.m = Meter(config, self.now, load_for(config))
        self.seq = 0
        self.transfer = 0
        self.accepted = 0
        self.last_envelope: CommandEnvelope | None = None
        self.energy = 0

    def send(self, command: Command) -> Any:
        self.seq += 1
        self.last_envelope = CommandEnvelope(self.config.meter_id, self.seq, command)
        return self.m.execute(self.last_envelope)

    def topup(self, transfer: int, amount: int) -> None:
        result = self.send(Command.credit_transfer(transfer, amount))
        if result.code is ResultCode.OK:
            self.accepted += amount
            self.transfer = transfer
        else:
            assert result.code in (
                ResultCode.DUPLICATE,
                ResultCode.OLD_TRANSFER,
                ResultCode.AMOUNT_OUT_OF_BOUNDS,
            )

    def run(self, op: tuple[str, float, int]) -> None:
        kind, size, small = op
        amount = 1 + int(size * 19_999)
        if kind == "advance":
            self.now += 0.5 + size * 2 * HOUR
            self.m.advance(self.now)
        elif kind == "topup":
            self.topup(self.transfer + small, amount)
        elif kind == "repeat_topup" and self.transfer:
            before = self.m.balances
            self.topup(self.transfer, amount)
            assert self.m.balances == before  # applied zero times
        elif kind == "old_topup" and self.transfer > 1:
            before = self.m.balances
            self.topup(self.transfer - 1, amount)
            assert self.m.balances == before
        elif kind == "big_topup":
            before = self.m.balances
            self.topup(self.transfer + 1, 50_001 + amount)  # over max_topup
            assert self.m.balances == before
        elif kind == "emergency":
            self.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
        elif kind == "set_clock":
            jump = int((size - 0.5) * 6 * 86400)
            self.send(Command.set_clock(int(self.m.meter_time) + jump))
        elif kind == "host_back":
            back = 1 + size * HOUR
            self.m.advance(self.now - back)
            self.now = max(self.now - back, self.m.true_time)
        elif kind == "disconnect":
            self.send(Command.remote_disconnect())
        elif kind == "reconnect":
            self.send(Command.remote_reconnect())
        elif kind == "button":
            self.m.press_button(self.now)
        elif kind == "retry" and self.last_envelope is not None:
            before = self.m.balances
            result = self.m.execute(self.last_envelope)
            assert result == self.m.last_exec_result
            assert self.m.balances == before
        elif kind == "power_cycle":
            state = json.loads(json.dumps(self.m.to_state()))
            self.now += size * 6 * HOUR
            self.m = Meter.from_state(self.config, state, self.now, self.m.load)

    def check(self) -> None:
        m = self.m
        b = m.balances
        net = b.credit + b.emergency_balance - b.emergency_owed - b.debt
        assert self.config.initial_credit + self.accepted - charges_from_registers(m) == net
        assert b.credit >= 0
        assert b.debt >= 0
        assert 0 <= b.emergency_balance <= b.emergency_owed
        assert m.energy.value >= self.energy  # never decreases
        self.energy = m.energy.value
        assert sum(r.value for r in m.rates) == m.energy.value


@_SETTINGS
@given(config=configs, steps=st.lists(ops, min_size=1, max_size=30))
def test_credit_is_conserved(config: MeterConfig, steps: list[tuple[str, float, int]]) -> None:
    driver = Driver(config)
    driver.check()
    for op in steps:
        driver.run(op)
        driver.check()


@settings(max_examples=80, deadline=None)
@given(
    mean=st.integers(0, 3000),
    moves=st.lists(
        st.one_of(
            st.tuples(st.just("advance"), st.floats(1, 3 * HOUR)),
            st.tuples(st.just("set_clock"), st.integers(-7 * 86400, 7 * 86400)),
            st.tuples(st.just("host_back"), st.floats(1, 2 * HOUR)),
        ),
        min_size=1,
        max_size=20,
    ),
)
def test_energy_registers_never_decrease_and_rates_sum_to_the_total(
    mean: int, moves: list[tuple[str, float]]
) -> None:
    config = MeterConfig(
        "P2",
        load=LoadConfig(model="residential", mean_watts=mean, seed=3),
        initial_credit=10**8,
        max_credit=10**9,
        control_mode=0,
    )
    now = JAN1
    m = Meter(config, now, load_for(config))
    seq = 0
    previous = [0] * 5
    for kind, value in moves:
        if kind == "advance":
            now += value
            m.advance(now)
        elif kind == "set_clock":
            seq += 1
            target = max(int(m.meter_time + value), 0)
            result = m.execute(CommandEnvelope("P2", seq, Command.set_clock(target)))
            assert result.code is ResultCode.OK
        else:
            m.advance(now - value)
        registers = [m.energy.value, *(r.value for r in m.rates)]
        assert all(a >= b for a, b in zip(registers, previous, strict=True))
        assert sum(registers[1:]) == registers[0]
        previous = registers


@settings(max_examples=60, deadline=None)
@given(config=configs, steps=st.lists(ops, min_size=1, max_size=20))
def test_event_sequence_numbers_increase_by_one(
    config: MeterConfig, steps: list[tuple[str, float, int]]
) -> None:
    driver = Driver(config)
    for op in steps:
        driver.run(op)
    events = driver.m.events_since(0, 100_000)
    seqs = [e.seq for e in events]
    if seqs:
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert seqs[-1] == driver.m.event_seq
    cycles = sum(1 for op in steps if op[0] == "power_cycle")
    assert [e.code for e in events].count(EventCode.POWER_UP) == cycles
