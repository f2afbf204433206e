"""Bad input gets one clear line, never a traceback.

Every configuration key (from the fleet file's schema, the table docs/configuration.md is
generated from) and every option of `meter-sim` and `hes` (from the typer apps, which
docs/cli.md is generated from) is given a value of the wrong type and values out of range. Each
must end the command with a non-zero exit and one line that names the key or the option.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import msgspec
import pytest
import tomli_w
import typer.main
from typer.testing import CliRunner

from cli import hes, meter_sim
from meter_sim.config import DOC_TABLES, FIELD_DOCS, SCHEMA

runner = CliRunner()

# -- configuration keys ---------------------------------------------------------------------------

VALID_STS = {"vending_key": "0123456789abcdef", "drn": "01234567890"}


def _wrong_type(info: Any) -> Any:
    """A TOML value of a type the key does not take."""
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return "x"
    if isinstance(info, msgspec.inspect.StrType | msgspec.inspect.LiteralType):
        return [1]
    if isinstance(info, msgspec.inspect.BoolType):
        return "yes"
    if isinstance(info, msgspec.inspect.VarTupleType | msgspec.inspect.TupleType):
        return "abc"
    if isinstance(info, msgspec.inspect.StructType):
        return 5
    if isinstance(info, msgspec.inspect.UnionType):
        return [1]
    raise AssertionError(f"no wrong-type value for {info}")


def _numbers_out_of_range(info: Any) -> list[Any]:
    out: list[Any] = []
    if info.gt is not None:
        out.append(info.gt)
    if info.ge is not None:
        out.append(info.ge - 1)
    if info.le is not None:
        out.append(info.le + 1)
    return out


def _valid(info: Any) -> Any:
    """A valid TOML value for a table item (to pad an over-long array)."""
    if isinstance(info, msgspec.inspect.IntType):
        return info.ge if info.ge is not None else 0
    if isinstance(info, msgspec.inspect.TupleType):
        return [_valid(item) for item in info.item_types]
    if isinstance(info, msgspec.inspect.StrType):
        return "00:00"
    raise AssertionError(f"no valid value for {info}")


def _out_of_range(info: Any) -> list[Any]:
    """TOML values of the right type that the key does not take."""
    if isinstance(info, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return _numbers_out_of_range(info)
    if isinstance(info, msgspec.inspect.StrType):
        out: list[Any] = []
        if info.pattern is not None:
            out.append("!")
        if info.max_length is not None:
            out.append("A" * (info.max_length + 1))
        if info.min_length:
            out.append("")
        return out
    if isinstance(info, msgspec.inspect.LiteralType):
        return ["nope"] if isinstance(info.values[0], str) else [0]
    if isinstance(info, msgspec.inspect.VarTupleType):
        out = [[bad] for bad in _out_of_range(info.item_type)]
        if info.min_length:
            out.append([])
        if info.max_length is not None:
            out.append([_valid(info.item_type)] * (info.max_length + 1))
        return out
    if isinstance(info, msgspec.inspect.TupleType):
        out = []
        for index, item in enumerate(info.item_types):
            for bad in _out_of_range(item):
                value = [_valid(other) for other in info.item_types]
                value[index] = bad
                out.append(value)
        return out
    if isinstance(info, msgspec.inspect.UnionType):
        return [bad for member in info.types for bad in _out_of_range(member)]
    return []  # a bool; a datetime or a table (its keys are tested one by one)


def _fleet_with(section: str, key: str, value: Any) -> tuple[dict[str, Any], str]:
    """A fleet document with ``key`` of ``section`` set to ``value``; the key's path."""
    meter: dict[str, Any] = {"id": "A"}
    document: dict[str, Any] = {"meters": [meter]}
    if section == "simulation":
        document["simulation"] = {key: value}
        return document, f"simulation.{key}"
    if section == "mqtt":
        document["mqtt"] = {key: value}
        return document, f"mqtt.{key}"
    if section == "gateway":
        document["gateways"] = [{"name": "G", key: value}]
        meter["gateway"] = "G"
        return document, f"gateways[0].{key}"
    if section == "meter":
        meter[key] = value
        return document, f"meters[0].{key}"
    if section == "sts":
        meter["credit_unit"] = "energy"
        meter["sts"] = {**VALID_STS, key: value}
    else:
        meter[section] = {key: value}
    return document, f"meters[0].{section}.{key}"


