"""MeterRuntime: the live meter with its clock and its state file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import pytest

from meter_sim.config import LoadConfig, MeterConfig, default_fleet
from meter_sim.fleet import CLOCK_FILE, Fleet, resume_time
from meter_sim.nvm import StateStore
from meter_sim.runtime import MeterRuntime
from meter_sim.statedb import DB_NAME, FleetStore
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.cosem import OBIS_CLOCK, OBIS_ENERGY_IMPORT
from protocols.errors import StateFileError
from protocols.readings import EventCode

THU_10 = 1_767_225_600.0 + 10 * 3600


def sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def config(**overrides: object) -> MeterConfig:
    base: dict[str, object] = {
        "meter_id": "RT1",
        "load": LoadConfig(model="constant", watts=1000),
        "friendly_hours": (),
        "friendly_days": (),
        "initial_credit": 100_000,
    }
    base.update(overrides)
    return MeterConfig(**base)  # type: ignore[arg-type]


def topup(runtime: MeterRuntime, sequence: int, transfer: int, amount: int) -> ResultCode:
    envelope = CommandEnvelope("RT1", sequence, Command.credit_transfer(transfer, amount))
    return runtime.execute(envelope).code


def test_a_new_meter_is_saved_at_once(tmp_path: Path) -> None:
    MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    assert (tmp_path / DB_NAME).exists()
    state = FleetStore(tmp_path).meter("RT1").load()
    assert state["meter_id"] == "RT1"


def test_a_state_directory_of_json_files_is_read_and_then_saved_in_the_store(
    tmp_path: Path,
) -> None:
    clock = ManualClock(THU_10)
    older = MeterRuntime(config(), clock, MeterRuntime.open(config(), clock).meter)
    StateStore.for_meter(tmp_path, "RT1").save(older.meter.to_state())
    assert topup(older, 1, 1, 700) is ResultCode.OK  # in memory only: not in the JSON file
    StateStore.for_meter(tmp_path, "RT1").save(older.meter.to_state())
    runtime = MeterRuntime.open(config(), ManualClock(THU_10 + 60), tmp_path)
    assert runtime.meter.last_transfer == 1
    assert topup(runtime, 2, 2, 700) is ResultCode.OK
    assert FleetStore(tmp_path).meter("RT1").load()["last_transfer"] == 2  # the store wins


def test_a_command_is_persisted_before_execute_returns(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock, tmp_path)
    clock.advance(1800)
    assert topup(runtime, 1, 1, 5000) is ResultCode.OK
    # a second process opening the same directory (as after a kill -9) sees the top-up
    other = MeterRuntime.open(config(), ManualClock(THU_10 + 1800), tmp_path)
    snap = other.meter.snapshot()
    assert snap.last_transfer == 1
    assert snap.last_command_seq == 1
    assert other.meter.balances.credit == 100_000 - 1250 + 5000
    assert topup(other, 2, 1, 5000) is ResultCode.DUPLICATE
    assert other.meter.balances.credit == 100_000 - 1250 + 5000


def test_reads_advance_the_meter_to_the_clock(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock, tmp_path)
    clock.advance(3600)
    assert runtime.read(OBIS_ENERGY_IMPORT) == 1000
    assert runtime.snapshot().time == int(THU_10) + 3600
    assert runtime.now() == int(THU_10) + 3600


def test_restore_logs_the_power_down_and_power_up(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock, tmp_path)
    clock.advance(3600)
    topup(runtime, 1, 1, 100)  # syncs and saves at THU_10 + 1 h
    seq = runtime.meter.event_seq
    later = ManualClock(THU_10 + 5 * 3600)  # off for four hours
    restored = MeterRuntime.open(config(), later, tmp_path)
    tail = restored.events_since(seq)
    assert [e.code for e in tail] == [EventCode.POWER_DOWN, EventCode.POWER_UP]
    assert tail[0].time == int(THU_10) + 3600
    assert tail[1].time == int(THU_10) + 5 * 3600
    assert tail[1].a == 4 * 3600
    assert restored.read(OBIS_ENERGY_IMPORT) == 1000  # nothing while it was off
    # and the restore itself was saved: a third open logs a new pair, not the same one again
    again = MeterRuntime.open(config(), ManualClock(THU_10 + 5 * 3600), tmp_path)
    codes = [e.code for e in again.events_since(seq)]
    assert codes == [EventCode.POWER_DOWN, EventCode.POWER_UP] * 2


def test_open_stopped_neither_power_cycles_nor_lets_time_pass(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock, tmp_path)
    clock.advance(3600)
    topup(runtime, 1, 1, 100)
    seq = runtime.meter.event_seq
    stopped = MeterRuntime.open_stopped(config(), tmp_path)
    assert stopped.meter.event_seq == seq
    assert stopped.events_since(0) == runtime.events_since(0)
    assert stopped.read(OBIS_ENERGY_IMPORT) == 1000
    assert stopped.snapshot().energy_import_wh == 1000
    assert stopped.now() == int(THU_10) + 3600
    assert topup(stopped, 2, 2, 200) is ResultCode.OK  # an offline command, saved
    reopened = MeterRuntime.open_stopped(config(), tmp_path)
    assert reopened.meter.last_transfer == 2
    assert reopened.read(OBIS_ENERGY_IMPORT) == 1000


def test_open_stopped_shows_the_clock_the_head_end_set(tmp_path: Path) -> None:
    runtime = MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    envelope = CommandEnvelope("RT1", 1, Command.set_clock(int(THU_10) + 7200))
    assert runtime.execute(envelope).code is ResultCode.OK
    stopped = MeterRuntime.open_stopped(config(), tmp_path)
    assert stopped.read(OBIS_CLOCK) == int(THU_10) + 7200


def test_open_stopped_without_state(tmp_path: Path) -> None:
    with pytest.raises(StateFileError):
        MeterRuntime.open_stopped(config(), tmp_path)


def _saved(tmp_path: Path) -> Path:
    runtime = MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    assert runtime.store is not None
    runtime.store.fleet.close()  # the log is checkpointed into the file
    return tmp_path / DB_NAME


def _update(path: Path, statement: str, *args: object) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(statement, args)
    connection.close()


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "checksum", "format", "not_json", "not_a_table", "empty"],
)
def test_a_corrupt_state_store_raises_state_file_error(tmp_path: Path, damage: str) -> None:
    path = _saved(tmp_path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xff\xfe not a database" * 100)
    elif damage == "checksum":
        row = "SELECT state FROM meter_state WHERE meter_id = 'RT1'"
        with sqlite3.connect(path) as connection:
            body = connection.execute(row).fetchone()[0]
        connection.close()
        state = json.loads(body)
        state["credit"] += 1
        _update(path, "UPDATE meter_state SET state = ?", json.dumps(state).encode())
    elif damage == "format":
        _update(path, "UPDATE meter_state SET format = 2")
    elif damage == "not_json":
        body = b"{not json"
        _update(path, "UPDATE meter_state SET state = ?, sha256 = ?", body, sha256(body))
    elif damage == "not_a_table":
        _update(path, "DROP TABLE meter_state")
    else:
        path.write_bytes(b"")
    with pytest.raises(StateFileError):
        MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    with pytest.raises(StateFileError):
        MeterRuntime.open_stopped(config(), tmp_path)


def test_a_state_that_does_not_fit_raises_state_file_error(tmp_path: Path) -> None:
    _saved(tmp_path)
    store = FleetStore(tmp_path).meter("RT1")
    state = store.load()
    del state["credit"]
    store.save(state)  # a well-formed row with a valid checksum, but a key missing
    with pytest.raises(StateFileError, match="does not fit"):
        MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    state = FleetStore(tmp_path).meter("RT1").load()
    state["meter_id"] = "OTHER"
    state["credit"] = 1
    store.save(state)
    with pytest.raises(StateFileError):
        MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)


def test_memory_only_runtime(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock)
    assert runtime.store is None
    clock.advance(3600)
    assert topup(runtime, 1, 1, 100) is ResultCode.OK
    assert list(tmp_path.iterdir()) == []


def test_subscribers_see_events(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(), clock, tmp_path)
    seen: list[EventCode] = []
    unsubscribe = runtime.subscribe(lambda event: seen.append(event.code))
    topup(runtime, 1, 1, 100)
    assert seen == [EventCode.TOPUP_ACCEPTED]
    unsubscribe()
    topup(runtime, 2, 2, 100)
    assert seen == [EventCode.TOPUP_ACCEPTED]


def test_button_is_saved(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    runtime = MeterRuntime.open(config(control_mode=5), clock, tmp_path)
    assert runtime.press_button() is ResultCode.OK
    reopened = MeterRuntime.open_stopped(config(control_mode=5), tmp_path)
    assert not reopened.meter.disconnect.output_state


def test_resume_time_takes_the_later_of_the_saved_time_and_the_clock(tmp_path: Path) -> None:
    fleet = default_fleet(1)
    assert resume_time(fleet, tmp_path, ManualClock(THU_10)) == THU_10
    (tmp_path / CLOCK_FILE).write_text(json.dumps({"time": THU_10 + 60}))
    assert resume_time(fleet, tmp_path, ManualClock(THU_10)) == THU_10 + 60
    assert resume_time(fleet, tmp_path, ManualClock(THU_10 + 120)) == THU_10 + 120


@pytest.mark.parametrize(
    "text", ["", "{not json", "[]", "{}", '{"time": "soon"}', '{"time": -1}', '{"time": 1e999}']
)
def test_a_corrupt_clock_file_raises_state_file_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / CLOCK_FILE
    path.write_text(text)
    with pytest.raises(StateFileError, match=r"clock\.json: corrupt clock file"):
        resume_time(default_fleet(1), tmp_path, ManualClock(THU_10))


async def test_an_async_command_is_durable_when_it_returns_and_fsync_is_off_the_loop(
    tmp_path: Path,
) -> None:
    runtime = MeterRuntime.open(config(), ManualClock(THU_10), tmp_path)
    assert runtime.store is not None
    store = runtime.store.fleet
    entered, release = threading.Event(), threading.Event()
    real_write = store.write

    def slow_write(prepared: object) -> int:
        entered.set()
        if not release.wait(10):
            raise AssertionError("the commit ran on the event loop: the test could not release it")
        return real_write(prepared)  # type: ignore[arg-type]

    store.write = slow_write  # type: ignore[method-assign]
    envelope = CommandEnvelope("RT1", 1, Command.credit_transfer(1, 500))
    executing = asyncio.create_task(runtime.execute_async(envelope))
    await asyncio.to_thread(entered.wait, 10)
    assert not executing.done(), "not acknowledged before the state is on disk"
    release.set()  # the event loop runs while the save waits in its thread
    result = await executing
    assert result.code is ResultCode.OK
    assert FleetStore(tmp_path).meter("RT1").load()["last_transfer"] == 1


async def test_a_fleet_saves_off_the_loop(tmp_path: Path) -> None:
    clock = ManualClock(THU_10)
    fleet = Fleet.from_config(default_fleet(2), clock, tmp_path)
    clock.advance(3600)
    fleet.sync_all()
    await fleet.save_all_async()
    assert resume_time(default_fleet(1), tmp_path, ManualClock(THU_10)) == THU_10 + 3600
    for meter_id, runtime in fleet.runtimes.items():
        saved = FleetStore(tmp_path).meter(meter_id).load()
        assert saved == json.loads(json.dumps(runtime.meter.to_state()))
