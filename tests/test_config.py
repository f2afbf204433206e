from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from meter_sim.config import (
    DOC_TABLES,
    FIELD_DOCS,
    SCHEMA,
    FleetConfig,
    MeterConfig,
    SimulationConfig,
    TariffConfig,
    default_fleet,
    fleet_from_mapping,
    load_fleet,
    meter_from_mapping,
    parse_hhmm,
    render_markdown,
)
from protocols.errors import ConfigError

FLEET = """
[simulation]
speed = 3600
start = "2026-01-01T00:00:00Z"
state_dir = "state"

[defaults]
credit_unit = "energy"
initial_credit = 5000
friendly_hours = [["22:00", "24:00"]]

[defaults.tariff]
prices = [3000, 1000, 500]
weekday = [["00:00", 3], ["06:00", 2], ["17:00", 1], ["21:00", 2]]
weekend = [["00:00", 3]]

[[meters]]
id = "LAB-1"
auth_key = "00112233"
credit_unit = "money"

[[meters]]
id_prefix = "F-"
count = 3
modbus_unit = 246
"""


def test_fleet_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    fleet = load_fleet(path)
    assert fleet.simulation.speed == 3600
    assert fleet.simulation.start == 1767225600.0
    ids = [m.meter_id for m in fleet.meters]
    assert ids == ["LAB-1", "F-0001", "F-0002", "F-0003"]
    lab, first, second, third = fleet.meters
    assert lab.credit_unit == "money"
    assert lab.key_bytes == bytes.fromhex("00112233")
    assert first.credit_unit == "energy"
    assert first.initial_credit == 5000
    assert first.friendly_hours == ((22 * 60, 24 * 60),)
    assert first.tariff.prices == (3000, 1000, 500)
    assert [m.modbus_unit for m in (first, second, third)] == [246, 247, 1]


