from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.loads import ConstantLoad, CsvLoad, ResidentialLoad, load_for, make_load
from protocols.errors import ConfigError

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, a Thursday


def test_constant() -> None:
    assert ConstantLoad(1500).demand(T0) == 1500
    with pytest.raises(ConfigError):
        ConstantLoad(-1)


def test_residential_is_deterministic_and_shaped() -> None:
    load = ResidentialLoad(450, seed=42)
    again = ResidentialLoad(450, seed=42)
    other = ResidentialLoad(450, seed=43)
    week = [T0 + i * 60 for i in range(7 * 1440)]
    values = [load.demand(t) for t in week]
    assert values == [again.demand(t) for t in week]
    assert values != [other.demand(t) for t in week]
    assert all(v >= 0 for v in values)
    assert 350 < statistics.mean(values) < 560
    night = statistics.mean(load.demand(T0 + h * 3600 + 1800) for h in range(2, 5))
    evening = statistics.mean(load.demand(T0 + h * 3600 + 1800) for h in range(18, 21))
    assert evening > night


def test_residential_days_are_the_same_draws_as_ever() -> None:
    """Fixed vectors: the watt-seconds of a weekday (2026-01-01, a Thursday) and a weekend
    day (2026-01-03, a Saturday) of a 400 W household of seed 7, 3 h ahead of UTC, as the
    slot-by-slot drawing first gave them."""
    load = ResidentialLoad(400, 7, 180)
    for day, end, samples in [
        (20454, 33_952_800, (33_600, 9_086_100, 18_999_000)),
        (20456, 36_126_600, (38_400, 10_907_400, 23_840_100)),
    ]:
        table = load._table(day)
        assert (table[-1], (table[1], table[100], table[200])) == (end, samples)


def test_residential_timezone_shifts_the_shape() -> None:
    utc = ResidentialLoad(450, seed=1)
    east = ResidentialLoad(450, seed=1, timezone_minutes=180)
    assert east.demand(T0 + 3600) == utc.demand(T0 + 3600 + 180 * 60)


def test_csv_replay(tmp_path: Path) -> None:
    path = tmp_path / "load.csv"
    path.write_text(
        "timestamp,watts\n2026-01-01T00:00:00Z,100\n2026-01-01T00:10:00Z,900\n"
        "2026-01-01T00:20:00Z,300\n"
    )
    load = CsvLoad(path)
    assert load.demand(T0) == 100
    assert load.demand(T0 + 599) == 100
    assert load.demand(T0 + 600) == 900
    assert load.demand(T0 + 1500) == 300
    assert load.demand(T0 + 1800) == 100  # wraps: the recording spans 30 minutes
    assert make_load(LoadConfig(model="csv", csv_path=str(path)), "M").demand(T0) == 100


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("1767225600,100\n", "at least two rows"),
        ("1767225600,100\n1767225500,100\n", "increase"),
        ("1767225600,100\n1767225660,lots\n", ":2: watts"),
        ("1767225600,100\nyesterday,100\n", ":2: not a timestamp"),
        ("1767225600,100\n1767225660,-5\n", ">= 0"),
        ("1767225600,100\n1767225660\n", "timestamp,watts"),
    ],
)
def test_csv_errors_name_the_line(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(ConfigError, match=message):
        CsvLoad(path)


def test_csv_model_needs_a_path() -> None:
    with pytest.raises(ConfigError, match="csv_path"):
        make_load(LoadConfig(model="csv"), "M")
    with pytest.raises(ConfigError, match="No such file"):
        make_load(LoadConfig(model="csv", csv_path="/nonexistent/load.csv"), "M")


def test_load_for_builds_the_model_a_meter_config_names(tmp_path: Path) -> None:
    path = tmp_path / "load.csv"
    path.write_text("time,watts\n1767225600,100\n1767229200,300\n")
    csv_meter = MeterConfig("M", load=LoadConfig(model="csv", csv_path=str(path)))
    assert isinstance(load_for(csv_meter), CsvLoad)
    assert load_for(csv_meter).demand(T0) == 100
    residential = MeterConfig("M", load=LoadConfig(model="residential"), timezone_minutes=60)
    assert isinstance(load_for(residential), ResidentialLoad)
    same = make_load(residential.load, "M", 60)
    assert load_for(residential).demand(T0 + 3600) == same.demand(T0 + 3600)
    with pytest.raises(ConfigError):
        load_for(MeterConfig("M", load=LoadConfig(model="csv")))
