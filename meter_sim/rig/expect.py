"""The expectations of a scenario, judged from a run's :class:`~meter_sim.rig.runner.Record`:
each gives a :class:`Verdict` whose message says what was expected and what was seen."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from msgspec import UNSET

from meter_sim.rig import scenario as sc
from meter_sim.rig.faults import Exchange
from meter_sim.rig.runner import CommandRecord, Record
from protocols import registermap as rm
from protocols.commands import COMMAND_ARGS, CommandCode, ResultCode


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    kind: str
    passed: bool
    message: str


def _kind(expectation: sc.Expectation) -> str:
    return str(type(expectation).__struct_config__.tag)


def default_name(expectation: sc.Expectation) -> str:
    if expectation.name:
        return expectation.name
    kind = _kind(expectation)
    meter = getattr(expectation, "meter", UNSET)
    parts = [kind, meter if isinstance(meter, str) else "every meter"]
    if isinstance(expectation, sc.ExpectTopup | sc.ExpectDisconnect | sc.ExpectReconnect):
        parts.append(f"within {expectation.within.value:g} s")
    elif isinstance(expectation, sc.ExpectCreditRose):
        parts.append(f"by {expectation.amount}")
    elif isinstance(expectation, sc.ExpectRelay):
        parts.append(expectation.state)
    elif isinstance(expectation, sc.ExpectReadEvery):
        parts.append(f"{expectation.block} every {expectation.period.value:g} s")
    elif isinstance(expectation, sc.ExpectRecovered):
        parts.append(f"within {expectation.within.value:g} s")
    return " ".join(parts)


def _s(value: float) -> str:
    return f"{value:.2f} s"


_WROTE: dict[type[Any], CommandCode] = {
    sc.ExpectTopup: CommandCode.CREDIT_TRANSFER,
    sc.ExpectDisconnect: CommandCode.REMOTE_DISCONNECT,
    sc.ExpectReconnect: CommandCode.REMOTE_RECONNECT,
}


def _describe(command: CommandRecord) -> str:
    args = command.envelope.command.args
    shown = ", ".join(f"{k} {v}" for k, v in sorted(_args(command).items()))
    shown = f" ({shown})" if args else ""
    return (
        f"{command.name}{shown} seq {command.envelope.sequence} at {_s(command.at)}: "
        f"{command.result.code.name.lower()}"
    )


def _args(command: CommandRecord) -> dict[str, Any]:
    specs = COMMAND_ARGS[command.envelope.command.code]
    return {
        spec.name: value for spec, value in zip(specs, command.envelope.command.args, strict=True)
    }


def _wrote(expectation: Any, record: Record) -> tuple[bool, str]:
    code = _WROTE[type(expectation)]
    start = expectation.after.value
    end = start + expectation.within.value
    mine = [c for c in record.commands if c.meter_id == expectation.meter]
    hits = [
        c
        for c in mine
        if c.envelope.command.code is code
        and start <= c.at <= end
        and (
            not isinstance(expectation, sc.ExpectTopup)
            or expectation.amount is UNSET
            or _args(c).get("amount") == expectation.amount
        )
    ]
    amount = (
        f" of {expectation.amount}"
        if isinstance(expectation, sc.ExpectTopup) and expectation.amount is not UNSET
        else ""
    )
    wanted = (
        f"a {code.name.lower()}{amount} written to {expectation.meter} between {_s(start)} "
        f"and {_s(min(end, record.elapsed))}"
    )
    if hits:
        return True, f"{wanted}: {_describe(hits[0])}"
    seen = "; ".join(_describe(c) for c in mine[:5]) or "no command at all"
    return False, f"expected {wanted}; saw {seen}"


def _credit_rose(expectation: sc.ExpectCreditRose, record: Record) -> tuple[bool, str]:
    meter = expectation.meter
    rose = record.topups_at_end[meter] - record.topups_at_start[meter]
    applied = record.applied.get(meter, [])
    shown = ", ".join(f"transfer {t}: {a}" for t, a in applied) or "no top-up applied"
    if rose == expectation.amount:
        return True, f"{meter}'s credit rose by {rose} ({shown})"
    return False, (
        f"expected {meter}'s credit to rise by exactly {expectation.amount} in top-ups; "
        f"it rose by {rose} ({shown})"
    )


def _relay(expectation: sc.ExpectRelay, record: Record) -> tuple[bool, str]:
    meter = expectation.meter
    if expectation.at is UNSET:
        on = record.relay_at_end[meter]
        when = "at the end"
    else:
        sample = record.relay_samples.get((meter, expectation.at.value))
        if sample is None:
            return False, f"the run ended before {_s(expectation.at.value)}: relay not seen"
        on = sample
        when = f"at {_s(expectation.at.value)}"
    state = "closed" if on else "open"
    if state == expectation.state:
        return True, f"{meter}'s relay output was {state} {when}"
    return False, f"expected {meter}'s relay output {expectation.state} {when}; it was {state}"


def _once(expectation: sc.ExpectOnce, record: Record) -> tuple[bool, str]:
    runs: dict[tuple[str, int, tuple[tuple[str, Any], ...]], list[CommandRecord]] = {}
    retries = 0
    for command in record.commands:
        if expectation.meter is not UNSET and command.meter_id != expectation.meter:
            continue
        if not command.new:
            retries += 1
            continue
        if command.result.code is not ResultCode.OK:
            continue
        args = tuple(sorted((k, v) for k, v in _args(command).items() if k != "transfer"))
        key = (command.meter_id, int(command.envelope.command.code), args)
        runs.setdefault(key, []).append(command)
    twice = [commands for commands in runs.values() if len(commands) > 1]
    executed = sum(len(commands) for commands in runs.values())
    if not twice:
        return True, f"{executed} command(s) ran once each; {retries} retry(ies) not run again"
    first = twice[0]
    shown = "; ".join(_describe(c) for c in first)
    return False, f"expected no command to run twice; {first[0].meter_id} ran: {shown}"


def _reads(record: Record, unit: int, block: rm.BlockSpec) -> list[Exchange]:
    return [
        x
        for x in record.line.exchanges
        if x.unit == unit
        and x.ok
        and x.table is block.table
        and x.address < block.end
        and x.address + x.count > block.start
    ]


def _read_every(expectation: sc.ExpectReadEvery, record: Record) -> tuple[bool, str]:
    block = sc.block_span(expectation.block)
    start = expectation.after.value
    end = record.elapsed if expectation.until is UNSET else expectation.until.value
    end = min(end, record.elapsed)
    times = [
        x.answered_at
        for x in _reads(record, record.unit(expectation.meter), block)
        if x.answered_at is not None and start <= x.answered_at <= end
    ]
    marks = [start, *times, end]
    gap, at = max((b - a, a) for a, b in itertools.pairwise(marks))
    period = expectation.period.value
    wanted = (
        f"{expectation.block} of {expectation.meter} read at least every {period:g} s from "
        f"{_s(start)} to {_s(end)}"
    )
    if gap <= period:
        return True, f"{wanted}: {len(times)} reads, the longest gap {_s(gap)}"
    return False, (
        f"expected {wanted}; saw {len(times)} successful read(s), a gap of {_s(gap)} from {_s(at)}"
    )


def _recovered(expectation: sc.ExpectRecovered, record: Record) -> tuple[bool, str]:
    unit = record.unit(expectation.meter)
    ends = sorted(t for t in record.line.fault_ends.get(unit, []) if t >= expectation.after.value)
    if not ends:
        return False, f"expected a fault on {expectation.meter} to recover from; none ended"
    within = expectation.within.value
    good = [x.answered_at for x in record.line.exchanges if x.unit == unit and x.ok]
    worst = 0.0
    for end in ends:
        after = [t for t in good if t is not None and t >= end]
        if not after or after[0] - end > within:
            seen = f"the next good answer at {_s(after[0])}" if after else "no good answer"
            return False, (
                f"expected {expectation.meter} read successfully within {within:g} s after the "
                f"fault that ended at {_s(end)}; saw {seen}"
            )
        worst = max(worst, after[0] - end)
    return True, (
        f"{expectation.meter} read successfully again after {len(ends)} fault(s), at worst "
        f"{_s(worst)} after one ended"
    )


_JUDGES: dict[type[Any], Callable[[Any, Record], tuple[bool, str]]] = {
    sc.ExpectTopup: _wrote,
    sc.ExpectDisconnect: _wrote,
    sc.ExpectReconnect: _wrote,
    sc.ExpectCreditRose: _credit_rose,
    sc.ExpectRelay: _relay,
    sc.ExpectOnce: _once,
    sc.ExpectReadEvery: _read_every,
    sc.ExpectRecovered: _recovered,
}


def judge(record: Record) -> list[Verdict]:
    """A verdict for every expectation of the run's scenario, in file order."""
    out = []
    for expectation in record.scenario.expectations:
        passed, message = _JUDGES[type(expectation)](expectation, record)
        out.append(Verdict(default_name(expectation), _kind(expectation), passed, message))
    return out
