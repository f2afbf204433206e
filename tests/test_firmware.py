"""The prepaid meter firmware (meter_sim.firmware.Meter), rule by rule.

Time is plain floats (seconds since the epoch); the load is constant so that the arithmetic is
exact. 2026-01-01T00:00Z is a Thursday. Default tariff: weekdays rate 2 before 07:00 and from
23:00, rate 1 in between; weekends rate 2 all day; prices 2500 (rate 1) and 1200 (rate 2) minor
units per kWh.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from meter_sim.config import LoadConfig, MeterConfig
from meter_sim.firmware import Meter
from meter_sim.loads import ConstantLoad, load_for
from protocols.clock import ManualClock
from protocols.commands import U32_MAX, Command, CommandCode, CommandEnvelope, ResultCode
from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CHARGE,
    OBIS_CLOCK,
    OBIS_CURRENT,
    OBIS_DISCONNECT,
    OBIS_ENERGY_IMPORT,
    OBIS_ENERGY_RATES,
    OBIS_FREQUENCY,
    OBIS_POWER,
    OBIS_POWER_FACTOR,
    OBIS_SERIAL,
    OBIS_TOKEN_CREDIT,
    OBIS_VOLTAGE,
    CreditStatus,
)
from protocols.disconnect import ControlState
from protocols.errors import ValidationError
from protocols.obis import Obis
from protocols.readings import EventCode, MeterSnapshot, RelayCause, StatusFlag

DAY = 86400
HOUR = 3600
JAN1 = 1_767_225_600.0  # Thursday 2026-01-01 00:00Z
THU_10 = JAN1 + 10 * HOUR
SAT_10 = JAN1 + 2 * DAY + 10 * HOUR
SUN_10 = JAN1 + 3 * DAY + 10 * HOUR
KEY = "00112233445566778899aabbccddeeff"


def config(**overrides: Any) -> MeterConfig:
    """A meter with a constant 1 kW load and no friendly periods unless told otherwise."""
    base: dict[str, Any] = {
        "meter_id": "M1",
        "load": LoadConfig(model="constant", watts=1000),
        "friendly_hours": (),
        "friendly_days": (),
        "initial_credit": 1_000_000,
    }
    base.update(overrides)
    if isinstance(base["load"], int):
        base["load"] = LoadConfig(model="constant", watts=base["load"])
    return MeterConfig(**base)


def meter(now: float = THU_10, **overrides: Any) -> Meter:
    c = config(**overrides)
    return Meter(c, now, load_for(c))


class Head:
    """A head-end's side: numbers command sequences and signs with the meter's key."""

    def __init__(self, m: Meter) -> None:
        self.m = m
        self.seq = 0

    def send(self, command: Command) -> Any:
        self.seq += 1
        envelope = CommandEnvelope.signed(
            self.m.config.meter_id, self.seq, command, self.m.config.key_bytes
        )
        return self.m.execute(envelope)

    def topup(self, transfer: int, amount: int) -> Any:
        return self.send(Command.credit_transfer(transfer, amount))


def codes(m: Meter) -> list[EventCode]:
    return [e.code for e in m.events_since(0, 10_000)]


def events(m: Meter, code: EventCode) -> list[Any]:
    return [e for e in m.events_since(0, 10_000) if e.code is code]


def conserved(m: Meter, topups: int) -> None:
    """initial credit + accepted top-ups - charges = net credit, from the registers alone."""
    prices = m.config.tariff.prices
    if m.config.credit_unit == "money":
        cost_milli = sum(r.value * p for r, p in zip(m.rates, prices, strict=False))
        assert 0 <= m.charge_residue < 1000
        charges, rest = divmod(cost_milli - m.charge_residue, 1000)
        assert rest == 0
    else:
        charges = m.energy.value
    b = m.balances
    net = b.credit + b.emergency_balance - b.emergency_owed - b.debt
    assert m.config.initial_credit + topups - charges == net


# -- energy ---------------------------------------------------------------------------------------


def test_constant_load_integrates_exactly() -> None:
    m = meter(load=3600)
    m.advance(THU_10 + HOUR)
    assert m.energy.value == 3600
    assert m.read(OBIS_ENERGY_IMPORT) == 3600
    assert m.rates[0].value == 3600  # Thursday 10:00-11:00 is rate 1


def test_integration_does_not_depend_on_how_often_the_meter_is_advanced() -> None:
    a = meter(load=1234)
    b = meter(load=1234)
    a.advance(THU_10 + 5 * HOUR)
    t = THU_10
    while t < THU_10 + 5 * HOUR:
        t += 7.3
        b.advance(min(t, THU_10 + 5 * HOUR))
    assert a.energy.value == b.energy.value == 6170
    assert [r.value for r in a.rates] == [r.value for r in b.rates]


def test_partial_watt_hours_are_carried() -> None:
    m = meter(load=1)  # 1 W: one Wh per hour
    for minute in range(1, 121):
        m.advance(THU_10 + minute * 60)
        assert m.energy.value == minute // 60


@pytest.mark.parametrize(
    ("start", "hours", "rates"),
    [
        (JAN1 + 6 * HOUR, 2, (1000, 1000)),  # Thursday 06:00-08:00: rate 2 then rate 1
        (JAN1 + 22 * HOUR, 2, (1000, 1000)),  # Thursday 22:00-24:00: rate 1 then rate 2
        (SAT_10, 3, (0, 3000)),  # Saturday: rate 2 all day
        (SUN_10, 1, (0, 1000)),  # Sunday too
        (JAN1 + 4 * DAY + 12 * HOUR, 1, (1000, 0)),  # Monday noon
    ],
)
def test_time_of_use_rates(start: float, hours: int, rates: tuple[int, int]) -> None:
    m = meter(start)
    m.advance(start + hours * HOUR)
    assert (m.rates[0].value, m.rates[1].value) == rates
    assert m.rates[2].value == m.rates[3].value == 0
    assert sum(r.value for r in m.rates) == m.energy.value
    assert [m.read(obis) for obis in OBIS_ENERGY_RATES] == [r.value for r in m.rates]


def test_tariff_follows_the_timezone() -> None:
    m = meter(JAN1 + 4 * HOUR, timezone_minutes=180)  # 07:00 local
    m.advance(JAN1 + 5 * HOUR)
    assert (m.rates[0].value, m.rates[1].value) == (1000, 0)


def test_no_energy_while_the_relay_is_open() -> None:
    m = meter()
    head = Head(m)
    m.advance(THU_10 + HOUR)
    assert head.send(Command.remote_disconnect()).code is ResultCode.OK
    m.advance(THU_10 + 3 * HOUR)
    assert m.energy.value == 1000
    assert m.read(OBIS_POWER) == 0
    assert m.read(OBIS_CURRENT) == 0


def test_a_welded_relay_keeps_the_supply_on_and_says_so() -> None:
    m = meter()
    head = Head(m)
    m.set_relay_welded(THU_10 + HOUR)
    assert head.send(Command.remote_disconnect()).code is ResultCode.OK
    assert m.disconnect.control_state is ControlState.DISCONNECTED
    m.advance(THU_10 + 3 * HOUR)
    assert m.energy.value == 3000  # the contacts stay closed: the load is still drawn
    assert m.read(OBIS_POWER) == 1000
    welded = events(m, EventCode.RELAY_WELDED)
    assert [(e.a, e.b) for e in welded] == [(int(ControlState.DISCONNECTED), 0)]
    restored = Meter.from_state(m.config, m.to_state(), THU_10 + 4 * HOUR, m.load)
    assert restored.relay_welded  # a weld survives a power cut
    restored.set_relay_welded(THU_10 + 4 * HOUR, welded=False)
    restored.advance(THU_10 + 5 * HOUR)
    assert restored.energy.value == 3000  # mended: the open relay cuts the supply


def test_instantaneous_values_are_consistent_with_the_load() -> None:
    m = meter(load=2300)
    m.advance(THU_10 + 600)
    assert m.read(OBIS_POWER) == 2300
    volts = m.read(OBIS_VOLTAGE) / 10
    amps = m.read(OBIS_CURRENT) / 1000
    pf = m.read(OBIS_POWER_FACTOR) / 1000
    assert 200 < volts < 250
    assert 0.5 < pf <= 1
    assert abs(volts * amps * pf - 2300) < 2300 * 0.002
    assert 4900 <= m.read(OBIS_FREQUENCY) <= 5100
    assert m.snapshot().power_w == 2300


def test_read_attributes_and_unknown_objects() -> None:
    m = meter(serial="SN-42")
    assert m.read(OBIS_SERIAL) == "SN-42"
    assert m.read(OBIS_DISCONNECT, 4) == 6  # control mode
    assert m.read(OBIS_CLOCK) == int(THU_10)
    with pytest.raises(ValidationError):
        m.read(Obis(1, 0, 99, 99, 0))
    with pytest.raises(ValidationError):
        m.read(OBIS_ENERGY_IMPORT, 9)


def test_serial_defaults_to_the_meter_id() -> None:
    assert meter().read(OBIS_SERIAL) == "M1"


# -- credit ----------------------------------------------------------------------------------------


def test_money_credit_is_charged_at_the_rate_in_force() -> None:
    m = meter(JAN1 + 6 * HOUR, initial_credit=100_000)
    m.advance(JAN1 + 8 * HOUR)  # 1 kWh at 1200, 1 kWh at 2500
    assert m.balances.credit == 100_000 - 1200 - 2500
    assert m.read(OBIS_TOKEN_CREDIT) == m.balances.credit
    assert m.read(OBIS_ACCOUNT, 5) == m.balances.credit  # available credit
    conserved(m, 0)


def test_fractions_of_a_minor_unit_are_carried_not_dropped() -> None:
    m = meter(load=1, initial_credit=100_000)  # 1 Wh an hour at 2500/kWh: 2.5 units a Wh
    m.advance(THU_10 + HOUR)
    assert m.balances.credit == 100_000 - 2
    m.advance(THU_10 + 2 * HOUR)
    assert m.balances.credit == 100_000 - 5
    conserved(m, 0)


def test_energy_credit_is_held_in_watt_hours() -> None:
    m = meter(credit_unit="energy", initial_credit=5000, low_credit_threshold=0)
    m.advance(THU_10 + 2 * HOUR)
    assert m.balances.credit == 3000
    assert m.read(OBIS_ACCOUNT, 11)[2] == 1  # currency unit: consumption
    conserved(m, 0)
    head = Head(m)
    assert head.topup(1, 700).code is ResultCode.OK
    assert m.balances.credit == 3700
    conserved(m, 700)


def test_monetary_account_currency() -> None:
    m = meter(currency="KES")
    assert m.read(OBIS_ACCOUNT, 11) == ("KES", -2, 2)


# -- low credit ------------------------------------------------------------------------------------


def test_low_credit_event_when_crossed_downward_and_rearmed_by_a_topup() -> None:
    m = meter(initial_credit=7500, low_credit_threshold=5000)  # 2500 an hour
    head = Head(m)
    m.advance(THU_10 + HOUR)
    assert events(m, EventCode.LOW_CREDIT) == []
    assert not m.snapshot().status & StatusFlag.LOW_CREDIT
    m.advance(THU_10 + 2 * HOUR)
    low = events(m, EventCode.LOW_CREDIT)
    assert len(low) == 1
    assert low[0].b == 5000
    assert m.snapshot().status & StatusFlag.LOW_CREDIT
    m.advance(THU_10 + 2.5 * HOUR)
    assert len(events(m, EventCode.LOW_CREDIT)) == 1  # once per crossing
    head.topup(1, 10_000)
    assert not m.snapshot().status & StatusFlag.LOW_CREDIT
    m.advance(THU_10 + 6 * HOUR)
    assert len(events(m, EventCode.LOW_CREDIT)) == 2  # re-armed by the top-up


def test_changing_the_threshold_is_logged() -> None:
    m = meter()
    head = Head(m)
    result = head.send(Command(CommandCode.SET_LOW_CREDIT_THRESHOLD, (123,)))
    assert result.code is ResultCode.OK
    assert m.account.low_credit_threshold == 123
    assert m.snapshot().low_credit_threshold == 123
    changed = events(m, EventCode.THRESHOLD_CHANGED)
    assert [(e.a, e.b) for e in changed] == [(5000, 123)]


# -- credit exhausted and reconnection ------------------------------------------------------------


def test_local_disconnect_when_credit_is_exhausted() -> None:
    m = meter(initial_credit=2500, emergency_credit=0, low_credit_threshold=0)
    m.advance(THU_10 + HOUR - 60)
    assert m.disconnect.control_state is ControlState.CONNECTED
    m.advance(THU_10 + 2 * HOUR)
    assert m.balances.credit == 0
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION  # g
    assert m.energy.value == 1000  # nothing more after the disconnection
    assert EventCode.CREDIT_EXHAUSTED in codes(m)
    relay = events(m, EventCode.RELAY_READY_FOR_RECONNECTION)
    assert [e.a for e in relay] == [RelayCause.CREDIT]
    status = m.snapshot().status
    assert status & StatusFlag.OUT_OF_CREDIT
    assert not status & StatusFlag.IN_CREDIT


@pytest.mark.parametrize("mode", [5, 6])
def test_topup_reconnects_straight_away_where_the_mode_allows_local_reconnection(
    mode: int,
) -> None:
    m = meter(initial_credit=2500, emergency_credit=0, control_mode=mode)
    head = Head(m)
    m.advance(THU_10 + 2 * HOUR)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert head.topup(1, 5000).code is ResultCode.OK
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert [e.a for e in events(m, EventCode.RELAY_CONNECTED)] == [RelayCause.TOPUP]
    m.advance(THU_10 + 3 * HOUR)
    assert m.energy.value == 2000


@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_topup_leaves_the_meter_ready_until_the_button(mode: int) -> None:
    m = meter(initial_credit=2500, emergency_credit=0, control_mode=mode)
    head = Head(m)
    m.advance(THU_10 + 2 * HOUR)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    head.topup(1, 5000)
    m.advance(THU_10 + 3 * HOUR)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert m.energy.value == 1000
    assert m.press_button(THU_10 + 3 * HOUR) is ResultCode.OK  # e
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert events(m, EventCode.RELAY_CONNECTED)[-1].a == RelayCause.MANUAL


def test_button_refused_without_credit() -> None:
    m = meter(initial_credit=2500, emergency_credit=0, control_mode=3)
    m.advance(THU_10 + 2 * HOUR)
    assert m.press_button(THU_10 + 2 * HOUR) is ResultCode.REFUSED_BY_STATE
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION


def test_button_disconnects_only_in_modes_with_f() -> None:
    m5 = meter(control_mode=5)
    assert m5.press_button(THU_10) is ResultCode.OK
    assert m5.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    m6 = meter(control_mode=6)
    assert m6.press_button(THU_10) is ResultCode.REFUSED_BY_MODE
    assert m6.disconnect.control_state is ControlState.CONNECTED


def test_topup_does_not_undo_a_remote_disconnection() -> None:
    m = meter(initial_credit=100)
    head = Head(m)
    assert head.send(Command.remote_disconnect()).code is ResultCode.OK
    head.topup(1, 10_000)
    assert m.disconnect.control_state is ControlState.DISCONNECTED
    assert head.send(Command.remote_reconnect()).code is ResultCode.OK
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION  # d in mode 6


def test_remote_commands_follow_the_mode() -> None:
    m = meter(control_mode=2)
    head = Head(m)
    assert head.send(Command.remote_disconnect()).code is ResultCode.OK
    assert events(m, EventCode.RELAY_DISCONNECTED)[-1].a == RelayCause.REMOTE
    result = head.send(Command.remote_disconnect())
    assert result.code is ResultCode.REFUSED_BY_STATE
    assert EventCode.COMMAND_REFUSED in codes(m)
    assert head.send(Command.remote_reconnect()).code is ResultCode.OK  # a
    assert m.disconnect.control_state is ControlState.CONNECTED
    m0 = meter(control_mode=0)
    assert Head(m0).send(Command.remote_disconnect()).code is ResultCode.REFUSED_BY_MODE
    assert m0.disconnect.control_state is ControlState.CONNECTED


def test_mode_zero_never_disconnects_for_credit() -> None:
    m = meter(initial_credit=100, emergency_credit=0, control_mode=0)
    m.advance(THU_10 + 3 * HOUR)
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert m.energy.value == 3000
    conserved(m, 0)


def test_set_control_mode() -> None:
    m = meter()
    head = Head(m)
    assert head.send(Command(CommandCode.SET_CONTROL_MODE, (3,))).code is ResultCode.OK
    assert m.read(OBIS_DISCONNECT, 4) == 3
    assert [(e.a, e.b) for e in events(m, EventCode.CONTROL_MODE_CHANGED)] == [(6, 3)]


# -- emergency credit -----------------------------------------------------------------------------


def test_emergency_credit_invoked_by_the_customer_and_repaid_from_the_next_topup() -> None:
    m = meter(initial_credit=2500, low_credit_threshold=0)  # emergency 2000, not auto
    head = Head(m)
    m.advance(THU_10 + 2 * HOUR)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert m.emergency.credit_status is CreditStatus.SELECTABLE
    assert m.snapshot().status & StatusFlag.EMERGENCY_CREDIT_AVAILABLE
    result = head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
    assert result.code is ResultCode.OK
    assert m.balances.emergency_balance == 2000
    assert m.disconnect.control_state is ControlState.CONNECTED  # mode 6: h
    assert [e.a for e in events(m, EventCode.EMERGENCY_CREDIT_INVOKED)] == [2000]
    m.advance(THU_10 + 2 * HOUR + 1800)  # 0.5 kWh at 2500 = 1250
    assert m.balances.emergency_balance == 750
    assert m.snapshot().status & StatusFlag.EMERGENCY_CREDIT_IN_USE
    assert head.topup(1, 10_000).code is ResultCode.OK
    assert m.balances.credit == 10_000 - 1250  # the used part is repaid, the rest lapses
    assert m.balances.emergency_owed == 0
    assert m.emergency.credit_status is CreditStatus.SELECTABLE  # available again
    conserved(m, 10_000)


def test_emergency_credit_refused_above_threshold_and_when_already_in_use() -> None:
    m = meter(initial_credit=100_000, low_credit_threshold=5000)
    head = Head(m)
    assert head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT)).code is (
        ResultCode.REFUSED_BY_STATE
    )
    assert m.emergency.credit_status is CreditStatus.SELECTABLE
    low = meter(initial_credit=100, low_credit_threshold=5000)
    low_head = Head(low)
    assert low_head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT)).code is ResultCode.OK
    again = low_head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
    assert again.code is ResultCode.REFUSED_BY_STATE
    assert low.balances.emergency_balance == 2000
    conserved(low, 0)


def test_emergency_credit_not_configured() -> None:
    m = meter(initial_credit=0, emergency_credit=0)
    result = Head(m).send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
    assert result.code is ResultCode.NOT_SUPPORTED


def test_emergency_credit_invoked_automatically() -> None:
    m = meter(initial_credit=2500, emergency_auto=True, low_credit_threshold=0)
    m.advance(THU_10 + HOUR + 1200)
    assert m.disconnect.control_state is ControlState.CONNECTED  # never cut off
    assert RelayCause.CREDIT not in [e.a for e in events(m, EventCode.RELAY_READY_FOR_RECONNECTION)]
    assert m.emergency.credit_status is CreditStatus.IN_USE
    assert EventCode.EMERGENCY_CREDIT_INVOKED in codes(m)
    # 2000 of emergency credit lasts 0.8 h at 2500/kWh, then the meter disconnects
    m.advance(THU_10 + 3 * HOUR)
    assert m.emergency.credit_status is CreditStatus.CONSUMED
    assert EventCode.EMERGENCY_CREDIT_EXHAUSTED in codes(m)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert m.energy.value == 1800
    conserved(m, 0)


def test_consumed_emergency_credit_cannot_be_invoked_again_until_repaid() -> None:
    m = meter(initial_credit=0, low_credit_threshold=0)
    head = Head(m)
    head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
    m.advance(THU_10 + 2 * HOUR)
    assert m.emergency.credit_status is CreditStatus.CONSUMED
    assert head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT)).code is (
        ResultCode.REFUSED_BY_STATE
    )
    head.topup(1, 3000)
    assert m.balances.credit == 1000
    assert m.emergency.credit_status is CreditStatus.SELECTABLE
    conserved(m, 3000)


# -- friendly credit ------------------------------------------------------------------------------


def test_no_disconnection_in_friendly_hours_and_debt_recovered_from_the_topup() -> None:
    start = JAN1 + 17 * HOUR  # Thursday 17:00
    m = meter(
        start,
        initial_credit=1000,
        emergency_credit=0,
        low_credit_threshold=0,
        friendly_hours=((18 * 60, 24 * 60),),
    )
    m.advance(start + 3000)  # credit ran out at 17:24, before the friendly hours
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert m.energy.value == 400
    m2 = meter(
        JAN1 + 19 * HOUR,
        initial_credit=1000,
        emergency_credit=0,
        low_credit_threshold=0,
        friendly_hours=((18 * 60, 24 * 60),),
    )
    head = Head(m2)
    m2.advance(JAN1 + 22 * HOUR)  # 3 kWh at 2500 with 1000 of credit
    assert m2.disconnect.control_state is ControlState.CONNECTED
    assert m2.energy.value == 3000
    assert m2.balances.credit == 0
    assert m2.balances.debt == 7500 - 1000
    assert m2.snapshot().debt == 6500
    assert m2.snapshot().status & StatusFlag.FRIENDLY_PERIOD
    conserved(m2, 0)
    head.topup(1, 10_000)
    assert m2.balances.debt == 0
    assert m2.balances.credit == 10_000 - 6500
    conserved(m2, 10_000)


def test_disconnection_when_the_friendly_period_ends() -> None:
    m = meter(
        JAN1 + 22 * HOUR,
        initial_credit=0,
        emergency_credit=0,
        low_credit_threshold=0,
        friendly_hours=((0, 6 * 60), (18 * 60, 24 * 60)),
    )
    m.advance(JAN1 + DAY + 7 * HOUR)  # Friday 07:00
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    assert m.energy.value == 8000  # 22:00 .. 06:00
    assert EventCode.FRIENDLY_PERIOD_END in codes(m)


def test_friendly_days() -> None:
    m = meter(SUN_10, initial_credit=0, emergency_credit=0, friendly_days=(7,))
    m.advance(SUN_10 + 5 * HOUR)
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert m.balances.debt == 5 * 1200  # Sunday is rate 2
    conserved(m, 0)


def test_debt_recovery_percent() -> None:
    m = meter(
        JAN1 + 19 * HOUR,
        initial_credit=0,
        emergency_credit=0,
        friendly_hours=((18 * 60, 24 * 60),),
        debt_recovery_percent=50,
    )
    m.advance(JAN1 + 21 * HOUR)
    assert m.balances.debt == 5000
    Head(m).topup(1, 4000)
    assert m.balances.debt == 3000
    assert m.balances.credit == 2000
    conserved(m, 4000)


# -- credit transfers -----------------------------------------------------------------------------


def test_topup_accepted_once() -> None:
    m = meter(initial_credit=0)
    head = Head(m)
    result = head.topup(7, 5000)
    assert result.code is ResultCode.OK
    assert result.last_transfer == 7
    assert m.balances.credit == 5000
    repeat = head.topup(7, 5000)
    assert repeat.code is ResultCode.DUPLICATE
    assert repeat.accepted
    assert repeat.last_transfer == 7
    assert m.balances.credit == 5000
    assert [(e.a, e.b) for e in events(m, EventCode.TOPUP_ACCEPTED)] == [(7, 5000)]
    assert [e.a for e in events(m, EventCode.TOPUP_DUPLICATE)] == [7]
    assert m.snapshot().last_transfer == 7
    conserved(m, 5000)


def test_older_transfer_refused() -> None:
    m = meter(initial_credit=0)
    head = Head(m)
    head.topup(7, 5000)
    result = head.topup(6, 5000)
    assert result.code is ResultCode.OLD_TRANSFER
    assert not result.accepted
    assert m.balances.credit == 5000
    assert [(e.a, e.b) for e in events(m, EventCode.TOPUP_REFUSED)] == [
        (6, ResultCode.OLD_TRANSFER)
    ]


@pytest.mark.parametrize("amount", [99, 1001])
def test_amount_outside_the_bounds_refused(amount: int) -> None:
    m = meter(initial_credit=0, min_topup=100, max_topup=1000)
    head = Head(m)
    result = head.topup(1, amount)
    assert result.code is ResultCode.AMOUNT_OUT_OF_BOUNDS
    assert m.balances.credit == 0
    assert m.last_transfer == 0
    assert head.topup(1, 1000).code is ResultCode.OK  # the number was not used up
    assert m.balances.credit == 1000


def test_amount_over_the_credit_limit_refused() -> None:
    m = meter(initial_credit=9000, max_credit=10_000)
    result = Head(m).topup(1, 1001)
    assert result.code is ResultCode.AMOUNT_OUT_OF_BOUNDS
    assert m.balances.credit == 9000


# -- limiter --------------------------------------------------------------------------------------


def test_limiter_ignores_short_overloads() -> None:
    m = meter(load=5000, limiter_watts=3000, limiter_over_seconds=300)
    m.advance(THU_10 + 240)
    assert m.disconnect.control_state is ControlState.CONNECTED


def test_limiter_trips_after_the_configured_time() -> None:
    m = meter(load=5000, limiter_watts=3000, limiter_over_seconds=60)
    m.advance(THU_10 + 200)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    trip = events(m, EventCode.LIMITER_TRIP)
    assert [(e.a, e.b) for e in trip] == [(5000, 3000)]
    relay = events(m, EventCode.RELAY_READY_FOR_RECONNECTION)
    assert [e.a for e in relay] == [RelayCause.LIMITER]
    assert m.snapshot().status & StatusFlag.LIMITER_TRIPPED


def test_limiter_trips_once_over_for_longer_than_the_configured_time() -> None:
    m = meter(load=5000, limiter_watts=3000, limiter_over_seconds=60)
    m.advance(THU_10 + 90)  # 90 s over a 60 s limit
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION


def test_limiter_off_by_default() -> None:
    m = meter(load=20_000)
    m.advance(THU_10 + HOUR)
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert m.energy.value == 20_000


def test_limiter_restores_after_the_under_time_in_mode_6() -> None:
    m = meter(load=5000, limiter_watts=3000, limiter_over_seconds=60, limiter_under_seconds=300)
    m.advance(THU_10 + 180)
    assert m.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
    m.advance(THU_10 + 180 + 600)
    assert EventCode.LIMITER_RESTORED in codes(m)


# -- event log and load profile -------------------------------------------------------------------


def test_event_sequence_numbers_and_ring_buffer() -> None:
    m = meter(event_entries=5)
    head = Head(m)
    for n in range(8):
        m.set_tamper(THU_10 + n * 60)
        head.send(Command(CommandCode.CLEAR_TAMPER))
    all_events = m.events_since(0, 100)
    assert len(all_events) == 5  # bounded
    seqs = [e.seq for e in all_events]
    assert seqs == list(range(12, 17))
    assert m.snapshot().last_event_seq == 16
    times = [e.time for e in all_events]
    assert times == sorted(times)
    assert {e.code for e in all_events} == {EventCode.TAMPER_DETECTED, EventCode.TAMPER_CLEARED}
    assert [e.seq for e in m.events_since(14, 100)] == [15, 16]
    assert [e.seq for e in m.events_since(0, 2)] == [12, 13]


def test_tamper_sets_and_clears_the_status() -> None:
    m = meter()
    m.set_tamper(THU_10 + 60)
    m.set_tamper(THU_10 + 120)
    assert codes(m).count(EventCode.TAMPER_DETECTED) == 1
    assert m.snapshot().status & StatusFlag.TAMPER
    Head(m).send(Command(CommandCode.CLEAR_TAMPER))
    assert not m.snapshot().status & StatusFlag.TAMPER
    assert EventCode.TAMPER_CLEARED in codes(m)


def test_events_by_time_range() -> None:
    m = meter()
    for minutes in (1, 2, 3, 4):
        m.set_tamper(THU_10 + minutes * 60)
        m.apply(Command(CommandCode.CLEAR_TAMPER))
    middle = m.events_between(int(THU_10) + 120, int(THU_10) + 180)
    assert [e.time - int(THU_10) for e in middle] == [120, 120, 180, 180]


def test_load_profile_every_fifteen_minutes_by_default() -> None:
    m = meter(load=4000)
    m.advance(THU_10 + HOUR + 60)
    rows = m.profile_between(0, 2**40)
    assert [r.time - int(THU_10) for r in rows] == [900, 1800, 2700, 3600]
    assert [r.interval_wh for r in rows] == [1000] * 4
    assert [r.energy_import_wh for r in rows] == [1000, 2000, 3000, 4000]
    assert rows[-1].credit == 1_000_000 - 4 * 2500
    assert rows[0].status & StatusFlag.IN_CREDIT
    assert m.profile_between(int(THU_10) + 1800, int(THU_10) + 2700) == rows[1:3]


def test_load_profile_period_and_bound_are_configurable() -> None:
    m = meter(load=1000, profile_period=1800, profile_entries=3)
    m.advance(THU_10 + 4 * HOUR)
    rows = m.profile_between(0, 2**40)
    assert [r.time - int(THU_10) for r in rows] == [6 * 1800, 7 * 1800, 8 * 1800]
    assert all(r.interval_wh == 500 for r in rows)


# -- clock ----------------------------------------------------------------------------------------


def test_set_clock_forward_and_backward() -> None:
    m = meter()
    head = Head(m)
    m.advance(THU_10 + HOUR)
    assert head.send(Command.set_clock(int(THU_10) + 2 * HOUR)).code is ResultCode.OK
    assert m.read(OBIS_CLOCK) == int(THU_10) + 2 * HOUR
    assert [(e.a, e.b) for e in events(m, EventCode.CLOCK_SET)] == [
        (int(THU_10) + HOUR, int(THU_10) + 2 * HOUR)
    ]
    energy = m.energy.value
    head.send(Command.set_clock(int(THU_10) - 5 * HOUR))
    back = events(m, EventCode.CLOCK_BACKWARDS)
    assert [(e.a, e.b) for e in back] == [(int(THU_10) + 2 * HOUR, int(THU_10) - 5 * HOUR)]
    assert m.energy.value == energy  # energy never goes down
    assert m.read(OBIS_CLOCK) == int(THU_10) - 5 * HOUR
    m.advance(THU_10 + 2 * HOUR)  # one more hour of physical time
    assert m.energy.value == energy + 1000
    assert m.read(OBIS_CLOCK) == int(THU_10) - 4 * HOUR


def test_the_tariff_follows_the_meter_clock() -> None:
    m = meter()
    Head(m).send(Command.set_clock(int(SAT_10)))
    m.advance(THU_10 + HOUR)
    assert (m.rates[0].value, m.rates[1].value) == (0, 1000)  # Saturday's rate


def test_set_clock_out_of_range() -> None:
    m = meter()
    result = Head(m).send(Command.set_clock(2**41))
    assert result.code is ResultCode.BAD_ARGUMENT
    assert m.read(OBIS_CLOCK) == int(THU_10)


class StepLoad:
    """A load model written for the test: 0 W before ``at``, ``watts`` from then on."""

    def __init__(self, at: float, watts: int) -> None:
        self.at = at
        self.watts = watts

    def demand(self, t: float) -> int:
        return self.watts if t >= self.at else 0


def test_the_firmware_takes_its_load_model_and_opens_no_file(tmp_path: Any) -> None:
    missing = str(tmp_path / "never-written.csv")
    c = config(load=LoadConfig(model="csv", csv_path=missing))
    m = Meter(c, THU_10, StepLoad(THU_10 + HOUR, 2000))
    m.advance(THU_10 + 2 * HOUR)
    assert m.energy.value == 2000  # one hour at 0 W, one at 2 kW
    restored = Meter.from_state(c, m.to_state(), THU_10 + 2 * HOUR, StepLoad(0, 500))
    restored.advance(THU_10 + 3 * HOUR)
    assert restored.energy.value == 2500
    with pytest.raises(TypeError):
        Meter(c, THU_10)  # type: ignore[call-arg]


def test_clock_attribute_follows_advance() -> None:
    clock = ManualClock(THU_10)
    m = Meter(config(), clock.now(), ConstantLoad(1000))
    m.advance(clock.advance(125.0))
    assert m.read(OBIS_CLOCK) == int(THU_10) + 125
    assert m.snapshot().time == int(THU_10) + 125


def test_host_time_going_backwards_makes_no_energy_go_down() -> None:
    m = meter()
    m.advance(THU_10 + 2 * HOUR)
    m.advance(THU_10 + HOUR)
    assert m.energy.value == 2000


def test_host_time_going_backwards_integrates_nothing_twice() -> None:
    m = meter()
    m.advance(THU_10 + 2 * HOUR)
    m.advance(THU_10 + HOUR)
    m.advance(THU_10 + 2 * HOUR)
    assert m.energy.value == 2000
    assert m.meter_time >= THU_10 + 2 * HOUR or EventCode.CLOCK_BACKWARDS in codes(m)


# -- commands: the envelope -----------------------------------------------------------------------


def test_signed_commands_accepted_and_forged_tags_refused() -> None:
    m = meter(auth_key=KEY, initial_credit=0)
    head = Head(m)
    assert head.topup(1, 100).code is ResultCode.OK
    forged = CommandEnvelope("M1", 2, Command.credit_transfer(2, 100), b"\x00" * 16)
    result = m.execute(forged)
    assert result.code is ResultCode.AUTH_FAILED
    assert [(e.a, e.b) for e in events(m, EventCode.AUTH_FAILED)] == [
        (CommandCode.CREDIT_TRANSFER, 2)
    ]
    unsigned = CommandEnvelope("M1", 2, Command.credit_transfer(2, 100))
    assert m.execute(unsigned).code is ResultCode.AUTH_FAILED
    wrong_key = CommandEnvelope.signed("M1", 2, Command.credit_transfer(2, 100), b"k" * 16)
    assert m.execute(wrong_key).code is ResultCode.AUTH_FAILED
    assert m.balances.credit == 100
    assert m.last_seq == 1
    assert head.topup(2, 100).code is ResultCode.OK  # sequence 2 was not used up
    assert m.balances.credit == 200


def test_same_sequence_same_content_returns_the_stored_result() -> None:
    m = meter(initial_credit=0)
    envelope = CommandEnvelope("M1", 5, Command.credit_transfer(1, 300))
    first = m.execute(envelope)
    again = m.execute(envelope)
    assert first.code is again.code is ResultCode.OK
    assert again == first
    assert m.balances.credit == 300  # applied once
    assert len(events(m, EventCode.TOPUP_ACCEPTED)) == 1
    assert EventCode.REPLAY_REFUSED not in codes(m)


def test_same_sequence_other_content_and_older_sequences_are_replays() -> None:
    m = meter(initial_credit=0)
    m.execute(CommandEnvelope("M1", 5, Command.credit_transfer(1, 300)))
    other = m.execute(CommandEnvelope("M1", 5, Command.credit_transfer(2, 300)))
    assert other.code is ResultCode.REPLAYED
    older = m.execute(CommandEnvelope("M1", 4, Command.credit_transfer(3, 300)))
    assert older.code is ResultCode.REPLAYED
    assert m.balances.credit == 300
    assert [(e.a, e.b) for e in events(m, EventCode.REPLAY_REFUSED)] == [
        (CommandCode.CREDIT_TRANSFER, 5),
        (CommandCode.CREDIT_TRANSFER, 4),
    ]
    # the stored result of sequence 5 is still what a retry of it gets
    assert m.execute(CommandEnvelope("M1", 5, Command.credit_transfer(1, 300))).code is (
        ResultCode.OK
    )
    assert m.snapshot().last_command_seq == 5


def test_a_jump_forward_in_sequence_is_accepted_by_rule() -> None:
    """Strictly greater than the last executed sequence, as DLMS invocation counters: a gap is
    fine (sequences a head-end used for commands that never arrived are skipped)."""
    m = meter(initial_credit=0)
    assert m.execute(CommandEnvelope("M1", 5, Command.credit_transfer(1, 100))).code is (
        ResultCode.OK
    )
    assert m.execute(CommandEnvelope("M1", 1000, Command.credit_transfer(2, 100))).code is (
        ResultCode.OK
    )
    assert m.last_seq == 1000
    assert m.execute(CommandEnvelope("M1", 999, Command.credit_transfer(3, 100))).code is (
        ResultCode.REPLAYED
    )
    assert m.balances.credit == 200


def test_the_top_sequence_on_a_keyless_meter_is_left_by_installing_a_key() -> None:
    m = meter(initial_credit=0)
    top = CommandEnvelope("M1", U32_MAX, Command.credit_transfer(1, 100))
    assert m.execute(top).code is ResultCode.OK
    assert m.execute(CommandEnvelope("M1", 1, Command.credit_transfer(2, 100))).code is (
        ResultCode.REPLAYED
    )
    keyed = replace(m.config, auth_key=KEY)
    restored = Meter.from_state(keyed, json.loads(json.dumps(m.to_state())), THU_10 + 60, m.load)
    assert restored.last_seq == 0
    assert [(e.a, e.b) for e in events(restored, EventCode.SEQUENCE_RESET)] == [(U32_MAX, 0)]
    assert Head(restored).topup(2, 100).code is ResultCode.OK  # sequence 1, signed
    assert restored.balances.credit == 200
    # the same key again: nothing restarts
    again = Meter.from_state(keyed, restored.to_state(), THU_10 + 120, m.load)
    assert again.last_seq == 1
    assert len(events(again, EventCode.SEQUENCE_RESET)) == 1


def test_a_key_change_restarts_the_sequence_and_old_commands_stay_refused() -> None:
    m = meter(initial_credit=0, auth_key=KEY)
    old = CommandEnvelope.signed("M1", 1, Command.credit_transfer(1, 100), m.config.key_bytes)
    assert m.execute(old).code is ResultCode.OK
    new_key = "ffeeddccbbaa99887766554433221100"
    restored = Meter.from_state(replace(m.config, auth_key=new_key), m.to_state(), None, m.load)
    assert restored.last_seq == 0
    assert restored.execute(old).code is ResultCode.AUTH_FAILED  # recorded under the old key
    assert restored.balances.credit == 100


def test_a_restart_with_the_same_key_keeps_the_sequence() -> None:
    m = meter(initial_credit=0, auth_key=KEY)
    Head(m).topup(1, 100)
    state = m.to_state()
    restored = Meter.from_state(m.config, state, THU_10 + 60, m.load)
    assert restored.last_seq == 1
    del state["seq_key_id"]  # a state saved before the key was recorded: taken as this key's
    assert Meter.from_state(m.config, state, THU_10 + 60, m.load).last_seq == 1
    assert EventCode.SEQUENCE_RESET not in codes(restored)


def test_a_retried_refusal_is_not_applied_later() -> None:
    m = meter(initial_credit=0, max_topup=1000)
    envelope = CommandEnvelope("M1", 1, Command.credit_transfer(1, 5000))
    assert m.execute(envelope).code is ResultCode.AMOUNT_OUT_OF_BOUNDS
    assert m.execute(envelope).code is ResultCode.AMOUNT_OUT_OF_BOUNDS
    assert m.balances.credit == 0


def test_another_meters_command_refused() -> None:
    m = meter()
    result = m.execute(CommandEnvelope("M2", 1, Command.remote_disconnect()))
    assert result.code is ResultCode.BAD_ARGUMENT
    assert m.disconnect.control_state is ControlState.CONNECTED
    assert m.last_seq == 0


# -- non-volatile state ---------------------------------------------------------------------------


def _busy_meter() -> Meter:
    m = meter(
        initial_credit=3000,
        low_credit_threshold=2000,
        friendly_hours=((20 * 60, 24 * 60),),
        limiter_watts=9000,
    )
    head = Head(m)
    m.advance(THU_10 + 3 * HOUR + 17.5)
    head.send(Command(CommandCode.INVOKE_EMERGENCY_CREDIT))
    head.topup(3, 1000)
    head.send(Command.set_clock(int(THU_10) + 5 * HOUR))
    head.send(Command(CommandCode.SET_CONTROL_MODE, (5,)))
    m.set_tamper(THU_10 + 3 * HOUR + 30)
    m.advance(THU_10 + 3 * HOUR + 1000.25)
    return m


_INSTANTANEOUS = {OBIS_POWER, OBIS_VOLTAGE, OBIS_CURRENT, OBIS_POWER_FACTOR, OBIS_FREQUENCY}


def _all_attributes(m: Meter) -> dict[str, Any]:
    """Every attribute of every object, except instantaneous values (measured afresh)."""
    out: dict[str, Any] = {}
    for obis, obj in m.objects.items():
        if obis in _INSTANTANEOUS:
            continue
        for index in range(1, len(obj.ATTRIBUTES) + 1):
            value = obj.get(index)
            out[f"{obis}/{index}"] = list(value) if index == 2 and obj.CLASS_ID == 7 else value
    return out


def _unmeasured(snapshot: MeterSnapshot) -> MeterSnapshot:
    """A snapshot without its instantaneous values (measured afresh after a restore)."""
    return replace(
        snapshot, power_w=0, voltage_dv=0, current_ma=0, power_factor_milli=0, frequency_chz=0
    )


def test_state_is_json_and_round_trips() -> None:
    m = _busy_meter()
    state = m.to_state()
    text = json.dumps(state, sort_keys=True)
    assert json.dumps(json.loads(text), sort_keys=True) == text  # rows are tuples, JSON arrays
    restored = Meter.from_state(m.config, json.loads(text), None, m.load)
    assert restored.to_state() == state
    assert _unmeasured(restored.snapshot()) == _unmeasured(m.snapshot())
    assert restored.balances == m.balances
    assert restored.meter_time == m.meter_time
    assert restored.events_since(0, 10_000) == m.events_since(0, 10_000)
    assert restored.profile_between(0, 2**40) == m.profile_between(0, 2**40)


def test_every_attribute_survives_the_round_trip() -> None:
    m = _busy_meter()
    restored = Meter.from_state(m.config, m.to_state(), None, m.load)
    assert _all_attributes(restored) == _all_attributes(m)


def test_the_clock_attribute_survives_the_round_trip() -> None:
    m = _busy_meter()
    restored = Meter.from_state(m.config, m.to_state(), None, m.load)
    assert restored.read(OBIS_CLOCK) == m.read(OBIS_CLOCK) == int(m.meter_time)


def test_the_last_collection_amount_survives_the_round_trip() -> None:
    m = _busy_meter()
    assert m.charge.last_collection_amount > 0
    restored = Meter.from_state(m.config, m.to_state(), None, m.load)
    assert restored.read(OBIS_CHARGE, 6) == m.read(OBIS_CHARGE, 6)


def test_restore_logs_power_down_then_power_up_and_integrates_nothing_while_off() -> None:
    m = meter()
    head = Head(m)
    m.advance(THU_10 + 1800.5)
    head.topup(1, 500)
    head.send(Command.set_clock(int(THU_10) + HOUR))
    state = m.to_state()
    seq = m.event_seq
    off_at = m.meter_time
    restored = Meter.from_state(m.config, state, m.true_time + 2 * HOUR, m.load)
    tail = restored.events_since(seq, 10)
    assert [e.code for e in tail] == [EventCode.POWER_DOWN, EventCode.POWER_UP]
    assert [e.seq for e in tail] == [seq + 1, seq + 2]
    assert tail[0].time == int(off_at)
    assert tail[1].time == int(off_at + 2 * HOUR)
    assert restored.energy.value == m.energy.value
    assert restored.balances == m.balances
    assert restored.read(OBIS_CLOCK) == int(off_at + 2 * HOUR)
    restored.advance(m.true_time + 3 * HOUR)
    assert restored.energy.value == m.energy.value + 1000  # only the hour after power-up


def test_restore_refuses_another_meters_state_or_version() -> None:
    m = meter()
    state = m.to_state()
    with pytest.raises(ValidationError):
        Meter.from_state(replace(m.config, meter_id="M2"), state, None, m.load)
    with pytest.raises(ValidationError):
        Meter.from_state(m.config, {**state, "version": 99}, None, m.load)


def test_restored_meter_keeps_the_last_transfer_and_sequence() -> None:
    m = meter(initial_credit=0)
    head = Head(m)
    head.topup(4, 500)
    restored = Meter.from_state(m.config, m.to_state(), THU_10 + 60, m.load)
    again = restored.execute(CommandEnvelope("M1", 1, Command.credit_transfer(4, 500)))
    assert again.code is ResultCode.OK  # the stored result of sequence 1
    assert restored.balances.credit == 500
    dup = restored.execute(CommandEnvelope("M1", 2, Command.credit_transfer(4, 500)))
    assert dup.code is ResultCode.DUPLICATE
    assert restored.balances.credit == 500


def test_limiter_and_friendly_state_survive_a_restart() -> None:
    m = meter(load=5000, limiter_watts=3000, limiter_over_seconds=600)
    m.limiter.threshold_normal = 4000  # e.g. an emergency threshold in force, normal kept aside
    m.advance(THU_10 + 300)  # over the threshold for 300 of the 600 s
    state = json.loads(json.dumps(m.to_state()))
    restored = Meter.from_state(m.config, state, None, m.load)
    assert restored.limiter.threshold_active == 3000
    assert restored.limiter.threshold_normal == 4000
    restored.advance(THU_10 + 600)  # the timer carried on: it trips at 600 s, not 900 s
    assert [e.a for e in events(restored, EventCode.LIMITER_TRIP)] == [5000]


def test_a_restart_in_a_friendly_period_does_not_log_it_twice() -> None:
    m = meter(initial_credit=10, friendly_hours=(), friendly_days=(4,), load=1000)  # Thursday
    m.advance(THU_10 + HOUR)
    assert len(events(m, EventCode.FRIENDLY_PERIOD_START)) == 1
    restored = Meter.from_state(
        m.config, json.loads(json.dumps(m.to_state())), THU_10 + HOUR, m.load
    )
    restored.advance(THU_10 + 2 * HOUR)
    assert len(events(restored, EventCode.FRIENDLY_PERIOD_START)) == 1
