"""The snapshot is defined once (protocols.readings.MeterSnapshot's fields and their FieldSpec);
the register map rows, the MQTT Reading schema, the human-readable view and the firmware's
COSEM objects must all agree with that definition."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import pytest

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.describe import snapshot_rows
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols import mqtt
from protocols import registermap as rm
from protocols.commands import Command, CommandEnvelope
from protocols.errors import ValidationError
from protocols.meter_id import METER_ID_PATTERN, MeterId, check_meter_id, is_meter_id
from protocols.readings import (
    SNAPSHOT_FIELDS,
    SNAPSHOT_VALUE_FIELDS,
    FieldSpec,
    MeterSnapshot,
)

T0 = 1_767_225_600.0


def _busy_snapshot() -> tuple[Meter, MeterSnapshot]:
    config = MeterConfig(
        "M1",
        load=LoadConfig(model="constant", watts=1500),
        initial_credit=20_000,
        emergency_credit=3000,
        friendly_hours=(),
        friendly_days=(),
    )
    meter = Meter(config, T0, load_for(config))
    meter.execute(CommandEnvelope("M1", 1, Command.credit_transfer(1, 5000)))
    meter.advance(T0 + 30 * 3600)
    return meter, meter.snapshot()


def test_every_snapshot_field_carries_its_definition() -> None:
    names = [item.name for item in dataclasses.fields(MeterSnapshot)]
    assert [name for name, _ in SNAPSHOT_FIELDS] == names
    assert all(isinstance(spec, FieldSpec) and spec.description for _, spec in SNAPSHOT_FIELDS)
    assert tuple(names[1:]) == SNAPSHOT_VALUE_FIELDS


def test_the_register_rows_are_the_definition() -> None:
    snapshot_rows_ = [
        row
        for row in rm.ROWS
        if row.block in (rm.Block.MEASUREMENTS, rm.Block.ACCOUNT, rm.Block.STATUS)
    ]
    expected: list[str] = []
    for name, spec in SNAPSHOT_FIELDS:
        if not spec.register:
            continue
        if name == "control_state":
            expected.append("output_state")
        expected += spec.row_names(name)
        for index, row_name in enumerate(spec.row_names(name)):
            row = rm.ROW[row_name]
            assert row.block is rm.Block(spec.block), row_name
            assert row.dtype is rm.DataType(spec.register), row_name
            assert (row.unit, row.scaler, row.enum) == (spec.unit, spec.scaler, spec.enum)
            assert row.description == spec.description.format(n=index + 1)
            assert row.obis == (spec.obis[index] if spec.obis else None), row_name
            assert (row.minimum, row.maximum) == (spec.minimum, spec.maximum), row_name
    assert [row.name for row in snapshot_rows_] == expected
    assert sum(row.size for row in snapshot_rows_) == rm.SNAPSHOT_SIZE


def test_the_mqtt_reading_is_the_definition() -> None:
    fields = msgspec.structs.fields(mqtt.Reading)
    assert tuple(item.name for item in fields) == SNAPSHOT_VALUE_FIELDS
    _, snapshot = _busy_snapshot()
    reading = mqtt.Reading.from_snapshot(snapshot)
    decoded = msgspec.json.decode(msgspec.json.encode(reading), type=mqtt.Reading)
    assert decoded.to_snapshot("M1") == snapshot
    schema = msgspec.json.schema(mqtt.Reading)
    properties = schema["$defs"]["Reading"]["properties"]
    for name in SNAPSHOT_VALUE_FIELDS:
        spec = dict(SNAPSHOT_FIELDS)[name]
        assert properties[name]["description"] == spec.description.format(n=f"1..{spec.count}")


def test_both_codecs_give_back_the_same_snapshot() -> None:
    _, snapshot = _busy_snapshot()
    for order in rm.WORD_ORDERS:
        registers = rm.encode_snapshot(snapshot, order)
        assert rm.decode_snapshot(registers, "M1", order) == snapshot
    telemetry = mqtt.decode_telemetry(mqtt.encode_telemetry(snapshot, 1, 1))
    assert telemetry.reading.to_snapshot("M1") == snapshot


def test_the_readable_view_shows_every_labelled_field_in_order() -> None:
    _, snapshot = _busy_snapshot()
    labels = [label for label, _ in snapshot_rows(snapshot)]
    assert labels == [spec.label for _, spec in SNAPSHOT_FIELDS if spec.label]
    view = dict(snapshot_rows(snapshot))
    assert view["voltage"].endswith(" V")
    assert view["energy import"].endswith(" kWh")
    assert view["credit"].endswith(" KES")


def _cosem(meter: Meter, spec: FieldSpec, index: int) -> Any:
    assert spec.attribute is not None
    value = meter.read(spec.obis[index], spec.attribute)
    return value[spec.element] if spec.element is not None else value


def test_the_firmware_snapshot_agrees_with_its_cosem_objects() -> None:
    """Every field whose definition names a COSEM attribute reads the same from the firmware's
    objects as in the firmware's snapshot."""
    meter, snapshot = _busy_snapshot()
    checked = 0
    for name, spec in SNAPSHOT_FIELDS:
        if not spec.obis:
            continue
        value = getattr(snapshot, name)
        if spec.count > 1:
            assert tuple(_cosem(meter, spec, i) for i in range(spec.count)) == value, name
        else:
            assert _cosem(meter, spec, 0) == value, name
        checked += 1
    assert checked >= 15


def test_a_snapshot_refuses_a_bad_meter_id() -> None:
    _, snapshot = _busy_snapshot()
    with pytest.raises(ValidationError):
        dataclasses.replace(snapshot, meter_id="no spaces")


# -- the meter id ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["MTR-0001", "a", "A.b_c-9", "x" * 64])
def test_meter_ids_that_follow_the_rule(text: str) -> None:
    assert str(MeterId(text)) == text == check_meter_id(text)
    assert is_meter_id(text)


@pytest.mark.parametrize("text", ["", "-a", "a/b", "a+b", "a#", "a b", "x" * 65, "é", 5, None])
def test_meter_ids_that_break_the_rule(text: Any) -> None:
    assert not is_meter_id(text)
    with pytest.raises(ValidationError):
        MeterId(text)
    with pytest.raises(ValidationError):
        check_meter_id(text)


def test_one_meter_id_rule_everywhere() -> None:
    assert mqtt.METER_ID_PATTERN == METER_ID_PATTERN
    assert mqtt.MeterId is MeterId
    assert mqtt.check_meter_id is check_meter_id