def _config_cases() -> Iterator[Any]:
    for section, _title, cls in DOC_TABLES:
        keys, schema_cls = SCHEMA[section]
        assert schema_cls is cls
        for name in (f.name for f in cls.__dataclass_fields__.values()):
            key = "id" if name == "meter_id" else name
            assert (section, name) in FIELD_DOCS
            info = msgspec.inspect.type_info(keys[key])
            yield pytest.param(section, key, _wrong_type(info), id=f"{section}.{key}-type")
            bad_values = _out_of_range(info)
            if not bad_values:
                kinds = (msgspec.inspect.BoolType, msgspec.inspect.StructType)
                assert isinstance(info, kinds), f"{section}.{key} has no range"
            for n, bad in enumerate(bad_values):
                yield pytest.param(section, key, bad, id=f"{section}.{key}-range{n}")


def _one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def current_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database at the schema's head, made once by `hes db upgrade` and copied into each
    case's directory (the migrations run once, not once per case)."""
    directory = tmp_path_factory.mktemp("current-db")
    url = f"sqlite:///{directory / 'hes.db'}"
    assert runner.invoke(hes.app, ["db", "upgrade", "--db", url]).exit_code == 0
    return directory / "hes.db"


@pytest.mark.parametrize(("section", "key", "value"), list(_config_cases()))
def test_every_key_refuses_a_bad_value(workdir: Path, section: str, key: str, value: Any) -> None:
    document, path = _fleet_with(section, key, value)
    (workdir / "fleet.toml").write_text(tomli_w.dumps(document))
    result = runner.invoke(meter_sim.app, ["run", "-c", "fleet.toml", "--for", "1h", "--batch"])
    assert result.exit_code == 1, result.output
    line = _one_line(result.output)
    assert line.startswith("error: fleet.toml: "), line
    if path.startswith("meters[0].id") and value == "!":
        assert "meters[0].id" in line
    else:
        assert path in line, line
    assert not (workdir / "var").exists(), "a refused fleet file changes nothing stored"


# -- command-line options -------------------------------------------------------------------------