def test_tariff_rate_lookup() -> None:
    tariff = TariffConfig()
    assert tariff.rate_at(0, weekend=False) == 2
    assert tariff.rate_at(7 * 60, weekend=False) == 1
    assert tariff.rate_at(23 * 60 - 1, weekend=False) == 1
    assert tariff.rate_at(23 * 60, weekend=False) == 2
    assert tariff.rate_at(12 * 60, weekend=True) == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"meters": [{"id": "A", "colour": "red"}]}, "unknown key"),
        ({"meters": [{"id": "bad id!"}]}, r"meters\[0\]\.id: must be letters"),
        ({"meters": [{"id": "A"}, {"id": "A"}]}, "appears twice"),
        ({"meters": [{"id": "A", "control_mode": 9}]}, "control_mode"),
        ({"meters": [{"id": "A", "modbus_unit": 0}]}, "modbus_unit"),
        ({"meters": [{"id": "A", "credit_unit": "gold"}]}, "credit_unit"),
        ({"meters": [{"id": "A", "initial_credit": -1}]}, "initial_credit"),
        ({"meters": [{"id": "A", "currency": "kes"}]}, "ISO 4217"),
        ({"meters": [{"id": "A", "currency_scale": 2}]}, r"currency_scale: must be <= 0"),
        ({"meters": [{"id": "A", "auth_key": "xyz"}]}, "auth_key: must be hex digits"),
        ({"meters": [{"id": "A", "friendly_hours": [["10:00", "09:00"]]}]}, "friendly_hours"),
        (
            {"meters": [{"id": "A", "tariff": {"prices": [1, 2], "weekday": [["01:00", 1]]}}]},
            "00:00",
        ),
        ({"meters": [{"id": "A", "tariff": {"prices": [1], "weekday": [["00:00", 2]]}}]}, "rate 2"),
        ({"meters": [{"id": "A", "profile_period": 7}]}, "profile_period"),
        ({"simulation": {"speed": 0}}, "speed"),
        ({"simulation": {"warp": 9}}, "unknown key"),
        ({"cars": []}, "unknown key"),
    ],
)
def test_bad_configuration_is_refused(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        fleet_from_mapping(raw)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_fleet(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[simulation\nspeed = ")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_fleet(broken)


def test_times_of_day() -> None:
    assert parse_hhmm("07:30") == 450
    assert parse_hhmm("24:00") == 1440
    for bad in ("7", "25:00", "24:01", "12:60"):
        with pytest.raises(ConfigError):
            parse_hhmm(bad)


def test_every_key_is_documented() -> None:
    for section, _title, cls in DOC_TABLES:
        for spec in fields(cls):
            assert (section, spec.name) in FIELD_DOCS, f"{section}.{spec.name} is undocumented"


def test_defaults_are_valid() -> None:
    meter = MeterConfig("M")
    assert meter.credit_unit == "money"
    assert meter.key_bytes is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[simulation]\nspeed = "fast"\n[[meters]]\nid = "A"\n',
            "simulation.speed: expected float",
        ),
        ('[[meters]]\nid = "A"\n[[meters]]\ncount = "two"\n', r"meters\[1\]\.count: expected int"),
        (
            '[defaults.load]\nwatts = "x"\n[[meters]]\nid = "A"\n',
            "defaults.load.watts: expected int, got string",
        ),
        ('meters = "abc"\n', "meters: expected array, got string"),
        ('simulation = 5\n[[meters]]\nid = "A"\n', "simulation: expected table, got int"),
        ("[simulation]\nspeed = 0\n[[meters]]\nid = 'A'\n", "simulation.speed: must be > 0$"),
        ("[simulation]\nspeed = 60\n", "the fleet has no meters"),
        ("meters = []\n", "the fleet has no meters"),
        ("[[meters]]\nid = 'A'\nemergency_auto = 1\n", "emergency_auto: expected bool, got int"),
        ("[[meters]]\nid = 'A'\nmanufacturer = 'ACME METERS'\n", "manufacturer: must be a str"),
        ("[[meters]]\nid = 'A'\ncount = 2\n", "id .* or count, not both"),
        ("[[meters]]\nmodbus_unit = 2\n", r"meters\[0\]\.id: required"),
        ("[mqtt]\npassword_secret = 'abc'\n[[meters]]\nid = 'A'\n", "mqtt.password_secret"),
    ],
)
def test_every_problem_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_fleet(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)


def test_the_schema_names_every_field_of_every_table() -> None:
    for section, (keys, cls) in SCHEMA.items():
        names = {"id" if f.name == "meter_id" else f.name for f in fields(cls)}
        assert set(keys) == names, section


def test_currency_scale_is_the_snapshot_scale() -> None:
    meter = meter_from_mapping({"id": "J", "currency": "JPY", "currency_scale": 0})
    assert (meter.currency_scale, meter.currency_exponent) == (0, 0)
    assert MeterConfig("K").currency_scale == -2
    with pytest.raises(ConfigError, match="currency_scale"):
        MeterConfig("K", currency_scale=2)


def test_the_mqtt_password_secret() -> None:
    secret = "ab" * 32
    fleet = fleet_from_mapping({"mqtt": {"password_secret": secret}, "meters": [{"id": "A"}]})
    assert fleet.mqtt_password_secret == secret
    assert fleet_from_mapping({"meters": [{"id": "A"}]}).mqtt_password_secret is None
    one, two = default_fleet(), default_fleet()
    assert one.mqtt_password_secret is not None
    assert len(one.mqtt_password_secret) == 64
    assert one.mqtt_password_secret != two.mqtt_password_secret


def test_a_fleet_has_meters() -> None:
    with pytest.raises(ConfigError, match="no meters"):
        FleetConfig(SimulationConfig(), ())


def test_the_document_gives_each_key_its_type_and_range() -> None:
    text = render_markdown()
    assert "| `modbus_unit` | integer 1..247 | `1` |" in text
    assert "| `speed` | number > 0, at most 1,000,000,000 | `60.0` |" in text
    assert "| `password_secret` | 64 hex digits | unset |" in text
    assert "register-map.md#disconnect-control-modes" in text
    assert "design notes" not in text
