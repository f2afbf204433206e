"""The registry through `hes meters|customers|tariffs`: CSV imports all or nothing, fleet
imports with keys, repeats that change nothing; on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.hes import app
from headend.domain.registry import COLUMNS, Route, parse_meters_csv
from headend.services.registry import route_of
from headend.storage import open_database
from protocols.errors import ConfigError, DecodeError
from tests.databases import db_url, postgres_server

__all__ = ["db_url", "postgres_server"]  # fixtures

runner = CliRunner()

GOOD = """meter_id,endpoint,customer,account,tariff,control_mode,currency_scale
MTR-0001,tcp://127.0.0.1:5020/1,Wanjiru,ACC-1,RES-1,6,-2
MTR-0002,tcp://127.0.0.1:5020/2,Otieno,ACC-2,RES-1,2,-2
MTR-0003,mqtt://127.0.0.1:1883/MTR-0003,Achieng,ACC-3,,6,-2
"""


def hes(db: str, *args: str) -> tuple[int, str]:
    done = runner.invoke(app, [*args, "--db", db])
    assert "Traceback" not in done.output
    return done.exit_code, done.output


@pytest.fixture
def db(db_url: str) -> str:
    assert hes(db_url, "db", "upgrade")[0] == 0
    code, out = hes(db_url, "tariffs", "add", "RES-1", "--price", "2500", "--price", "1200")
    assert code == 0, out
    return db_url


def _meters(db: str) -> list[dict[str, object]]:
    code, out = hes(db, "meters", "list", "--all", "--json")
    assert code == 0, out
    meters: list[dict[str, object]] = json.loads(out)
    return meters


def test_a_good_file_registers_and_a_second_import_changes_nothing(db: str, tmp_path: Path) -> None:
    path = tmp_path / "meters.csv"
    path.write_text(GOOD)
    code, out = hes(db, "meters", "import", str(path), "--json")
    assert code == 0, out
    assert json.loads(out)["added"] == ["MTR-0001", "MTR-0002", "MTR-0003"]
    first = _meters(db)
    assert [(m["meter_id"], m["transport"], m["gateway"], m["unit_id"]) for m in first] == [
        ("MTR-0001", "tcp", "127.0.0.1:5020", 1),
        ("MTR-0002", "tcp", "127.0.0.1:5020", 2),
        ("MTR-0003", "mqtt", "127.0.0.1:1883", None),
    ]
    code, out = hes(db, "meters", "import", str(path), "--json")
    assert code == 0
    assert json.loads(out) | {"unchanged": None} == {
        "applied": True, "added": [], "unchanged": None, "refused": []}  # fmt: skip
    assert json.loads(out)["unchanged"] == ["MTR-0001", "MTR-0002", "MTR-0003"]
    assert _meters(db) == first
    code, out = hes(db, "customers", "list", "--json")
    assert [(c["name"], c["accounts"], c["meters"]) for c in json.loads(out)] == [
        ("Wanjiru", ["ACC-1"], ["MTR-0001"]),
        ("Otieno", ["ACC-2"], ["MTR-0002"]),
        ("Achieng", ["ACC-3"], ["MTR-0003"]),
    ]
    code, out = hes(db, "tariffs", "list", "--json")
    assert json.loads(out)[0]["meters"] == 2


def test_a_file_with_bad_rows_is_refused_whole_and_the_database_is_unchanged(
    db: str, tmp_path: Path
) -> None:
    path = tmp_path / "meters.csv"
    path.write_text(
        GOOD
        + "MTR-0004,tcp://127.0.0.1:5020/999,A,ACC-4,RES-1,6,-2\n"  # unit id out of range
        + "MTR-0005,tcp://127.0.0.1:5020/5,A,ACC-5,NOPE,6,-2\n"  # unknown tariff
        + "MTR-0001,tcp://127.0.0.1:5020/6,A,ACC-6,RES-1,6,-2\n"  # id twice
        + "MTR-0007,bogus,A,ACC-7,RES-1,6,-2\n"  # malformed endpoint
        + "MTR-0008,tcp://127.0.0.1:5020/8,A,ACC-8,RES-1,x,-2\n"  # bad value
        + "MTR-0009,tcp://127.0.0.1:5020/9,A,ACC-9,RES-1,6,-2,extra\n"  # too many fields
    )
    code, out = hes(db, "meters", "import", str(path), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["applied"] is False
    reasons = {r["line"]: r["reason"] for r in report["refused"]}
    assert sorted(reasons) == [5, 6, 7, 8, 9, 10]
    assert "unit id" in reasons[5]
    assert "unknown tariff 'NOPE'" in reasons[6]
    assert "twice" in reasons[7]
    assert "endpoint" in reasons[8] or "bogus" in reasons[8]
    assert "control_mode" in reasons[9]
    assert "more fields" in reasons[10]
    assert _meters(db) == []
    assert json.loads(hes(db, "customers", "list", "--json")[1]) == []
    code, out = hes(db, "meters", "import", str(path), "--skip-bad-rows", "--json")
    assert code == 0
    assert json.loads(out)["added"] == ["MTR-0001", "MTR-0002", "MTR-0003"]


def test_a_meter_registered_with_other_values_is_refused(db: str, tmp_path: Path) -> None:
    path = tmp_path / "meters.csv"
    path.write_text(GOOD)
    assert hes(db, "meters", "import", str(path))[0] == 0
    path.write_text(GOOD.replace("tcp://127.0.0.1:5020/2", "tcp://127.0.0.1:5021/2"))
    code, out = hes(db, "meters", "import", str(path))
    assert code == 1
    assert "line 3: MTR-0002: already registered with other values" in out


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("meter_id,endpoint,colour", "unknown column(s) colour"),
        ("meter_id,customer", "lacks the column(s) endpoint"),
        ("", "the file is empty"),
    ],
)
def test_a_bad_header_refuses_the_file(db: str, tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / "meters.csv"
    path.write_text(header + "\n" if header else "")
    code, out = hes(db, "meters", "import", str(path))
    assert code == 1
    assert message in out
    assert out.count("\n") == 1


FLEET = """
[simulation]
state_dir = "var"

