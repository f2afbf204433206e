"""The scenario file of a hardware-in-the-loop rig (TOML): the line, the meters on it, a
timeline of steps and the expectations about the master (docs/hil.md has the reference, which
:func:`render_reference` generates from the tables below).

Validation is msgspec's against the structs below (unknown keys, types, ranges, required
keys), then the checks that span keys (a meter a step names is on the line, unit ids differ).
Every refusal is one :class:`~protocols.errors.ConfigError` naming the file, the line and the
key: tomllib gives no line numbers, so :class:`KeyLines` finds each key's line in the text.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType, field

from meter_sim.config import (
    MAX_AMOUNT,
    FleetConfig,
    MeterConfig,
    fleet_from_mapping,
    load_fleet,
    parse_seconds,
)
from protocols import registermap as rm
from protocols.errors import ConfigError

MAX_SECONDS = 30 * 86400.0
MAX_WATTS = 1_000_000


class Seconds:
    """A duration from the file: a number of seconds or a string such as ``"250ms"``,
    ``"2s"``, ``"15m"``, ``"1h"``, ``"2d"`` (0 to 30 days)."""

    __slots__ = ("value",)

    def __init__(self, value: float) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Seconds({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Seconds) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def parse(cls, raw: object) -> Seconds:
        return cls(parse_seconds(raw, MAX_SECONDS))


def _dec_hook(kind: type, raw: Any) -> Any:
    if kind is Seconds:
        return Seconds.parse(raw)
    raise NotImplementedError(f"no decoder for {kind}")  # pragma: no cover - schema types only


def _zero() -> Seconds:
    return Seconds(0.0)


MeterId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Count = Annotated[int, Meta(ge=1, le=1_000_000)]
Unit = Annotated[int, Meta(ge=1, le=247)]
CommandName = Literal[
    "any",
    "remote_disconnect",
    "remote_reconnect",
    "credit_transfer",
    "set_clock",
    "set_low_credit_threshold",
    "set_control_mode",
    "invoke_emergency_credit",
    "clear_tamper",
    "enter_token",
]
BlockName = Literal[
    "identification",
    "measurements",
    "account",
    "status",
    "floats",
    "settings",
    "command",
    "result",
    "profile_window",
    "event_window",
    "token_gateway",
]


class RigTable(Struct, forbid_unknown_fields=True, frozen=True):
    duration: Seconds
    name: str = ""
    speed: Annotated[float, Meta(gt=0, le=1e6)] = 1.0
    start: datetime = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    fleet: str | UnsetType = UNSET
    response_delay: Seconds = field(default_factory=_zero)
    strict_gaps: bool = True
    tick: Seconds = field(default_factory=lambda: Seconds(0.1))


# -- steps --------------------------------------------------------------------------------------


class _Step(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, tag_field="action"):
    at: Seconds = field(default_factory=_zero)
    at_sim: Seconds | UnsetType = UNSET


class SetLoad(_Step, frozen=True, tag="set_load"):
    meter: MeterId
    watts: Annotated[int, Meta(ge=0, le=MAX_WATTS)]


class Advance(_Step, frozen=True, tag="advance"):
    by: Seconds


class Jump(_Step, frozen=True, tag="jump"):
    to: datetime


class PowerCut(_Step, frozen=True, tag="power_cut"):
    meter: MeterId
    lasting: Seconds | UnsetType = field(default=UNSET, name="for")
    after_command: CommandName | UnsetType = UNSET


class PowerRestore(_Step, frozen=True, tag="power_restore"):
    meter: MeterId


class Tamper(_Step, frozen=True, tag="tamper"):
    meter: MeterId


class RunDown(_Step, frozen=True, tag="run_down"):
    meter: MeterId
    to: Annotated[int, Meta(ge=0, le=MAX_AMOUNT)] = 0
    watts: Annotated[int, Meta(ge=1, le=MAX_WATTS)] = 10_000


class StuckRelay(_Step, frozen=True, tag="stuck_relay"):
    meter: MeterId
    stuck: bool = True


class Fault(_Step, frozen=True):
    meter: MeterId | UnsetType = UNSET
    count: Count = 1


class Drop(Fault, frozen=True, tag="drop"):
    pass


class Late(Fault, frozen=True, tag="late"):
    delay: Seconds = field(default_factory=lambda: Seconds(2.0))


class CorruptCrc(Fault, frozen=True, tag="corrupt_crc"):
    pass


class ExceptionAnswer(Fault, frozen=True, tag="exception"):
    code: Annotated[int, Meta(ge=1, le=255)] = 6


class Gaps(Fault, frozen=True, tag="gaps"):
    chars: Annotated[float, Meta(gt=1.5, le=100)] = 2.5


class Noise(Fault, frozen=True, tag="noise"):
    length: Annotated[int, Meta(ge=1, le=256)] = 4
    seed: Annotated[int, Meta(ge=0)] = 0


class WrongUnit(Fault, frozen=True, tag="wrong_unit"):
    unit: Unit | UnsetType = UNSET


Step = (
    SetLoad
    | Advance
    | Jump
    | PowerCut
    | PowerRestore
    | Tamper
    | RunDown
    | StuckRelay
    | Drop
    | Late
    | CorruptCrc
    | ExceptionAnswer
    | Gaps
    | Noise
    | WrongUnit
)
STEP_TYPES: tuple[type[_Step], ...] = get_args(Step)
FAULT_TYPES = tuple(t for t in STEP_TYPES if issubclass(t, Fault))

# -- expectations -------------------------------------------------------------------------------


class _Expect(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True, tag_field="kind"):
    name: str = ""
    after: Seconds = field(default_factory=_zero)


class _Wrote(_Expect, frozen=True):
    meter: MeterId
    within: Seconds = field(default_factory=lambda: Seconds(MAX_SECONDS))


class ExpectTopup(_Wrote, frozen=True, tag="topup"):
    amount: Annotated[int, Meta(ge=1, le=MAX_AMOUNT)] | UnsetType = UNSET


class ExpectDisconnect(_Wrote, frozen=True, tag="disconnect"):
    pass


class ExpectReconnect(_Wrote, frozen=True, tag="reconnect"):
    pass


class ExpectCreditRose(_Expect, frozen=True, tag="credit_rose"):
    meter: MeterId
    amount: Annotated[int, Meta(ge=0, le=MAX_AMOUNT)]


class ExpectRelay(_Expect, frozen=True, tag="relay"):
    meter: MeterId
    state: Literal["open", "closed"] = "open"
    at: Seconds | UnsetType = UNSET


class ExpectOnce(_Expect, frozen=True, tag="once"):
    meter: MeterId | UnsetType = UNSET


class ExpectReadEvery(_Expect, frozen=True, tag="read_every"):
    meter: MeterId
    block: BlockName
    period: Seconds
    until: Seconds | UnsetType = UNSET


class ExpectRecovered(_Expect, frozen=True, tag="recovered"):
    meter: MeterId
    within: Seconds = field(default_factory=lambda: Seconds(5.0))


Expectation = (
    ExpectTopup
    | ExpectDisconnect
    | ExpectReconnect
    | ExpectCreditRose
    | ExpectRelay
    | ExpectOnce
    | ExpectReadEvery
    | ExpectRecovered
)
EXPECT_TYPES: tuple[type[_Expect], ...] = get_args(Expectation)


class ScenarioTable(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    rig: RigTable
    meters: list[dict[str, Any]] | UnsetType = UNSET
    defaults: dict[str, Any] | UnsetType = UNSET
    expect: Annotated[list[Expectation], Meta(min_length=1)]
    steps: list[Step] = []


@dataclass(frozen=True, slots=True)
class Scenario:
    """A validated scenario: its tables, and the meters on the line."""

    path: Path | None
    rig: RigTable
    meters: tuple[MeterConfig, ...]
    steps: tuple[Step, ...]
    expectations: tuple[Expectation, ...]

    @property
    def name(self) -> str:
        return self.rig.name or (self.path.stem if self.path is not None else "scenario")

    def meter(self, meter_id: str) -> MeterConfig:
        for meter in self.meters:
            if meter.meter_id == meter_id:
                return meter
        raise KeyError(meter_id)  # pragma: no cover - validated on load


# -- where a key is ------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _names(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in dotted.split(".")]


class KeyLines:
    """The line of each key and table of a TOML text, by path (``steps[2].count``).

    A path not found (a key inside an inline table, a key that is missing) is placed at the
    nearest enclosing key or table that is found."""

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        arrays: dict[str, int] = {}  # array-of-tables path -> index of its last element
        table = ""
        for number, line in enumerate(text.splitlines(), 1):
            header = _HEADER.match(line)
            if header is not None:
                names = _names(header[2])
                table = self._resolve(names[:-1], arrays)
                table = f"{table}.{names[-1]}" if table else names[-1]
                if header[1] != "[[" and table in arrays:  # [a] after [[a]]: not TOML, kept
                    table = f"{table}[{arrays[table]}]"
                if header[1] == "[[":
                    arrays[table] = arrays.get(table, -1) + 1
                    table = f"{table}[{arrays[table]}]"
                self.lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if key is not None:
                path = ".".join(filter(None, [table, *_names(key[1])]))
                self.lines.setdefault(path, number)

    @staticmethod
    def _resolve(names: list[str], arrays: dict[str, int]) -> str:
        path = ""
        for name in names:
            path = f"{path}.{name}" if path else name
            if path in arrays:
                path = f"{path}[{arrays[path]}]"
        return path

    def line(self, path: str) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return None


# -- loading ------------------------------------------------------------------------------------

_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


class _Refusal(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _from_msgspec(exc: msgspec.ValidationError) -> _Refusal:
    match = _MSGSPEC_PATH.match(str(exc))
    assert match is not None  # the pattern matches any text
    what, path = match["what"], (match["path"] or "").removeprefix(".")
    if found := re.match(r"Object contains unknown field `(.+)`", what):
        return _Refusal(_join(path, found[1]), "unknown key")
    if found := re.match(r"Object missing required field `(.+)`", what):
        if not path and found[1] == "expect":
            return _Refusal("expect", "give at least one [[expect]] entry")
        return _Refusal(_join(path, found[1]), "required key is missing")
    if found := re.match(r"Invalid value '(.+)'", what):
        tag = path.rsplit(".", 1)[-1]
        names = _tags(STEP_TYPES if tag == "action" else EXPECT_TYPES)
        return _Refusal(path, f"{found[1]!r} is not one of {', '.join(names)}")
    if found := re.match(r"Expected `([^`]+)`, got `([^`]+)`", what):
        expected = found[1].replace(" | ", " or ").replace("object", "table")
        return _Refusal(path, f"expected {expected}, got {found[2]}")
    if found := re.match(r"Expected `(?:int|float)` (.+)", what):
        return _Refusal(path, "must be " + re.sub(r"(\d)\.0\b", r"\1", found[1]))
    if found := re.match(r"Invalid enum value (.+)", what):
        return _Refusal(path, f"{found[1]} is not allowed")
    if what.startswith("Expected `str` matching regex"):
        return _Refusal(path, "must be letters, digits, _ . - (1 to 64)")
    if found := re.match(r"Expected `array` of length >= 1", what):
        return _Refusal(path, "give at least one [[expect]] entry")
    return _Refusal(path, what[:1].lower() + what[1:])


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _tags(types: tuple[type[Any], ...]) -> list[str]:
    return [str(t.__struct_config__.tag) for t in types]


def _meters(raw: dict[str, Any], document: ScenarioTable, base: Path | None) -> list[MeterConfig]:
    meters: list[MeterConfig] = []
    if document.rig.fleet is not UNSET:
        fleet_path = Path(document.rig.fleet)
        if base is not None and not fleet_path.is_absolute():
            fleet_path = base / fleet_path
        try:
            meters += load_fleet(fleet_path).meters
        except ConfigError as exc:
            raise _Refusal("rig.fleet", str(exc)) from exc
    if document.meters is not UNSET:
        mapping: dict[str, Any] = {"meters": raw["meters"]}
        if document.defaults is not UNSET:
            mapping["defaults"] = raw["defaults"]
        try:
            fleet: FleetConfig = fleet_from_mapping(mapping)
        except ConfigError as exc:
            text = str(exc)
            path, _, message = text.partition(": ")
            raise _Refusal(path, message or text) from exc
        meters += fleet.meters
    elif document.defaults is not UNSET:
        raise _Refusal("defaults", "[defaults] applies to inline [[meters]]; there are none")
    if not meters:
        raise _Refusal("rig.fleet", "no meters on the line: give rig.fleet or [[meters]]")
    seen: dict[str, int] = {}
    units: dict[int, str] = {}
    for index, meter in enumerate(meters):
        if meter.meter_id in seen:
            raise _Refusal(f"meters[{index}].id", f"meter {meter.meter_id} is on the line twice")
        seen[meter.meter_id] = index
        other = units.get(meter.modbus_unit)
        if other is not None:
            raise _Refusal(
                f"meters[{index}].modbus_unit",
                f"{meter.meter_id} and {other} share unit id {meter.modbus_unit} on one line",
            )
        units[meter.modbus_unit] = meter.meter_id
    return meters


def _check_references(document: ScenarioTable, meters: list[MeterConfig]) -> None:
    ids = {meter.meter_id for meter in meters}
    for section, entries in (("steps", document.steps), ("expect", document.expect)):
        for index, entry in enumerate(entries):
            meter = getattr(entry, "meter", UNSET)
            if meter is not UNSET and meter not in ids:
                raise _Refusal(
                    f"{section}[{index}].meter",
                    f"no meter {meter!r} on the line (there are {', '.join(sorted(ids))})",
                )
    last = 0.0
    for index, step in enumerate(document.steps):
        if step.at.value < last:
            raise _Refusal(
                f"steps[{index}].at", "steps run in file order: each at no earlier than the last"
            )
        last = step.at.value
        if step.at.value > document.rig.duration.value:
            raise _Refusal(f"steps[{index}].at", "after the end of the run (rig.duration)")
    for index, expectation in enumerate(document.expect):
        if expectation.after.value > document.rig.duration.value:
            raise _Refusal(f"expect[{index}].after", "after the end of the run (rig.duration)")


def scenario_from_text(text: str, path: Path | None = None) -> Scenario:
    """Parse and validate a scenario; ConfigError ``FILE:LINE: KEY: what is wrong``."""
    where = str(path) if path is not None else "scenario"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    lines = KeyLines(text)
    try:
        try:
            document = msgspec.convert(raw, ScenarioTable, strict=True, dec_hook=_dec_hook)
        except msgspec.ValidationError as exc:
            raise _from_msgspec(exc) from exc
        meters = _meters(raw, document, path.parent if path is not None else None)
        _check_references(document, meters)
    except _Refusal as refusal:
        line = lines.line(refusal.path)
        at = f"{where}:{line}" if line is not None else where
        raise ConfigError(f"{at}: {refusal.path or 'the file'}: {refusal.message}") from refusal
    return Scenario(
        path, document.rig, tuple(meters), tuple(document.steps), tuple(document.expect)
    )


def load_scenario(path: Path) -> Scenario:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from exc
    return scenario_from_text(text, path)


def start_time(rig: RigTable) -> float:
    start = rig.start if rig.start.tzinfo is not None else rig.start.replace(tzinfo=UTC)
    return start.timestamp()


def block_span(block: str) -> rm.BlockSpec:
    return rm.BLOCKS[rm.Block(block)]


# -- reference: generated into docs/hil.md --------------------------------------------------------

#: (struct, key) -> meaning; a test checks every key of every table is described
KEY_DOCS: dict[tuple[str, str], str] = {
    ("rig", "duration"): "How long the run lasts, in real time; the expectations are judged then.",
    ("rig", "name"): "The scenario's name in the reports (default: the file's name).",
    ("rig", "speed"): "Simulated seconds per real second.",
    ("rig", "start"): "Simulated time when the run starts (a Monday morning, outside the "
    "default friendly hours).",
    ("rig", "fleet"): "A fleet file (relative to the scenario) whose meters are on the line.",
    ("rig", "response_delay"): "Wait before every answer (on top of a late fault).",
    ("rig", "strict_gaps"): "Discard a received frame with a gap of more than 1.5 characters "
    "inside it (`false` for USB adapters that deliver bytes in bursts).",
    ("rig", "tick"): "Real time between two advances of the meters.",
    ("step", "at"): "Real time after the start when the step runs; steps run in file order.",
    ("step", "at_sim"): "Also wait until this much simulated time has passed since the start.",
    ("step", "meter"): "The meter (its id); for a line fault: only answers of this meter "
    "(default: any meter on the line).",
    ("step", "count"): "How many answers the fault spoils, one after the other.",
    ("set_load", "watts"): "The meter's load from now on (a constant load).",
    ("advance", "by"): "Move the simulated clock forward by this much at once; the meters "
    "integrate their load over it.",
    ("jump", "to"): "Move the simulated clock forward to this time (never back).",
    ("power_cut", "for"): "Restore power by itself after this real time (else a "
    "`power_restore` step does).",
    ("power_cut", "after_command"): "Arm the cut instead: the next command of this kind (or "
    "`any`) is executed and saved, then power fails before the answer goes out.",
    ("run_down", "to"): "Run until the available credit is at most this (account unit).",
    ("run_down", "watts"): "The load drawn meanwhile; the clock jumps in one-minute steps "
    "until the credit is down, then the load before it is restored.",
    ("stuck_relay", "stuck"): "`true`: the contactor welds (commanded open, the supply stays "
    "on, event `relay_welded`); `false`: it is mended.",
    ("late", "delay"): "How late each answer is (past the master's time-out to lose it).",
    ("exception", "code"): "The exception code answered instead of executing the request "
    "(6: server busy).",
    ("gaps", "chars"): "Gap inside each answer, in characters (a conforming master discards a "
    "frame with a gap above 1.5).",
    ("noise", "length"): "Random bytes sent just before each answer.",
    ("noise", "seed"): "Seed of the noise bytes.",
    ("wrong_unit", "unit"): "The unit id the answer carries (default: the meter's + 1).",
    ("expect", "name"): "The test case's name in the reports (default: generated).",
    ("expect", "after"): "Real time after the start when the expectation's window opens.",
    ("expect", "meter"): "The meter (its id).",
    ("expect", "within"): "Real time after `after` by which it must have happened.",
    ("topup", "amount"): "The amount the credit transfer must carry (default: any).",
    ("credit_rose", "amount"): "Top-ups the meter applied during the run, in total, exactly.",
    ("relay", "state"): "`open` (supply off) or `closed` (supply on).",
    ("relay", "at"): "When to look, real time after the start (default: at the end).",
    ("once", "meter"): "Only this meter (default: every meter).",
    ("read_every", "block"): "The register block (docs/register-map.md) that must be read.",
    ("read_every", "period"): "Longest real time between two successful reads of it.",
    ("read_every", "until"): "End of the window (default: the end of the run).",
    ("recovered", "within"): "Real time after each fault on this meter ended by which the "
    "master read it successfully again.",
}

STEP_TEXT: dict[str, str] = {
    "set_load": "Set a meter's load.",
    "advance": "Advance the simulated clock.",
    "jump": "Jump the simulated clock to a time.",
    "power_cut": "Cut a meter's power: it falls silent; on restore it boots from its saved "
    "state and logs power_down and power_up.",
    "power_restore": "Restore a meter's power.",
    "tamper": "Open the terminal cover (event tamper_detected, status bit tamper).",
    "run_down": "Run a meter's credit down (it disconnects itself if its settings say so).",
    "stuck_relay": "Weld (or mend) a meter's contactor.",
    "drop": "Execute the next requests but send no answer.",
    "late": "Answer the next requests late.",
    "corrupt_crc": "Answer the next requests with a wrong CRC.",
    "exception": "Answer the next requests with an exception, without executing them.",
    "gaps": "Send the next answers with a gap inside.",
    "noise": "Send noise bytes just before the next answers.",
    "wrong_unit": "Answer the next requests from another unit id.",
}

EXPECT_TEXT: dict[str, str] = {
    "topup": "Within the window the master wrote a credit transfer to the meter (cmd_go).",
    "disconnect": "Within the window the master wrote a remote disconnect to the meter.",
    "reconnect": "Within the window the master wrote a remote reconnect to the meter.",
    "credit_rose": "The meter's applied top-ups over the run add up to exactly `amount`.",
    "relay": "The meter's relay output is open or closed (at the end, or at `at`).",
    "once": "No command ran twice: no two commands the meter executed as new carry the same "
    "code and arguments (a top-up re-sent under a new transfer number after a lost answer "
    "does); retries of one sequence number are answered from the meter's memory and do not "
    "count.",
    "read_every": "The block was read successfully at least every `period` in the window.",
    "recovered": "After every fault on the meter ended (the last spoiled answer, or power "
    "back), the master read it successfully again within `within`.",
}


def _type_text(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not UnsetType]
    if get_origin(hint) is not None and args and get_origin(hint) is not Literal:
        if get_origin(hint) is Annotated:
            return _type_text(args[0])
        return " or ".join(_type_text(a) for a in args)
    if get_origin(hint) is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if hint is Seconds:
        return "duration"
    if hint is datetime:
        return "date-time"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(hint, str(hint))


def _bounds(hint: Any) -> str:
    for arg in get_args(hint):
        if isinstance(arg, Meta):
            parts = []
            for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                value = getattr(arg, name)
                if value is not None:
                    shown = f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
                    parts.append(f"{sign} {shown}")
            return ", ".join(parts)
        inner = _bounds(arg)
        if inner:
            return inner
    return ""


def _default_text(struct: type[Any], name: str, kind: type[Any]) -> str:
    info = msgspec.structs.fields(struct)
    for item in info:
        if item.name == name:
            if item.required:
                return "required"
            value = (
                item.default if item.default is not msgspec.NODEFAULT else item.default_factory()
            )
            if value is UNSET:
                return ""
            if isinstance(value, Seconds):
                return f"`{value.value:g} s`"
            if isinstance(value, datetime):
                return f"`{value.isoformat().replace('+00:00', 'Z')}`"
            if isinstance(value, bool):
                return f"`{str(value).lower()}`"
            return f"`{value!r}`" if value != "" else ""
    return ""  # pragma: no cover


def _rows(struct: type[Any], section: str, skip: set[str]) -> Iterator[str]:
    hints = get_type_hints(struct, include_extras=True)
    for item in msgspec.structs.fields(struct):
        if item.name in skip:
            continue
        key = item.encode_name
        text = KEY_DOCS.get((section, key)) or KEY_DOCS.get(
            ("step" if issubclass(struct, _Step) else "expect", key), ""
        )
        bounds = _bounds(hints[item.name])
        kind = _type_text(hints[item.name]) + (f" ({bounds})" if bounds else "")
        yield f"| `{key}` | {kind} | {_default_text(struct, item.name, struct)} | {text} |"


def documented_keys() -> set[tuple[str, str]]:
    """(section, key) of every key the reference lists, for the completeness test."""
    out: set[tuple[str, str]] = {("rig", f.encode_name) for f in msgspec.structs.fields(RigTable)}
    for kind in (*STEP_TYPES, *EXPECT_TYPES):
        tag = str(kind.__struct_config__.tag)
        out |= {(tag, f.encode_name) for f in msgspec.structs.fields(kind)}
    return out


def render_reference(level: str = "##") -> str:
    """The scenario reference (Markdown), from the structs above."""
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines = [
        f"{level} Scenario reference",
        "",
        "A scenario has a `[rig]` table, the meters on the line (`rig.fleet`, and/or inline "
        "`[[meters]]` entries with an optional `[defaults]` table, both with the keys of a "
        "fleet file's, see [configuration](configuration.md)), `[[steps]]` (each with an "
        "`action`) and at least one `[[expect]]` (each with a `kind`). Durations are a number "
        "of seconds or a string such as `250ms`, `2s`, `15m`, `1h`, `2d`. An invalid file is "
        "refused with its line and key: `scenario.toml:12: steps[1].count: must be >= 1`.",
        "",
        f"{level}# `[rig]`",
        "",
        *head,
        *_rows(RigTable, "rig", set()),
        "",
        f"{level}# Steps (`[[steps]]`, by `action`)",
        "",
        "Every step takes `at` and `at_sim`. Line faults (`drop`, `late`, `corrupt_crc`, "
        "`exception`, `gaps`, `noise`, `wrong_unit`) take `meter` (optional) and `count`; a "
        "fault armed while another is pending on the same answers waits for it.",
        "",
    ]
    common = {"at", "at_sim"}
    for kind in STEP_TYPES:
        tag = str(kind.__struct_config__.tag)
        lines += [f"**`{tag}`**: {STEP_TEXT[tag]}", ""]
        rows = list(_rows(kind, tag, common))
        lines += [*head, *rows, ""] if rows else []
    lines += [
        f"{level}# Expectations (`[[expect]]`, by `kind`)",
        "",
        "Every expectation takes `name` and `after`. Each is one test case in the JUnit "
        "report; a failure says what was expected and what was seen.",
        "",
    ]
    for expect_kind in EXPECT_TYPES:
        tag = str(expect_kind.__struct_config__.tag)
        lines += [f"**`{tag}`**: {EXPECT_TEXT[tag]}", ""]
        rows = list(_rows(expect_kind, tag, {"name", "after"}))
        lines += [*head, *rows, ""] if rows else []
    return "\n".join(lines)
