from __future__ import annotations

import json
from pathlib import Path

import pytest

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.firmware import Meter
from meter_sim.nvm import StateStore
from protocols.commands import Command, CommandEnvelope
from protocols.errors import StateFileError

T0 = 1_767_225_600.0


def _meter() -> Meter:
    meter = Meter(MeterConfig("M1", load=LoadConfig(model="constant", watts=1200)), T0)
    meter.execute(CommandEnvelope("M1", 1, Command.credit_transfer(1, 9000)))
    meter.advance(T0 + 7200)
    return meter


def test_round_trip(tmp_path: Path) -> None:
    store = StateStore.for_meter(tmp_path, "M1")
    meter = _meter()
    store.save(meter.to_state())
    assert store.load() == json.loads(json.dumps(meter.to_state()))
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw.replace(b'"last_transfer":1', b'"last_transfer":2'),
        lambda raw: b"\x00\xff" + raw,
        lambda raw: b"[]",
        lambda raw: b'{"format": 1, "sha256": "00", "state": 5}',
        lambda raw: b"",
    ],
)
def test_corruption_is_detected(tmp_path: Path, damage: object) -> None:
    store = StateStore.for_meter(tmp_path, "M1")
    store.save(_meter().to_state())
    store.path.write_bytes(damage(store.path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(StateFileError):
        store.load()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="cannot read"):
        StateStore(tmp_path / "nope.json").load()


def test_a_failed_save_is_a_state_file_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(StateFileError, match="cannot save"):
        StateStore.for_meter(blocker, "M1").save(_meter().to_state())


def test_a_prepared_state_never_replaces_a_newer_one(tmp_path: Path) -> None:
    store = StateStore.for_meter(tmp_path, "M1")
    older = store.prepare({"n": 1})
    newer = store.prepare({"n": 2})
    store.write(newer)
    store.write(older)  # a slow writer finishing late
    assert store.load() == {"n": 2}
    store.save({"n": 3})
    assert store.load() == {"n": 3}
