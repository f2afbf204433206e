"""The Modbus datastore's snapshot registers, without sockets: advanced when the meter's clock
shows another second, encoded again whenever the meter's state differs from the last encoding,
whoever changed it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.modbus_server import MeterRegisters
from meter_sim.runtime import MeterRuntime
from protocols import registermap as rm
from protocols.clock import ManualClock
from protocols.readings import StatusFlag

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _meter(clock: ManualClock, watts: int = 3600) -> MeterRuntime:
    config = MeterConfig("MTR-1", initial_credit=1_000_000, load=LoadConfig("constant", watts))
    return MeterRuntime.open(config, clock)


def _snapshot_read(registers: MeterRegisters) -> list[int]:
    return registers.read(rm.Table.INPUT, rm.SNAPSHOT_START, rm.SNAPSHOT_SIZE)


def test_reads_within_one_meter_second_do_not_advance_the_meter() -> None:
    clock = ManualClock(START)
    runtime = _meter(clock)
    registers = MeterRegisters(runtime)
    first = _snapshot_read(registers)
    clock.advance(0.25)
    assert _snapshot_read(registers) == first
    clock.advance(0.5)
    assert _snapshot_read(registers) == first
    assert runtime.meter.true_time == START  # not advanced within the second
    clock.advance(0.5)  # the meter's clock shows the next second
    later = rm.decode_snapshot(_snapshot_read(registers), "MTR-1")
    assert runtime.meter.true_time == START + 1.25
    assert later.time == int(START) + 1
    assert later.energy_import_wh == 1  # 3600 W for 1.25 s: 1.25 Wh, whole Wh counted


def test_a_change_without_the_clock_moving_is_read_at_once() -> None:
    clock = ManualClock(START)
    runtime = _meter(clock)
    registers = MeterRegisters(runtime)
    before = rm.decode_snapshot(_snapshot_read(registers), "MTR-1")
    assert not before.status & StatusFlag.TAMPER
    runtime.meter.set_tamper(clock.now())  # the clock stands still: only the state changed
    after = rm.decode_snapshot(_snapshot_read(registers), "MTR-1")
    assert after.status & StatusFlag.TAMPER
    assert after.last_event_seq == before.last_event_seq + 1


def test_a_meter_advanced_by_someone_else_is_read_as_it_stands() -> None:
    clock = ManualClock(START)
    runtime = _meter(clock, watts=36_000)
    registers = MeterRegisters(runtime)
    _snapshot_read(registers)
    clock.advance(0.5)
    runtime.sync()  # the fleet's tick, within the same meter second
    assert _snapshot_read(registers) == rm.encode_snapshot(runtime.meter.snapshot())
    assert rm.decode_snapshot(_snapshot_read(registers), "MTR-1").energy_import_wh == 5


@given(
    st.lists(
        st.tuples(st.sampled_from(["read", "sync", "floats"]), st.integers(0, 3000)),
        min_size=1,
        max_size=40,
    )
)
@settings(max_examples=60, deadline=None)
def test_the_registers_always_show_the_meter_at_its_current_second(
    steps: list[tuple[str, int]],
) -> None:
    clock = ManualClock(START)
    runtime = _meter(clock, watts=5000)
    registers = MeterRegisters(runtime)
    for action, millis in steps:
        clock.advance(millis / 1000)
        if action == "sync":
            runtime.sync()
            continue
        if action == "floats":
            spec = rm.BLOCKS[rm.Block.FLOATS]
            floats = registers.read(rm.Table.INPUT, spec.start, spec.size)
            expected = rm.float_values(runtime.meter.snapshot())
            assert floats == rm.encode_block(rm.Block.FLOATS, expected)
        else:
            assert _snapshot_read(registers) == rm.encode_snapshot(runtime.meter.snapshot())
        # what was read is the meter as it stands, and its clock shows the current second
        assert int(runtime.meter.meter_time) == int(clock.now())