[[meters]]
id_prefix = "MTR-"
count = 2
modbus_unit = 1
auth_key = "00112233445566778899aabbccddeeff"

[[meters]]
id = "OPEN-1"
modbus_unit = 9
credit_unit = "energy"
"""


def test_a_fleet_registers_with_its_keys(db: str, tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    args = ["meters", "import", "--from-fleet", str(fleet), "--endpoint-base"]
    code, out = hes(db, *args, "tcp://127.0.0.1:5020", "--json")
    assert code == 0, out
    meters = _meters(db)
    assert [
        (m["meter_id"], m["endpoint"], m["has_command_key"], m["credit_unit"]) for m in meters
    ] == [
        ("MTR-0001", "tcp://127.0.0.1:5020/1", True, "money"),
        ("MTR-0002", "tcp://127.0.0.1:5020/2", True, "money"),
        ("OPEN-1", "tcp://127.0.0.1:5020/9", False, "energy"),
    ]
    again = json.loads(hes(db, *args, "tcp://127.0.0.1:5020", "--json")[1])
    assert again["unchanged"] == ["MTR-0001", "MTR-0002", "OPEN-1"]
    code, out = hes(db, *args, "tcp://127.0.0.1:5020/7")
    assert code == 1
    assert "--endpoint-base is tcp://host:port or mqtt://host:port" in out
    code, out = hes(db, "meters", "import", "--from-fleet", str(fleet))
    assert code == 1
    assert "needs --endpoint-base" in out


def test_one_meter_added_shown_and_retired(db: str) -> None:
    add = ["meters", "add", "LAB-1", "--endpoint", "rtu:///dev/ttyUSB0?unit=3&baud=9600"]
    code, out = hes(db, *add, "--auth-key", "00ff" * 8)
    assert code == 0, out
    assert hes(db, *add, "--auth-key", "00ff" * 8)[1].strip() == "LAB-1: unchanged"
    code, out = hes(db, "meters", "show", "LAB-1", "--json")
    shown = json.loads(out)["meter"]
    assert (shown["transport"], shown["gateway"], shown["unit_id"]) == ("rtu", "/dev/ttyUSB0", 3)
    assert shown["has_command_key"] is True
    assert "00ff" not in out  # the key is never shown
    assert hes(db, "meters", "retire", "LAB-1")[1].strip() == "LAB-1: retired"
    assert hes(db, "meters", "retire", "LAB-1")[1].strip() == "LAB-1: already retired"
    assert json.loads(hes(db, "meters", "list", "--json")[1]) == []
    assert [m["status"] for m in _meters(db)] == ["retired"]
    code, out = hes(db, "meters", "show", "NOPE")
    assert code == 1
    assert out.strip() == "error: no meter 'NOPE' is registered"
    code, out = hes(db, "meters", "add", "LAB-2", "--endpoint", "ftp://x/1")
    assert code == 1
    assert "tcp, rtu, mqtt or mqtts" in out


def test_customers_and_tariffs(db: str) -> None:
    code, out = hes(db, "customers", "add", "Li Wei", "--phone", "+8613800000000",
                    "--language", "zh", "--account", "ACC-9", "--json")  # fmt: skip
    assert code == 0, out
    customer_id = json.loads(out)["customer_id"]
    shown = json.loads(hes(db, "customers", "show", str(customer_id), "--json")[1])
    assert (shown["language"], shown["accounts"]) == ("zh", ["ACC-9"])
    for bad, message in [
        (["--channel", "email"], "need the customer's email"),
        (["--phone", "12"], "6 to 15 digits"),
        (["--phone", "+254700000000", "--language", "fr"], "language is one of en, zh"),
        (["--phone", "+254700000000", "--account", "ACC-9"], "account 'ACC-9' exists already"),
    ]:
        code, out = hes(db, "customers", "add", "X", *bad)
        assert code != 0
        assert message in out
    assert len(json.loads(hes(db, "customers", "list", "--json")[1])) == 1
    shown = json.loads(hes(db, "tariffs", "show", "RES-1", "--json")[1])
    assert (shown["kind"], shown["prices"]) == ("tou", [2500, 1200])
    assert hes(db, "tariffs", "add", "RES-1", "--price", "2500", "--price", "1200")[0] == 0
    code, out = hes(db, "tariffs", "add", "RES-1", "--price", "99")
    assert code == 1
    assert "exists with other values" in out
    for bad in (["--price", "1"] * 5, ["--price", "1", "--low", "5", "--critical", "9"]):
        code, out = hes(db, "tariffs", "add", "T2", *bad)
        assert code == 1
        assert out.startswith("error: ")
    assert hes(db, "tariffs", "add", "T2", "--price", "-1")[0] == 2  # typer's range check


def test_every_registry_command_refuses_a_schema_that_is_behind(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'new.db'}"
    for args in (["meters", "list"], ["customers", "list"], ["tariffs", "list"]):
        code, out = hes(db, *args)
        assert code == 1
        assert "run 'hes db upgrade'" in out


@pytest.mark.parametrize(
    ("endpoint", "route"),
    [
        ("tcp://10.0.0.1:5020/7", Route("tcp", "10.0.0.1:5020", 7)),
        ("tcp://gw/", Route("tcp", "gw:502", 1)),
        ("rtu://socket://127.0.0.1:5020?unit=3", Route("rtu", "socket://127.0.0.1:5020", 3)),
        ("mqtts://broker/M-1", Route("mqtt", "broker:8883", None)),
    ],
)
def test_routes(endpoint: str, route: Route) -> None:
    assert route_of(endpoint) == route


@pytest.mark.parametrize("endpoint", ["tcp://h/x", "tcp://h/248", "mqtt://h:1883", "x", "rtu://"])
def test_malformed_routes(endpoint: str) -> None:
    with pytest.raises(ConfigError):
        route_of(endpoint)


def test_every_documented_column_is_read() -> None:
    header = ",".join(column.name for column in COLUMNS)
    row = "M-1,tcp://h:1/2,S-1,C,ACC,T,3,energy,USD,-2,g2,300,00ff"
    records, refused = parse_meters_csv(f"{header}\n{row}\n", route_of)
    assert refused == []
    ((line, record),) = records
    assert line == 2
    assert (record.serial, record.customer, record.account, record.tariff) == (
        "S-1",
        "C",
        "ACC",
        "T",
    )
    assert (record.control_mode, record.credit_unit, record.currency) == (3, "energy", "USD")
    assert (record.poll_group, record.auth_key) == ("g2", bytes.fromhex("00ff"))
    with pytest.raises(DecodeError):
        parse_meters_csv('meter_id,endpoint\n"unclosed,x\n', route_of)


def test_an_empty_database_reports_its_revision(tmp_path: Path) -> None:
    async def check() -> None:
        db = await open_database(f"sqlite:///{tmp_path / 'x.db'}", check=False)
        try:
            assert await db.revision() is None
        finally:
            await db.close()

    asyncio.run(check())
