"""The in-memory link over a real firmware meter, and execute_confirmed under every fault it
injects: each command is executed exactly once, whatever is lost or spoilt on the way."""

from __future__ import annotations

import random

import pytest

from headend.links.base import MeterLink, RetryPolicy, execute_confirmed, send_command
from headend.links.memory import Fault, FaultPlan, MemoryLink
from meter_sim.config import MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import load_for
from protocols.clock import ManualClock
from protocols.commands import Command, CommandEnvelope, ResultCode
from protocols.errors import ConfigError, LinkTimeout, ValidationError
from protocols.readings import EventCode

START = 1_767_225_600.0
QUICK = RetryPolicy(backoff=0.001, max_backoff=0.004)
COMMANDS = 30
AMOUNT = 100


def _meter(meter_id: str = "MEM-0001") -> Meter:
    config = MeterConfig(meter_id, initial_credit=10_000)
    return Meter(config, START, load_for(config))


def _transfer(n: int, meter_id: str = "MEM-0001") -> CommandEnvelope:
    return CommandEnvelope(meter_id, n, Command.credit_transfer(n, AMOUNT))


def test_the_memory_link_is_a_meter_link() -> None:
    link: MeterLink = MemoryLink(_meter())
    assert link.meter_id == "MEM-0001"


async def test_reads_come_from_the_meter_itself() -> None:
    clock = ManualClock(START)
    meter = _meter()
    link = MemoryLink(meter, clock=clock)
    clock.advance(3600)
    snapshot = await link.read_snapshot()
    assert snapshot == meter.snapshot()
    assert snapshot.time == int(START + 3600)  # the link advanced the meter to the clock
    assert await link.read_profile(int(START), int(START) + 3600) == meter.profile_between(
        int(START), int(START) + 3600
    )
    assert await link.read_events(0) == meter.events_since(0)
    assert (await link.read_last_result()).code is ResultCode.NONE
    result = await send_command(link, Command.credit_transfer(1, 500), None, timeout=1.0)
    assert result.code is ResultCode.OK
    assert (await link.read_last_result()) == result
    assert (await link.read_events(0))[-1].code is EventCode.TOPUP_ACCEPTED


@pytest.mark.parametrize(
    "plan",
    [
        FaultPlan(drop_request=0.5, seed=1),
        FaultPlan(drop_answer=0.5, seed=2),
        FaultPlan(delay=0.5, delay_seconds=0.5, seed=3),  # later than the link waits
        FaultPlan(delay=0.5, delay_seconds=0.001, seed=4),  # late but in time
        FaultPlan(disconnect=0.5, seed=5),
        FaultPlan(drop_request=0.2, drop_answer=0.2, delay=0.1, disconnect=0.2, seed=6),
        FaultPlan(corrupt=0.5, seed=7),
        FaultPlan(drop_answer=0.2, disconnect=0.1, corrupt=0.3, seed=8),
    ],
    ids=[
        "drop-request",
        "drop-answer",
        "delay-too-long",
        "delay",
        "disconnect",
        "all",
        "corrupt",
        "corrupt-and-lost",
    ],
)
async def test_execute_confirmed_executes_each_command_exactly_once(plan: FaultPlan) -> None:
    meter = _meter()
    link = MemoryLink(meter, plan, timeout=0.01)
    before = meter.snapshot().credit
    for n in range(1, COMMANDS + 1):
        result = await execute_confirmed(
            link, _transfer(n), 5.0, policy=QUICK, rng=random.Random(n)
        )
        assert (result.sequence, result.code) == (n, ResultCode.OK)
    snapshot = meter.snapshot()
    assert snapshot.credit == before + COMMANDS * AMOUNT  # no transfer lost, none twice
    assert snapshot.last_transfer == COMMANDS
    topups = [e for e in meter.events_since(0, 1000) if e.code is EventCode.TOPUP_ACCEPTED]
    assert [e.a for e in topups] == list(range(1, COMMANDS + 1))
    assert not any(e.code is EventCode.REPLAY_REFUSED for e in meter.events_since(0, 1000))
    assert sum(link.faults.values()) > 0  # the faults did happen
    if plan.drop_answer or plan.corrupt or (plan.delay and plan.delay_seconds >= link.timeout):
        assert link.executed >= COMMANDS  # the meter saw some of them, answer lost, asked
    if plan.corrupt:
        assert link.faults[Fault.CORRUPT] > 0
    if plan.disconnect:
        assert link.connects > 1