KEY = ["--vending-key", "abababababababab", "--pan", "600727000000000009"]
#: a valid command line for each command, to which the option under test is added
BASE: dict[str, list[str]] = {
    "meter-sim init": ["init", "out.toml"],
    "meter-sim run": ["run", "--for", "1h", "--batch"],
    "meter-sim show": ["show"],
    "meter-sim events": ["events", "MTR-0001"],
    "meter-sim token": ["token", "12345678901234567890"],
    "meter-sim button": ["button"],
    "meter-sim console": ["console"],
    "meter-sim serve": ["serve", "--modbus-port", "0"],
    "meter-sim register-map": ["register-map"],
    "meter-sim rig check": ["rig", "check", "scenario.toml"],
    "meter-sim rig run": ["rig", "run", "scenario.toml", "--serial", "loop://"],
    "hes token credit": ["token", "credit", "--amount", "1", *KEY],
    "hes token power-limit": ["token", "power-limit", "--value", "1000", *KEY],
    "hes token phase-unbalance-limit": ["token", "phase-unbalance-limit", "--value", "10", *KEY],
    "hes token clear-credit": ["token", "clear-credit", *KEY],
    "hes token clear-tamper": ["token", "clear-tamper", *KEY],
    "hes token test": ["token", "test", "--control", "1"],
    "hes token key-change": ["token", "key-change", *KEY],
    "hes token decode": ["token", "decode", "12345678901234567890", *KEY],
    "hes broker config": ["broker", "config", "--fleet", "fleet.toml", "--out", "broker"],
    "hes broker run": ["broker", "run", "broker"],
    "hes read": ["read", "tcp://127.0.0.1:1/1"],
    "hes direct credit": [
        "direct",
        "credit",
        "tcp://127.0.0.1:1/1",
        "--transfer",
        "1",
        "--amount",
        "1",
    ],
    "hes direct disconnect": ["direct", "disconnect", "tcp://127.0.0.1:1/1"],
    "hes direct reconnect": ["direct", "reconnect", "tcp://127.0.0.1:1/1"],
    "hes disconnect": ["disconnect", "M-1", "--reason", "test"],
    "hes reconnect": ["reconnect", "M-1", "--reason", "test"],
    "hes commands list": ["commands", "list"],
    "hes accounts protect": ["accounts", "protect", "A-1", "--reason", "medical", "--for", "30d"],
    "hes accounts unprotect": ["accounts", "unprotect", "A-1", "--reason", "recovered"],
    "hes accounts protected": ["accounts", "protected"],
    "hes commands dispatch": ["commands", "dispatch"],
    "hes commands show": ["commands", "show", "1"],
    "hes commands cancel": ["commands", "cancel", "1", "--reason", "test"],
    "hes demo": ["demo", "--no-mqtt"],
    "hes db current": ["db", "current"],
    "hes db upgrade": ["db", "upgrade"],
    "hes customers add": ["customers", "add", "Wanjiru", "--phone", "+254700000001"],
    "hes customers list": ["customers", "list"],
    "hes customers show": ["customers", "show", "1"],
    "hes meters add": ["meters", "add", "M-1", "--endpoint", "tcp://127.0.0.1:1/1"],
    "hes meters import": ["meters", "import", "meters.csv"],
    "hes meters list": ["meters", "list"],
    "hes meters retire": ["meters", "retire", "M-1"],
    "hes meters show": ["meters", "show", "M-1"],
    "hes tariffs add": ["tariffs", "add", "T-1", "--price", "2500"],
    "hes tariffs list": ["tariffs", "list"],
    "hes tariffs show": ["tariffs", "show", "T-1"],
    "hes poll": ["poll", "--once"],
    # an empty database: were a bad value accepted, serve would stop at once (schema behind)
    "hes serve": ["serve", "--interval", "60", "--db", "sqlite:///empty.db"],
    "hes audit verify": ["audit", "verify"],
    "hes audit show": ["audit", "show"],
    "hes notices list": ["notices", "list"],
    "hes policy explain": ["policy", "explain", "M-1"],
    "hes policy dry-run": ["policy", "dry-run"],
    "hes status": ["status"],
    "hes readings": ["readings", "M-1"],
    "hes channels add": ["channels", "add", "COUNTER-1", "--kind", "counter"],
    "hes channels list": ["channels", "list"],
    "hes keypad add": ["keypad", "add", "M-1", *KEY],
    "hes keypad rotate": ["keypad", "rotate", "M-1", "--vending-key", "abababababababab"],
    "hes quote": ["quote", "--meter", "M-1", "--amount", "100.00"],
    "hes pay": ["pay", "--channel", "C-1", "--ref", "R-1", "--meter", "M-1", "--amount", "1"],
    "hes payments list": ["payments", "list"],
    "hes payments show": ["payments", "show", "1"],
    "hes payments reverse": ["payments", "reverse", "1", "--reason", "typo"],
    "hes payments reprint": ["payments", "reprint", "1"],
    "hes payments attempts": ["payments", "attempts"],
    "hes bills make": ["bills", "make", "--month", "2026-11"],
    "hes bills show": ["bills", "show", "A-1", "--month", "2026-11"],
    "hes reconcile": ["reconcile", "--channel", "C-1", "--date", "2026-11-03", "settlement.csv"],
    "hes mandates add": [
        "mandates",
        "add",
        "A-1",
        "--channel",
        "AD-1",
        "--amount",
        "100.00",
        "--cap",
        "500.00",
    ],
    "hes mandates list": ["mandates", "list"],
    "hes mandates show": ["mandates", "show", "1"],
    "hes mandates cancel": ["mandates", "cancel", "1", "--reason", "moved"],
    # an empty database: were a bad value accepted, the API would not start (schema behind)
    "hes api": ["api", "--port", "0", "--db", "sqlite:///empty.db"],
    "hes transfers list": ["transfers", "list"],
    "hes transfers show": ["transfers", "show", "1"],
    "hes transfers deliver": ["transfers", "deliver", "--timeout", "1"],
}
#: values of the right form that an option refuses, where its range is checked by the command
#: rather than declared on the option; and the bad values of text options
BAD_VALUES: dict[str, list[str]] = {
    "--random": ["-1", "16"],
    "--new-base-date": ["2000"],
    "--config": ["missing.toml"],
    "--state-dir": ["a-file"],
    "--meter": ["NO-SUCH-METER"],
    "--for": ["soon", "-1h", "1e400s"],
    "--currency": ["kes"],
    "--modbus-host": ["256.0.0.1"],
    "--serial": ["/nonexistent/tty"],
    "--mqtt": ["bogus://x"],
    "--mqtt-prefix": ["a//b"],
    "--vending-key": ["xyz"],
    "--pan": ["12"],
    "--amount": ["lots", "-1"],
    "--issued-at": ["soon"],
    "--value": ["lots"],
    "--control": ["lamp"],
    "--new-vending-key": ["xyz"],
    "--fleet": ["missing.toml"],
    "--price": ["abc", "-1"],
    "--port": ["70000"],
    "--tls-port": ["70000"],
    "--days": ["0"],
    "--out": ["a-file"],
    "--prefix": ["a//b"],
    "--key": ["xyz"],
    "--broker": ["bogus://x"],
    "--workdir": ["a-file"],
    "--db": ["mysql://x@localhost/db", "sqlite:////no/such/dir/hes.db"],
    "--email": ["nope"],
    "--phone": ["12"],
    "--channel": ["fax"],
    "--language": ["fr"],
    "--account": ["bad id!"],
    "--endpoint": ["ftp://x/1"],
    "--tariff": ["NOPE"],
    "--credit-unit": ["gas"],
    "--integration": ["exact"],
    "--auth-key": ["xyz"],
    "--poll-group": ["bad group!"],
    "--from-fleet": ["missing.toml"],
    "--endpoint-base": ["ftp://x"],
    "--since": ["soon"],
    "--until": ["soon"],
    "--stale": ["soon"],
    "--state": ["lost"],
    "--friendly-hours": ["18-06", "25:00-06:00"],
    "--holiday": ["christmas"],
    "--friendly-day": ["8", "sunday"],
    "--utc-offset": ["3h"],
    "--at": ["soon"],
    "--clock-start": ["soon"],
    "--clock-at": ["soon"],
    "--worker": ["bad worker!"],
    "--group": ["a/b"],
    "--metrics-host": ["256.0.0.1"],
    "--api-host": ["256.0.0.1"],
    "--host": ["256.0.0.1"],
    "--metrics-port": ["70000"],
    "--sms-gateway": ["ftp://x"],
    "--sms-token": [""],
    "--smtp": ["mail"],
    "--mail-from": [""],
    "--webhook": ["ftp://x"],
    "--webhook-secret": [""],
    "--notices-file": ["/no/such/dir/n.jsonl"],
    "--grace": ["soon"],
    "--reason": ["", "  "],
    "--deadline": ["soon", "0s"],
    "--actor": ["", " "],
    "--kind": ["fax"],
    "--ref": [""],
    "--payer": [""],
    "--block": ["abc", "50"],
    "--vat": ["x", "101", "7.125"],
    "--debt-share": ["x", "101"],
    "--junit": ["/no/such/dir/report.xml"],
    "--capture": ["/no/such/dir/frames.csv"],
    "--faults": ["drop=2", "dorp=0.1", "delay=gauss:1", "drop=0.6,corrupt=0.6", "drop"],
    "--month": ["soon", "2026-13"],
    "--date": ["soon", "2026-11-31"],
    "--mode": ["weekly"],
    "--cap": ["lots", "-1"],
    "--tax-id": ["", "has space"],
}
RIG_SCENARIO = """
[rig]
duration = "1s"

[[meters]]
id = "M-1"

[[expect]]
kind = "relay"
meter = "M-1"
state = "closed"
"""
#: options whose every text is a valid value (names, labels)
FREE_TEXT = frozenset({"--serial", "--customer"})
NUMBERS = (int, float)


def _commands(group: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    for name, command in sorted(group.commands.items()):
        if hasattr(command, "commands"):
            yield from _commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def _options() -> Iterator[tuple[str, Any]]:
    for name, app in (("meter-sim", meter_sim.app), ("hes", hes.app)):
        for command_name, command in _commands(typer.main.get_command(app), name):
            ctx = command.make_context(command_name, [], resilient_parsing=True)
            for param in command.get_params(ctx):
                is_option = param.param_type_name == "option" and param.name != "help"
                if is_option and not param.is_flag and not param.count:
                    yield command_name, param


def _annotation(param: Any) -> Any:
    kind = param.type_descriptor.annotation
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is not None and len(args) == 1 and get_origin(kind) is not list:
        return args[0]  # X | None
    return kind


def _option_cases() -> Iterator[Any]:
    for command, param in _options():
        option = max(param.opts, key=len)
        if option in FREE_TEXT:
            continue
        kind = _annotation(param)
        bad: list[str] = list(BAD_VALUES.get(option, []))
        if kind in NUMBERS:
            yield pytest.param(command, option, "abc", id=f"{command} {option}-type")
            if param.min is not None:
                bad.append(str(param.min - 1))
            if param.max is not None:
                bad.append(str(param.max + 1))
        elif get_origin(kind) is Literal:
            bad.append("nope")
        assert bad, f"{command} {option}: no bad value to try"
        for n, value in enumerate(bad):
            yield pytest.param(command, option, value, id=f"{command} {option}-bad{n}")


@pytest.mark.parametrize(("command", "option", "value"), list(_option_cases()))
def test_every_option_refuses_a_bad_value(
    workdir: Path, current_db: Path, command: str, option: str, value: str
) -> None:
    (workdir / "a-file").write_text("")
    if command.startswith("hes "):
        shutil.copyfile(current_db, workdir / "hes.db")  # ./hes.db, current
        (workdir / "meters.csv").write_text("meter_id,endpoint\nM-1,tcp://127.0.0.1:1/1\n")
        (workdir / "settlement.csv").write_text("reference,amount,currency,paid_at\n")
        (workdir / "fleet.toml").write_text('[mqtt]\npassword_secret = "' + "ab" * 32 + '"\n'
                                            '[[meters]]\nid = "M-1"\n')  # fmt: skip
    if command.startswith("meter-sim rig"):
        (workdir / "scenario.toml").write_text(RIG_SCENARIO)
    app = meter_sim.app if command.startswith("meter-sim") else hes.app
    args = [*BASE[command], option, value]
    result = runner.invoke(app, args, input="quit\n")
    assert result.exit_code in (1, 2), (args, result.output)
    line = _one_line(result.output)
    assert line.startswith("error: "), line
    key = option.lstrip("-").replace("-", "_")  # the same setting in a file: auth_key
    assert option in line or value in line or key in line, line


def test_every_command_has_a_base_command_line() -> None:
    assert {command for command, _ in _options()} <= set(BASE)