async def test_a_lost_answer_is_asked_for_not_resent() -> None:
    meter = _meter()
    plan = FaultPlan(drop_answer=1.0, only=frozenset({"send"}))
    link = MemoryLink(meter, plan, timeout=0.01)
    result = await execute_confirmed(link, _transfer(1), 1.0, policy=QUICK)
    assert result.code is ResultCode.OK
    assert link.executed == 1  # sent once; the meter's last result confirmed it
    assert link.faults == {Fault.DROP_ANSWER: 1}


async def test_an_answer_that_does_not_decode_is_asked_for_not_taken_as_final() -> None:
    meter = _meter()
    plan = FaultPlan(corrupt=1.0, only=frozenset({"send"}))
    link = MemoryLink(meter, plan, timeout=0.01)
    result = await execute_confirmed(link, _transfer(1), 1.0, policy=QUICK)
    assert (result.sequence, result.code) == (1, ResultCode.OK)  # confirmed by the read-back
    assert link.executed == 1  # executed once, its answer spoilt, never resent
    assert link.faults == {Fault.CORRUPT: 1}
    assert meter.snapshot().last_transfer == 1


async def test_answers_that_never_decode_end_in_a_time_out_that_says_so() -> None:
    meter = _meter()
    before = meter.snapshot().credit
    link = MemoryLink(meter, FaultPlan(corrupt=1.0), timeout=0.01)
    with pytest.raises(LinkTimeout, match=r"no confirmation of command 1 .*does not decode"):
        await execute_confirmed(link, _transfer(1), 0.2, policy=QUICK)
    assert link.faults[Fault.CORRUPT] >= 3  # the send, the questions after it, any resend
    assert meter.snapshot().credit == before + AMOUNT  # executed, and once only
    assert meter.snapshot().last_transfer == 1


async def test_no_confirmation_within_the_deadline_is_a_time_out() -> None:
    meter = _meter()
    link = MemoryLink(meter, FaultPlan(drop_request=1.0), timeout=0.02)
    with pytest.raises(LinkTimeout, match=r"no confirmation of command 1 within 0\.2 s"):
        await execute_confirmed(link, _transfer(1), 0.2, policy=QUICK)
    assert link.executed == 0
    assert meter.snapshot().last_transfer == 0


async def test_an_envelope_for_another_meter_is_a_validation_error() -> None:
    link = MemoryLink(_meter())
    with pytest.raises(ValidationError, match="this link reaches MEM-0001"):
        await execute_confirmed(link, _transfer(1, "MEM-0002"))
    with pytest.raises(ValidationError):
        await link.send_envelope(_transfer(1, "MEM-0002"), 1.0)
    assert link.executed == 0


def test_fault_plans_are_checked_and_seeded() -> None:
    with pytest.raises(ConfigError):
        FaultPlan(drop_request=0.6, drop_answer=0.6)
    with pytest.raises(ConfigError):
        FaultPlan(delay=-0.1)
    plan = FaultPlan(drop_request=0.3, disconnect=0.3, seed=9)
    rng_a, rng_b = random.Random(plan.seed), random.Random(plan.seed)
    draws = [plan.draw(rng_a, "send") for _ in range(200)]
    assert draws == [plan.draw(rng_b, "send") for _ in range(200)]  # seeded: repeatable
    assert set(draws) == {None, Fault.DROP_REQUEST, Fault.DISCONNECT}
    assert draws.count(Fault.DROP_REQUEST) in range(40, 80)  # about 30 % of 200
    only = FaultPlan(drop_request=1.0, only=frozenset({"send"}))
    assert only.draw(rng_a, "snapshot") is None
    assert only.draw(rng_a, "send") is Fault.DROP_REQUEST


def test_retry_waits_grow_with_jitter_and_stay_bounded() -> None:
    policy = RetryPolicy(backoff=0.1, max_backoff=1.0, jitter=0.2)
    rng = random.Random(3)
    waits = [policy.delay(attempt, rng) for attempt in range(10)]
    assert 0.08 <= waits[0] <= 0.12
    assert all(0.8 <= wait <= 1.2 for wait in waits[4:])
    assert len(set(waits)) == len(waits)  # spread, not in step
    with pytest.raises(ConfigError):
        RetryPolicy(jitter=1.0)
