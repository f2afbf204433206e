"""The prepaid meter's firmware model: sans-IO, time injected.

``Meter.advance(now)`` integrates the load into energy and credit; ``Meter.execute(envelope)``
applies a head-end command once; ``Meter.read(obis, attribute)`` reads any COSEM attribute. The
meter's state *is* its COSEM objects (``Meter.objects``) plus a few firmware counters; the Modbus
datastore and the MQTT agent read and write through this class, never a copy.

Time. ``now`` is true (physical) time, which integrates energy. The meter's own clock is
``now + clock offset``; the head-end can set it, and it drives the tariff, the timestamps, the
load-profile captures and the friendly periods. Setting the clock never changes energy.

Integration. ``advance(now, step)`` integrates in steps of at most ``step`` seconds on a grid
of multiples of ``step`` on the meter clock, also cut at load-profile captures and at ``now``;
each step draws the demand of its start and charges at the rate in force at its start, and the
credit, limiter and friendly-period rules run at its end. ``integration="fixed"`` takes those
steps one by one. ``integration="events"`` gives the same results, exactly (every Wh register,
residue, credit, debt, event and profile row; a property test compares the two): while nothing
but energy can change (the relay and the rate stay as they are, no credit threshold is
crossed, the limiter is idle and, when out of credit, the friendly period does not turn), a
whole run of steps, whatever the load draws in each, is integrated at once in integers, up to
the next instant where something can change (a tariff switch, a friendly-period edge, ``now``),
with the load-profile captures on the way computed from it; everything else, and any moment
that is not a whole second, goes through the fixed step. The load models say where their
demand can change (``meter_sim.loads.SegmentedLoad``); a load that does not is integrated step
by step.

Credit. Credit is held in the account's unit: minor currency units (``credit_unit = "money"``,
the meter applies the unit charge of the rate in force) or Wh (``"energy"``, the STS way). With
``net = credit + emergency balance - emergency owed - debt`` the meter keeps, exactly and for
ever, ``initial credit + accepted top-ups - charges - cleared = net`` (``cleared``: credit removed
by an STS clear-credit token): charges and repayments are integer
and every fraction of a minor unit is carried to the next charge, never dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from meter_sim.config import MeterConfig
from meter_sim.keypad import (
    AddCredit,
    ClearCredit,
    ClearTamper,
    KeyChange,
    KeyChangePending,
    KeypadAction,
    KeypadRefusal,
    SetPhaseUnbalanceLimit,
    SetPowerLimit,
    StsKeypad,
    TestToken,
)
from meter_sim.loads import LoadModel, unit_noise
from protocols.commands import (
    Command,
    CommandCode,
    CommandEnvelope,
    CommandResult,
    ResultCode,
    key_id,
)
from protocols.cosem import (
    OBIS_ACCOUNT,
    OBIS_CHARGE,
    OBIS_CLOCK,
    OBIS_CURRENT,
    OBIS_DISCONNECT,
    OBIS_EMERGENCY_CREDIT,
    OBIS_ENERGY_IMPORT,
    OBIS_ENERGY_RATES,
    OBIS_EVENT_LOG,
    OBIS_FREQUENCY,
    OBIS_LIMITER,
    OBIS_LOAD_PROFILE,
    OBIS_POWER,
    OBIS_POWER_FACTOR,
    OBIS_SERIAL,
    OBIS_TOKEN_CREDIT,
    OBIS_TOKEN_GATEWAY,
    OBIS_VOLTAGE,
    Account,
    Charge,
    Clock,
    CosemObject,
    Credit,
    CreditStatus,
    CreditStatusBit,
    CreditType,
    CreditUnit,
    Data,
    DisconnectControl,
    Limiter,
    ProfileGeneric,
    Register,
    TokenGateway,
    TokenStatus,
    energy_register,
    index_objects,
)
from protocols.disconnect import ControlState, Trigger, find_transition
from protocols.errors import TransitionRefused, ValidationError
from protocols.obis import Obis
from protocols.readings import (
    Event,
    EventCode,
    MeterSnapshot,
    ProfileRow,
    RelayCause,
    SnapshotValues,
    StatusFlag,
)
from protocols.sts import CLEAR_ALL_REGISTERS, TID_TOKEN_TYPES
from protocols.units import ScalerUnit, Unit

MJ_PER_WH = 3_600_000  # milli-joules in a watt-hour
STATE_VERSION = 1
#: how ``Meter.advance`` integrates: step by step, or whole runs between events (same results)
Integration = Literal["fixed", "events"]
INTEGRATIONS: tuple[Integration, ...] = ("fixed", "events")

_RELAY_EVENT = {
    ControlState.CONNECTED: EventCode.RELAY_CONNECTED,
    ControlState.DISCONNECTED: EventCode.RELAY_DISCONNECTED,
    ControlState.READY_FOR_RECONNECTION: EventCode.RELAY_READY_FOR_RECONNECTION,
}


@dataclass(frozen=True, slots=True)
class Balances:
    """The account's money (or energy) at one moment, in the account's unit."""

    credit: int
    emergency_balance: int
    emergency_owed: int
    debt: int

    @property
    def net(self) -> int:
        return self.credit + self.emergency_balance - self.emergency_owed - self.debt

    @property
    def available(self) -> int:
        return self.credit + self.emergency_balance


class Meter:
    """One prepaid meter. Not thread-safe; drive it from one task.

    ``load`` is the household's demand (``meter_sim.loads.load_for(config)`` builds the one the
    configuration names); the firmware only asks it for watts, so it opens no file.
    """

    def __init__(self, config: MeterConfig, now: float, load: LoadModel) -> None:
        self.config = config
        self.load = load
        money = config.credit_unit == "money"
        # -- COSEM objects: the meter's state -----------------------------------------------------
        self.serial = Data(OBIS_SERIAL, config.serial or config.meter_id)
        self.clock = Clock(OBIS_CLOCK, time=int(now), time_zone=config.timezone_minutes)
        self.energy = energy_register(OBIS_ENERGY_IMPORT)
        self.rates = tuple(energy_register(obis) for obis in OBIS_ENERGY_RATES)
        self.power = Register(OBIS_POWER, 0, ScalerUnit(0, Unit.WATT))
        self.voltage = Register(OBIS_VOLTAGE, config.nominal_voltage_dv, ScalerUnit(-1, Unit.VOLT))
        self.current = Register(OBIS_CURRENT, 0, ScalerUnit(-3, Unit.AMPERE))
        self.power_factor = Register(OBIS_POWER_FACTOR, 1000, ScalerUnit(-3, Unit.COUNT))
        self.frequency = Register(
            OBIS_FREQUENCY, config.nominal_frequency_chz, ScalerUnit(-2, Unit.HERTZ)
        )
        self.disconnect = DisconnectControl(OBIS_DISCONNECT, control_mode=config.control_mode)
        self.limiter = Limiter(
            OBIS_LIMITER,
            threshold_active=config.limiter_watts,
            threshold_normal=config.limiter_watts,
            min_over_threshold_duration=config.limiter_over_seconds,
            min_under_threshold_duration=config.limiter_under_seconds,
        )
        self.account = Account(
            OBIS_ACCOUNT,
            low_credit_threshold=config.low_credit_threshold,
            max_provision=config.max_topup,
            currency_name=config.currency if money else "Wh",
            currency_scale=config.currency_scale if money else 0,
            credit_unit=CreditUnit.MONETARY if money else CreditUnit.CONSUMPTION,
        )
        self.token_credit = Credit(
            OBIS_TOKEN_CREDIT,
            CreditType.TOKEN,
            current_credit_amount=config.initial_credit,
            warning_threshold=config.low_credit_threshold,
            limit=config.max_credit,
        )
        self.emergency = Credit(
            OBIS_EMERGENCY_CREDIT,
            CreditType.EMERGENCY,
            priority=2,
            preset_credit_amount=config.emergency_credit,
            credit_status=(
                CreditStatus.SELECTABLE if config.emergency_credit else CreditStatus.ENABLED
            ),
        )
        self.charge = Charge(OBIS_CHARGE, unit_charge_active=config.tariff.prices)
        self.token_gateway = TokenGateway(OBIS_TOKEN_GATEWAY)
        self.load_profile = ProfileGeneric(
            OBIS_LOAD_PROFILE,
            capture_objects=tuple(ProfileRow.__slots__),
            capture_period=config.profile_period,
            profile_entries=config.profile_entries,
        )
        self.event_log = ProfileGeneric(
            OBIS_EVENT_LOG,
            capture_objects=("time", "seq", "code", "a", "b"),
            capture_period=0,
            profile_entries=config.event_entries,
        )
        self.objects: dict[Obis, CosemObject] = index_objects(
            [
                self.serial,
                self.clock,
                self.energy,
                *self.rates,
                self.power,
                self.voltage,
                self.current,
                self.power_factor,
                self.frequency,
                self.disconnect,
                self.limiter,
                self.account,
                self.token_credit,
                self.emergency,
                self.charge,
                self.token_gateway,
                self.load_profile,
                self.event_log,
            ]
        )
        # -- firmware counters --------------------------------------------------------------------
        self.true_time = now  # physical time integrated up to
        self.clock_offset = 0.0  # meter clock = true time + offset
        self.energy_residue_mj = 0  # energy not yet a whole Wh
        self.charge_residue = 0  # money: minor units x 1000 not yet charged (Wh x price/kWh)
        self.debt = 0
        self.emergency_owed = 0
        self.initial_credit = config.initial_credit
        self.topups_total = 0
        self.charges_total = 0
        self.last_transfer = 0
        self.last_seq = 0
        self.seq_key_id = key_id(config.key_bytes)  # the key last_seq was counted under
        self.last_digest = ""
        self.last_exec_result = CommandResult(0, ResultCode.NONE)
        self.last_result = self.last_exec_result
        self.event_seq = 0
        self.tamper = False
        self.relay_welded = False  # a stuck contactor: the output stays on whatever the state
        self.low_credit_armed = True
        self.exhausted = False
        self.relay_cause = RelayCause.REMOTE
        self.limiter_over_since: float | None = None
        self.limiter_tripped_at: float | None = None
        self.demand_w = 0
        self.phase_unbalance_limit_w = 0
        self.last_capture_energy = 0
        self.next_capture = self._next_boundary(self.meter_time)
        self.friendly_active = False
        self.keypad = StsKeypad(config.sts) if config.sts is not None else None
        self.topups_via_tokens = 0  # Wh added by STS credit tokens (part of topups_total)
        self.cleared_total = 0  # credit removed by clear-credit tokens
        self.status = StatusFlag(0)
        self._status_bits = -1  # forces the first computation
        self.listeners: list[Callable[[Event], None]] = []
        # -- the event-driven integration's look-ups (derived from the configuration) ----------
        self._tz_seconds = config.timezone_minutes * 60
        self._noise_seed = config.modbus_unit * 7919 + len(config.meter_id)  # of _measure
        self._segment = getattr(load, "segment", None)
        # the optional parts of a load (meter_sim.loads.SegmentedLoad and the note below it)
        self._segments: Callable[[int, int], list[tuple[int, int]]] | None = getattr(
            load, "segments", None
        )
        self._aligned: Callable[[int, int], bool] | None = getattr(load, "aligned", None)
        self._watt_seconds: Callable[[int, list[int]], list[int]] | None = getattr(
            load, "watt_seconds", None
        )
        self._rate_span = (1, 0, 0)  # local seconds [from, until) and the rate in force
        self._friendly_cache = (1, 0, False)  # local seconds [from, until) and friendliness
        self._friendly_edges = sorted(
            {edge for pair in config.friendly_hours for edge in pair if edge > 0} | {1440}
        )
        self._update_status()

    # -- time -------------------------------------------------------------------------------------

    @property
    def meter_time(self) -> float:
        return self.true_time + self.clock_offset

    def _local(self, meter_t: float) -> tuple[int, int]:
        """(minute of the day, ISO weekday 1..7) in the meter's time zone."""
        local = meter_t + self.config.timezone_minutes * 60
        day = math.floor(local / 86400)
        minute = int((local - day * 86400) // 60)
        return minute, (day + 3) % 7 + 1

    def _next_boundary(self, meter_t: float) -> int:
        period = self.config.profile_period
        return (math.floor(meter_t / period) + 1) * period

    def in_friendly_period(self, meter_t: float | None = None) -> bool:
        meter_t = self.meter_time if meter_t is None else meter_t
        local = meter_t + self._tz_seconds
        low, high, friendly = self._friendly_cache
        if low <= local < high and local % 1 == 0:  # whole seconds: the span is exact
            return friendly
        minute, weekday = self._local(meter_t)
        if weekday in self.config.friendly_days:
            friendly = True
        else:
            friendly = any(start <= minute < end for start, end in self.config.friendly_hours)
        if local % 1 == 0:
            whole = int(local)
            cached, until = self._friendly_span(whole)
            if cached == friendly:  # always so for a whole second; kept as a check
                self._friendly_cache = (whole, until, friendly)
        return friendly

    def advance(self, now: float, step: int = 60, integration: Integration = "fixed") -> None:
        """Integrate from the last time up to ``now`` in steps of at most ``step`` seconds,
        one by one (``integration="fixed"``) or in whole runs between the instants where
        something can change (``"events"``); the two give the same state.

        A ``now`` earlier than the last one (a host clock set back) integrates nothing, and the
        meter waits until the host clock passes the last moment it integrated: physical time
        does not run backwards, so no interval is ever counted twice.
        """
        if now <= self.true_time:
            return
        if integration == "events" and self._segment is not None:
            power = self._advance_events(now, step)
        else:
            power = 0
            while self.true_time < now:
                meter_t = self.meter_time
                step_end = (math.floor(meter_t / step) + 1) * step
                boundary = min(step_end, self.next_capture) - self.clock_offset
                t_end = min(now, boundary)
                if t_end <= self.true_time:  # float rounding at a boundary
                    t_end = min(now, self.true_time + 1e-6)
                power = self._step(self.true_time, t_end - self.true_time)
                if self.meter_time >= self.next_capture:
                    self._capture_profile()
        # the measurements are what the last step ended with: nothing during the steps reads
        # them, so they are computed once here rather than after every step
        self._measure(power, self.true_time)
        self.clock.time = int(self.meter_time)

    def _advance_events(self, now: float, step: int) -> int:
        """The loop of :meth:`advance` with whole runs of steps taken at once where
        :meth:`_run` can; the steps it cannot take are the fixed loop's own."""
        power = 0
        ran = False
        while self.true_time < now:
            t = self.true_time
            offset = self.clock_offset
            whole = t % 1 == 0 and offset % 1 == 0  # int or float
            run = self._run(int(t), int(offset), now, step) if whole else None
            if run is None:
                meter_t = self.meter_time
                step_end = (math.floor(meter_t / step) + 1) * step
                boundary = min(step_end, self.next_capture) - offset
                t_end = min(now, boundary)
                if t_end <= t:  # float rounding at a boundary
                    t_end = min(now, t + 1e-6)
                power = self._step(t, t_end - t)
            else:
                power = run
                ran = True
            if self.meter_time >= self.next_capture:
                self._capture_profile()
        if ran:  # the runs leave the derived status to the end: nothing reads it in between
            self._update_status()
        return power

    def _run(self, t0: int, offset: int, now: float, step: int) -> int | None:
        """Take the fixed steps from ``t0`` (true time, a whole second, as is the clock
        offset) up to the next instant where more than energy can change (``now``, a tariff
        switch, a friendly-period edge when out of credit), all at once, and return the power
        the last of them drew; None (and nothing changed) where that cannot be done exactly
        (the limiter is counting, a credit threshold is crossed on the way, the relay would
        switch): those steps are taken one by one.

        Energy. A step of ``power`` W over ``dt`` whole seconds adds ``power x dt x 1000`` mJ
        (``round(power * dt * 1000)`` is that whole number), so the run's milli-joules are
        1000 x the watt-seconds of its steps, each drawing the demand of its start: summed
        over pieces of one power (cut where the load's segments end and at the captures), or,
        where every step lies within one of the load's segments (``aligned``), the load's own
        integral. The whole-Wh and whole-minor-unit parts carried from step to step add up to
        the same Wh, charges and residues as the steps one by one, all at the run's one rate;
        credit only falls during a run, so a threshold not crossed at its end was not crossed
        on the way. The load-profile rows of the captures on the way are computed from the
        watt-seconds up to each, and ``last_collection_amount`` (the charge of the last step
        that charged anything) from where the charges reach their total.
        """
        assert self._segment is not None
        m0 = t0 + offset
        # the run ends at a boundary of the fixed steps: now, a capture, or a grid point
        whole_now = math.floor(now)
        end = whole_now if now == whole_now else (whole_now + offset) // step * step - offset
        local0 = m0 + self._tz_seconds
        low, high, rate = self._rate_span
        if not low <= local0 < high:
            low, high, rate = self._rate_span = self._new_rate_span(local0)
        # the first step that starts at or after the switch: at a grid point or a capture
        switch = high - self._tz_seconds
        period = self.config.profile_period
        end = min(end, -(-switch // step) * step - offset, -(-switch // period) * period - offset)
        if end <= t0:
            return None
        disconnect = self.disconnect
        connected = disconnect.output_state or self.relay_welded
        threshold = self.limiter.threshold_active
        if (
            threshold > 0
            and self.limiter_tripped_at is not None
            and self.relay_cause is RelayCause.LIMITER
            and disconnect.control_state is ControlState.READY_FOR_RECONNECTION
        ):
            return None  # the limiter counts the time under its threshold
        token = self.token_credit.current_credit_amount
        emergency = self.emergency
        ec_in_use = emergency.credit_status is CreditStatus.IN_USE
        available = token + emergency.current_credit_amount if ec_in_use else token
        low_threshold = self.account.low_credit_threshold
        if available <= 0:
            # out of credit: each step's end looks at the friendly period, which must not turn
            if not self.exhausted or ec_in_use:
                return None
            if self.low_credit_armed and available < low_threshold:
                return None
            first_end = min(end, (m0 // step + 1) * step - offset, self.next_capture - offset)
            friendly, until = self._friendly_span(first_end + offset + self._tz_seconds)
            if friendly != self.friendly_active:
                return None
            until -= self._tz_seconds + offset
            if end >= until:  # stop at the last grid point before the edge
                end = (until - 1 + offset) // step * step - offset
                if end <= t0:
                    return None
            state = disconnect.control_state
            if friendly:
                if (
                    state is ControlState.READY_FOR_RECONNECTION
                    and self.relay_cause is RelayCause.CREDIT
                    and _allows(disconnect.control_mode, state, Trigger.LOCAL_RECONNECT)
                ):
                    return None  # the friendly period reconnects it at this step's end
            elif (
                state is ControlState.CONNECTED
                and disconnect.control_mode != 0
                and self.config.local_disconnect
            ):
                return None
        # -- pieces of one power, cut where the load's segments end and at the captures -------
        # (first step start, end, power, watt-seconds before); captures: (time, watt-seconds)
        captures: list[tuple[int, int]] = []
        capture = self.next_capture - offset
        pieces: list[tuple[int, int, int, int]] | None = None
        aligned = self._aligned
        if threshold <= 0 and aligned is not None and aligned(step, offset):
            # every step lies within one of the load's segments: the steps draw exactly the
            # load's integral, looked up for the run and for each capture in it
            integral = self._watt_seconds
            assert integral is not None
            moments = list(range(capture, end + 1, period))  # the captures in the run
            if connected:
                *at_captures, watt_seconds = integral(t0, [*moments, end])
            else:
                at_captures, watt_seconds = [0] * len(moments), 0
            captures = [
                (moment + offset, ws) for moment, ws in zip(moments, at_captures, strict=True)
            ]
            demand = self.load.demand(float(self._boundary_before(end, t0, offset, step)))
            power = demand if connected else 0
        else:
            segment = self._segment
            pieces = []
            start = t0
            watt_seconds = 0
            demand = power = last_demand = 0
            limit = threshold if threshold > 0 else -1
            inf = math.inf
            many = self._segments
            pieces_of_load = None if many is None else many(t0, end)
            index = 0
            while start < end:
                if pieces_of_load is None:
                    demand, end_at = segment(start)
                    if end_at <= start:
                        return None  # no whole second of it: step by step
                    segment_end = end_at if end_at == inf else math.ceil(end_at)
                else:  # whole seconds already
                    demand, segment_end = pieces_of_load[index]
                    while segment_end <= start:
                        index += 1
                        demand, segment_end = pieces_of_load[index]
                piece_power = demand if connected else 0
                if piece_power > limit >= 0:  # over the limiter's threshold: it counts the time
                    if start == t0:
                        return None
                    end = start
                    demand = last_demand
                    break
                power = piece_power
                last_demand = demand
                if segment_end == inf:
                    stop = end if end < capture else capture
                else:  # the first grid point at or after the segment's end
                    stop = min(-(-(segment_end + offset) // step) * step - offset, end, capture)
                pieces.append((start, stop, power, watt_seconds))
                watt_seconds += power * (stop - start)
                if stop == capture:
                    captures.append((capture + offset, watt_seconds))
                    capture += period
                start = stop
        residue = self.energy_residue_mj
        wh, energy_residue = divmod(residue + watt_seconds * 1000, MJ_PER_WH)
        price = 0
        charge_residue = self.charge_residue
        if self.config.credit_unit == "money":
            price = self.config.tariff.prices[rate - 1]
            amount, charge_residue = divmod(charge_residue + wh * price, 1000)
        else:
            amount = wh
        if available > 0 and (
            amount > token
            or available - amount <= 0
            or (self.low_credit_armed and available - amount < low_threshold)
        ):
            return None  # a credit threshold is crossed on the way: step by step
        # -- nothing but energy changes: apply the run ------------------------------------------
        if wh:
            self.rates[rate - 1].value += wh
            self.energy.value += wh
            if amount:
                self.charges_total += amount
                self.charge.total_amount_paid += amount
                self.charge.last_collection_amount = (
                    self._last_collection(pieces, offset, step, amount, price)
                    if pieces is not None
                    else self._last_collection_aligned(
                        t0, offset, end, step, total=amount, price=price
                    )
                )
                if available > 0:
                    self.token_credit.current_credit_amount = token - amount
                else:
                    self.debt += amount
        if captures:
            self._capture_run(captures, watt_seconds, available, price)
        self.energy_residue_mj = energy_residue
        self.charge_residue = charge_residue
        self.true_time = float(end)
        self.demand_w = demand
        if threshold > 0:
            self.limiter_over_since = None
        if available > 0:
            self.friendly_active = False
        return power

    def _capture_run(
        self, captures: list[tuple[int, int]], run_ws: int, available: int, price: int
    ) -> None:
        """The load-profile rows of the captures in a run, as :meth:`_capture_profile` takes
        them one step at a time: from the run's watt-seconds up to each capture (``available``
        and the residues are as they were when the run began; the energy registers already
        hold the run's ``run_ws`` watt-seconds)."""
        residue = self.energy_residue_mj
        charge_residue = self.charge_residue
        money = self.config.credit_unit == "money"
        base = self.energy.value - (residue + run_ws * 1000) // MJ_PER_WH
        pays = available > 0  # else the charges become debt and the credit stays as it is
        # the status bits but the low-credit and friendly ones do not change during a run
        bits = self._bits(available, False) & ~_LOW_CREDIT
        low_threshold = self.account.low_credit_threshold
        tz = self._tz_seconds
        rows = self.load_profile.buffer  # the rows have the profile's columns (ProfileRow)
        last = self.last_capture_energy
        for moment, watt_seconds in captures:
            wh = (residue + watt_seconds * 1000) // MJ_PER_WH
            total = base + wh
            left = available
            if pays:
                left -= (charge_residue + wh * price) // 1000 if money else wh
            low, high, friendly = self._friendly_cache
            if not low <= moment + tz < high:
                friendly = self.in_friendly_period(float(moment))
            row_bits = bits | _FRIENDLY if friendly else bits
            if left < low_threshold:
                row_bits |= _LOW_CREDIT
            rows.append((moment, total, total - last, left, row_bits))
            last = total
        self.last_capture_energy = last
        self.next_capture = captures[-1][0] + self.config.profile_period

    def _boundary_before(self, moment: int, t0: int, offset: int, step: int) -> int:
        """The last boundary of the fixed steps before ``moment`` in a run from ``t0``: the
        later of ``t0``, the last grid point and the last capture before it."""
        period = self.config.profile_period
        grid = -(-(moment + offset) // step) * step - step - offset
        capture = -(-(moment + offset) // period) * period - period - offset
        return max(t0, grid, capture)

    def _last_collection_aligned(
        self, t0: int, offset: int, end: int, step: int, *, total: int, price: int
    ) -> int:
        """:meth:`_last_collection` for a run integrated by the load's own integral: back from
        the run's end, one step at a time, to the step whose end the charges first reached
        ``total`` at (mostly the last step)."""
        integral = self._watt_seconds
        assert integral is not None
        residue = self.energy_residue_mj
        money = self.config.credit_unit == "money"
        moment = end
        while True:
            before = self._boundary_before(moment, t0, offset, step)
            wh = (residue + integral(t0, [before])[0] * 1000) // MJ_PER_WH
            charged = (self.charge_residue + wh * price) // 1000 if money else wh
            if charged < total:
                return total - charged
            moment = before

    def _last_collection(
        self,
        pieces: list[tuple[int, int, int, int]],
        offset: int,
        step: int,
        total: int,
        price: int,
    ) -> int:
        """The charge of the last step of a run that charged anything (what the fixed steps
        leave in ``last_collection_amount``): the run's charges first reach ``total`` at the
        end of that step."""
        residue = self.energy_residue_mj
        money = self.config.credit_unit == "money"
        wh_needed = -(-(1000 * total - self.charge_residue) // price) if money else total
        needed = wh_needed * MJ_PER_WH - residue  # mJ the run has drawn by then
        for start, stop, power, before_ws in reversed(pieces):  # it is mostly the last one
            if before_ws * 1000 >= needed:
                continue  # the charges reached the total before this piece
            seconds = -(-(needed - before_ws * 1000) // (power * 1000))
            # the step that ends at or after start + seconds, and the boundary before it
            at = min(stop, -(-(start + seconds + offset) // step) * step - offset)
            before = max(start, -(-(at + offset) // step) * step - step - offset)
            wh_before = (residue + (before_ws + power * (before - start)) * 1000) // MJ_PER_WH
            if money:
                return total - (self.charge_residue + wh_before * price) // 1000
            return total - wh_before
        raise AssertionError("a run's charges reach their total within it")  # pragma: no cover

    def _new_rate_span(self, local: int) -> tuple[int, int, int]:
        """The rate in force at ``local`` (a whole second of local meter time) and the
        local seconds ``[from, until)`` it holds over (until the next switch or midnight)."""
        day, second = divmod(local, 86400)
        minute = second // 60
        weekend = (day + 3) % 7 + 1 >= 6
        tariff = self.config.tariff
        table = tariff.weekend if weekend else tariff.weekday
        starts = [start for start, _ in table]
        index = bisect_right(starts, minute)
        until = starts[index] if index < len(starts) else 1440
        since = starts[index - 1]
        return day * 86400 + since * 60, day * 86400 + until * 60, tariff.rate_at(minute, weekend)

    def _friendly_span(self, local: int) -> tuple[bool, int]:
        """Whether ``local`` (a whole second of local meter time) is in a friendly period, as
        :meth:`in_friendly_period` says, and the local second it may change at next."""
        day, second = divmod(local, 86400)
        minute = second // 60
        friendly = (day + 3) % 7 + 1 in self.config.friendly_days or any(
            start <= minute < end for start, end in self.config.friendly_hours
        )
        edges = self._friendly_edges
        return friendly, day * 86400 + edges[bisect_right(edges, minute)] * 60

    def _step(self, t: float, dt: float) -> int:
        """Integrate ``dt`` seconds from ``t``; returns the power drawn (W)."""
        meter_t = t + self.clock_offset
        demand = self.load.demand(t)
        self.demand_w = demand
        connected = self.disconnect.output_state or self.relay_welded
        power = demand if connected else 0
        self.energy_residue_mj += round(power * dt * 1000)
        wh, self.energy_residue_mj = divmod(self.energy_residue_mj, MJ_PER_WH)
        if wh:
            minute, weekday = self._local(meter_t)
            rate = self.config.tariff.rate_at(minute, weekend=weekday >= 6)
            self.rates[rate - 1].value += wh
            self.energy.value += wh
            self._charge(wh, rate, meter_t)
        self.true_time = t + dt
        self._check_limiter(t, self.true_time, demand, power)
        self._check_credit(self.meter_time)
        return power

    def _measure(self, power: int, t: float) -> None:
        slot = int(t // 10)
        seed = self._noise_seed
        self.power.value = power
        sag = power // 250  # 0.1 V per 250 W of load
        self.voltage.value = (
            self.config.nominal_voltage_dv - sag + round((unit_noise(seed, slot) - 0.5) * 40)
        )
        self.frequency.value = self.config.nominal_frequency_chz + round(
            (unit_noise(seed ^ 0xF, slot) - 0.5) * 10
        )
        self.power_factor.value = 1000 if power == 0 else 900 + min(power // 40, 90)
        volts_dv = max(self.voltage.value, 1)
        # I [mA] = P / (V * PF) with V in 0.1 V and PF in 0.001
        self.current.value = power * 10_000_000 // (volts_dv * self.power_factor.value)

    # -- credit -----------------------------------------------------------------------------------

    @property
    def balances(self) -> Balances:
        return Balances(
            self.token_credit.current_credit_amount,
            self.emergency.current_credit_amount
            if self.emergency.credit_status is CreditStatus.IN_USE
            else 0,
            self.emergency_owed,
            self.debt,
        )

    def _charge(self, wh: int, rate: int, meter_t: float) -> None:
        if self.config.credit_unit == "money":
            self.charge_residue += wh * self.config.tariff.prices[rate - 1]
            amount, self.charge_residue = divmod(self.charge_residue, 1000)
        else:
            amount = wh
        if not amount:
            return
        self.charges_total += amount
        self.charge.total_amount_paid += amount
        self.charge.last_collection_amount = amount
        take = min(self.token_credit.current_credit_amount, amount)
        self.token_credit.current_credit_amount -= take
        rest = amount - take
        if rest and self.emergency.credit_status is CreditStatus.IN_USE:
            take = min(self.emergency.current_credit_amount, rest)
            self.emergency.current_credit_amount -= take
            rest -= take
            if self.emergency.current_credit_amount == 0:
                self.emergency.credit_status = CreditStatus.CONSUMED
                self._log(meter_t, EventCode.EMERGENCY_CREDIT_EXHAUSTED)
        self.debt += rest

    def _available(self) -> int:
        """``self.balances.available`` without building the Balances (hot path)."""
        emergency = self.emergency
        if emergency.credit_status is CreditStatus.IN_USE:
            return self.token_credit.current_credit_amount + emergency.current_credit_amount
        return self.token_credit.current_credit_amount

    def _check_credit(self, meter_t: float) -> None:
        available = self._available()
        threshold = self.account.low_credit_threshold
        if self.low_credit_armed and available < threshold:
            self.low_credit_armed = False
            self._log(meter_t, EventCode.LOW_CREDIT, available, threshold)
        if available > 0:
            self.friendly_active = False
            self._update_status()
            return
        if (
            self.config.emergency_auto
            and self.emergency.credit_status is CreditStatus.SELECTABLE
            and not self.exhausted
        ):
            self._invoke_emergency(meter_t)
            return
        if not self.exhausted:
            self.exhausted = True
            self._log(meter_t, EventCode.CREDIT_EXHAUSTED, available)
        friendly = self.in_friendly_period(meter_t)
        if friendly != self.friendly_active:
            self.friendly_active = friendly
            code = EventCode.FRIENDLY_PERIOD_START if friendly else EventCode.FRIENDLY_PERIOD_END
            self._log(meter_t, code, available)
        state = self.disconnect.control_state
        if friendly:
            # No disconnection in a friendly period; a meter cut off for credit comes back on.
            self._reconnect_after_credit(RelayCause.FRIENDLY_PERIOD, meter_t)
        elif (
            state is ControlState.CONNECTED
            and self.disconnect.control_mode != 0
            and self.config.local_disconnect
        ):
            self._fire(Trigger.LOCAL_DISCONNECT, RelayCause.CREDIT, meter_t)
        self._update_status()

    def _add_credit(self, amount: int, meter_t: float) -> None:
        """A top-up: repay debt, then emergency credit used, then credit the rest."""
        self.topups_total += amount
        share = amount * self.config.debt_recovery_percent // 100
        repay = min(self.debt, share)
        self.debt -= repay
        available = self.token_credit.current_credit_amount + amount - repay
        if self.emergency.credit_status in (CreditStatus.IN_USE, CreditStatus.CONSUMED):
            used = self.emergency_owed - self.balances.emergency_balance
            repay = min(used, available)
            available -= repay
            if repay == used:  # fully repaid: the unused rest of the emergency credit lapses
                self.emergency_owed = 0
                self.emergency.current_credit_amount = 0
                self.emergency.credit_status = CreditStatus.SELECTABLE
            else:
                self.emergency_owed -= repay
        self.token_credit.current_credit_amount = available
        if self.balances.available >= self.account.low_credit_threshold:
            self.low_credit_armed = True
        self._after_credit_restored(meter_t)

    def _after_credit_restored(self, meter_t: float) -> None:
        if self.balances.available > 0:
            self.exhausted = False
            self._reconnect_after_credit(RelayCause.TOPUP, meter_t)
        self._update_status()

    def _reconnect_after_credit(self, cause: RelayCause, meter_t: float) -> None:
        """Local reconnection (h) of a meter cut off for credit, where the mode allows it;
        the other modes wait in ready-for-reconnection for the customer's button (e)."""
        if (
            self.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
            and self.relay_cause is RelayCause.CREDIT
        ):
            with contextlib.suppress(TransitionRefused):
                self._fire(Trigger.LOCAL_RECONNECT, cause, meter_t)

    def _invoke_emergency(self, meter_t: float) -> ResultCode:
        if self.emergency.credit_status is not CreditStatus.SELECTABLE:
            return ResultCode.REFUSED_BY_STATE
        if self.balances.available > self.account.low_credit_threshold:
            return ResultCode.REFUSED_BY_STATE
        self.emergency.invoke_credit()
        self.emergency_owed += self.emergency.current_credit_amount
        self._log(meter_t, EventCode.EMERGENCY_CREDIT_INVOKED, self.emergency.current_credit_amount)
        self._after_credit_restored(meter_t)
        return ResultCode.OK

    # -- relay and limiter ------------------------------------------------------------------------

    def _fire(self, trigger: Trigger, cause: RelayCause, meter_t: float) -> str:
        letter = self.disconnect.fire(trigger)
        self.relay_cause = cause
        state = self.disconnect.control_state
        self._log(meter_t, _RELAY_EVENT[state], int(cause), ord(letter))
        if self.relay_welded and not self.disconnect.output_state:
            self._log(meter_t, EventCode.RELAY_WELDED, int(state))
        if self.disconnect.control_state is ControlState.CONNECTED:
            self.limiter_tripped_at = None
        return letter

    def _check_limiter(self, start: float, t: float, demand: int, power: int) -> None:
        """The limiter after a step from ``start`` to ``t`` drew ``power`` (``demand`` wanted)."""
        threshold = self.limiter.threshold_active
        if threshold <= 0:
            return
        meter_t = t + self.clock_offset
        if power > threshold:
            if self.limiter_over_since is None:
                self.limiter_over_since = start
            if t - self.limiter_over_since >= self.limiter.min_over_threshold_duration:
                self.limiter_over_since = None
                try:
                    self._fire(Trigger.LOCAL_DISCONNECT, RelayCause.LIMITER, meter_t)
                except TransitionRefused:
                    return
                self.limiter_tripped_at = t
                self._log(meter_t, EventCode.LIMITER_TRIP, demand, threshold)
            return
        self.limiter_over_since = None
        tripped = self.limiter_tripped_at
        if (
            tripped is not None
            and self.relay_cause is RelayCause.LIMITER
            and self.disconnect.control_state is ControlState.READY_FOR_RECONNECTION
            and t - tripped >= self.limiter.min_under_threshold_duration
        ):
            self.limiter_tripped_at = None
            try:
                self._fire(Trigger.LOCAL_RECONNECT, RelayCause.LIMITER, meter_t)
            except TransitionRefused:
                return  # the customer's button reconnects in this mode
            self._log(meter_t, EventCode.LIMITER_RESTORED)

    def press_button(self, now: float) -> ResultCode:
        """The customer's button: reconnect from ready-for-reconnection (e), or, when connected,
        disconnect by hand (f) in the modes that allow it. Refused without credit outside a
        friendly period."""
        self.advance(now)
        meter_t = self.meter_time
        state = self.disconnect.control_state
        try:
            if state is ControlState.READY_FOR_RECONNECTION:
                if self.balances.available <= 0 and not self.in_friendly_period(meter_t):
                    self._log(meter_t, EventCode.COMMAND_REFUSED, 0, ResultCode.REFUSED_BY_STATE)
                    return ResultCode.REFUSED_BY_STATE
                self._fire(Trigger.MANUAL_RECONNECT, RelayCause.MANUAL, meter_t)
            else:
                self._fire(Trigger.MANUAL_DISCONNECT, RelayCause.MANUAL, meter_t)
        except TransitionRefused as exc:
            return ResultCode(exc.code or ResultCode.REFUSED_BY_STATE)
        self._update_status()
        return ResultCode.OK

    def set_relay_welded(self, now: float, welded: bool = True) -> None:
        """A contactor whose contacts weld shut (a fault a test rig switches on): the relay
        still changes state when told to, but supply stays on, and every switch to open is
        logged as ``relay_welded``. ``welded=False`` mends it."""
        self.advance(now)
        self.relay_welded = welded

    def set_tamper(self, now: float) -> None:
        """A tamper switch (cover opened, magnet): logged and shown in the status until cleared."""
        self.advance(now)
        if not self.tamper:
            self.tamper = True
            self._log(self.meter_time, EventCode.TAMPER_DETECTED)
            self._update_status()

    # -- commands ---------------------------------------------------------------------------------

    def execute(self, envelope: CommandEnvelope) -> CommandResult:
        """Authenticate, check the sequence number and apply a command at most once."""
        meter_t = self.meter_time
        code = int(envelope.command.code)
        if envelope.meter_id != self.config.meter_id:
            result = self._result(envelope.sequence, ResultCode.BAD_ARGUMENT, "another meter's id")
            self._log(meter_t, EventCode.COMMAND_REFUSED, code, ResultCode.BAD_ARGUMENT)
        elif not envelope.verify(self.config.key_bytes):
            result = self._result(envelope.sequence, ResultCode.AUTH_FAILED, "tag does not match")
            self._log(meter_t, EventCode.AUTH_FAILED, code, envelope.sequence)
        elif envelope.sequence <= self.last_seq:
            if envelope.sequence == self.last_seq and _digest(envelope) == self.last_digest:
                result = self.last_exec_result  # a retry: answered again, applied zero times
            else:
                result = self._result(envelope.sequence, ResultCode.REPLAYED, "sequence used")
                self._log(meter_t, EventCode.REPLAY_REFUSED, code, envelope.sequence)
        else:
            result = self.apply(envelope.command, envelope.sequence)
            self.last_seq = envelope.sequence
            self.last_digest = _digest(envelope)
            self.last_exec_result = result
        self.last_result = result
        self._update_status()
        return result

    def _result(self, sequence: int, code: ResultCode, detail: str = "") -> CommandResult:
        return CommandResult(sequence, code, self.last_transfer, detail)

    def apply(self, command: Command, sequence: int = 0) -> CommandResult:
        """Apply a command without the envelope's checks (for a local, trusted caller)."""
        meter_t = self.meter_time
        handler = _HANDLERS[command.code]
        code, detail = handler(self, command, meter_t)
        if not code.accepted and command.code not in _SELF_LOGGING:
            self._log(meter_t, EventCode.COMMAND_REFUSED, int(command.code), int(code))
        self._update_status()
        return self._result(sequence, code, detail)

    def _cmd_disconnect(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        return self._remote_switch(Trigger.REMOTE_DISCONNECT, meter_t)

    def _cmd_reconnect(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        return self._remote_switch(Trigger.REMOTE_RECONNECT, meter_t)

    def _remote_switch(self, trigger: Trigger, meter_t: float) -> tuple[ResultCode, str]:
        try:
            letter = self._fire(trigger, RelayCause.REMOTE, meter_t)
        except TransitionRefused as exc:
            return ResultCode(exc.code or ResultCode.REFUSED_BY_STATE), str(exc)
        return ResultCode.OK, f"transition {letter}"

    def _cmd_credit(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        transfer, amount = command.args
        if transfer == self.last_transfer:
            self._log(meter_t, EventCode.TOPUP_DUPLICATE, transfer)
            return ResultCode.DUPLICATE, f"transfer {transfer} was applied before"
        if transfer < self.last_transfer:
            self._log(meter_t, EventCode.TOPUP_REFUSED, transfer, ResultCode.OLD_TRANSFER)
            return ResultCode.OLD_TRANSFER, f"last applied transfer is {self.last_transfer}"
        problem = self.credit_problem(amount)
        if problem:
            self._log(meter_t, EventCode.TOPUP_REFUSED, transfer, ResultCode.AMOUNT_OUT_OF_BOUNDS)
            return ResultCode.AMOUNT_OUT_OF_BOUNDS, problem
        self.last_transfer = transfer
        self._add_credit(amount, meter_t)
        self._log(meter_t, EventCode.TOPUP_ACCEPTED, transfer, amount)
        return ResultCode.OK, ""

    def credit_problem(self, amount: int) -> str:
        """Why a top-up of ``amount`` cannot be accepted, or "" when it can."""
        config = self.config
        if not config.min_topup <= amount <= config.max_topup:
            return f"amount {amount} outside {config.min_topup}..{config.max_topup}"
        if self.balances.net + amount > config.max_credit:
            return f"credit would exceed the maximum {config.max_credit}"
        return ""

    def _cmd_set_clock(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        (new_time,) = command.args
        if new_time > 2**40:
            return ResultCode.BAD_ARGUMENT, "time out of range"
        old = int(meter_t)
        self.clock_offset = new_time - self.true_time
        self.clock.time = new_time
        self.next_capture = self._next_boundary(self.meter_time)
        code = EventCode.CLOCK_BACKWARDS if new_time < old else EventCode.CLOCK_SET
        self._log(self.meter_time, code, old, new_time)
        return ResultCode.OK, ""

    def _cmd_threshold(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        (threshold,) = command.args
        old = self.account.low_credit_threshold
        self.account.low_credit_threshold = threshold
        self.token_credit.warning_threshold = threshold
        self.low_credit_armed = self.balances.available >= threshold
        self._log(meter_t, EventCode.THRESHOLD_CHANGED, old, threshold)
        return ResultCode.OK, ""

    def _cmd_mode(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        (mode,) = command.args
        old = self.disconnect.control_mode
        before = self.disconnect.control_state
        self.disconnect.set_mode(mode)
        self._log(meter_t, EventCode.CONTROL_MODE_CHANGED, old, mode)
        if self.disconnect.control_state is not before:
            self.relay_cause = RelayCause.MODE_CHANGE
            self._log(meter_t, _RELAY_EVENT[self.disconnect.control_state], RelayCause.MODE_CHANGE)
        return ResultCode.OK, ""

    def _cmd_emergency(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        if not self.config.emergency_credit:
            return ResultCode.NOT_SUPPORTED, "no emergency credit configured"
        code = self._invoke_emergency(meter_t)
        if code is not ResultCode.OK:
            return code, (
                f"emergency credit is {self.emergency.credit_status.name.lower()}"
                if self.emergency.credit_status is not CreditStatus.SELECTABLE
                else "credit is above the low-credit threshold"
            )
        return code, ""

    def _cmd_clear_tamper(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        if self.tamper:
            self.tamper = False
            self._log(meter_t, EventCode.TAMPER_CLEARED)
        return ResultCode.OK, ""

    def _cmd_token(self, command: Command, meter_t: float) -> tuple[ResultCode, str]:
        (number,) = command.args
        outcome = self.enter_token(f"{number:020d}", method=0)
        return outcome.result, outcome.detail

    def enter_token(self, digits: str, method: int = 1) -> TokenEntryResult:
        """A 20-digit STS token from the keypad (method 1) or the head-end (method 0).

        The keypad decodes and checks it (format, key, TID memory, key expiry); the meter then
        checks what only it knows (the credit limits) before the token counts as used. A refused
        token changes nothing but the token gateway's status and an event.
        """
        meter_t = self.meter_time
        gateway = self.token_gateway
        gateway.enter(digits, int(meter_t), method)
        if self.keypad is None:
            gateway.token_status = TokenStatus.EXECUTION_FAILED
            self._log(meter_t, EventCode.TOKEN_REFUSED, int(TokenStatus.EXECUTION_FAILED), 0)
            return TokenEntryResult(
                TokenStatus.EXECUTION_FAILED,
                ResultCode.NOT_SUPPORTED,
                "no_keypad",
                None,
                "this meter has no STS decoder",
            )
        decision = self.keypad.evaluate(digits, meter_t)
        if decision.refusal is not None or decision.action is None:
            refusal = decision.refusal or KeypadRefusal.FORMAT
            return self._token_refused(decision.status, refusal, meter_t, refusal.name.lower())
        action = decision.action
        if isinstance(action, AddCredit):
            problem = self.credit_problem(action.wh)
            if problem:
                return self._token_refused(
                    TokenStatus.EXECUTION_FAILED, KeypadRefusal.OVER_LIMIT, meter_t, problem
                )
        if isinstance(action, ClearCredit) and action.mask not in _CLEARS_ELECTRICITY:
            return self._token_refused(
                TokenStatus.VALIDATION_FAILED,
                KeypadRefusal.FORMAT,
                meter_t,
                f"clears register {action.mask}; this meter has only electricity (0)",
            )
        self.keypad.commit(decision)
        detail = self._apply_token_action(action, meter_t)
        gateway.token_status = TokenStatus.EXECUTION_OK
        token_class = getattr(decision.token, "token_class", 0)
        self._log(meter_t, EventCode.TOKEN_ACCEPTED, int(token_class), _action_value(action))
        if isinstance(decision.token, TID_TOKEN_TYPES):
            self._log(meter_t, EventCode.TOKEN_TID, decision.token.tid, int(token_class))
        self._update_status()
        return TokenEntryResult(TokenStatus.EXECUTION_OK, ResultCode.OK, "", None, detail)

    def _token_refused(
        self, status: TokenStatus, refusal: KeypadRefusal, meter_t: float, detail: str
    ) -> TokenEntryResult:
        self.token_gateway.token_status = status
        self._log(meter_t, EventCode.TOKEN_REFUSED, int(status), int(refusal))
        return TokenEntryResult(
            status, ResultCode.TOKEN_REFUSED, refusal.name.lower(), int(refusal), detail
        )

    def _apply_token_action(self, action: KeypadAction, meter_t: float) -> str:
        match action:
            case AddCredit(wh=wh):
                self.topups_via_tokens += wh
                self._add_credit(wh, meter_t)
                return f"credit {wh} Wh"
            case SetPowerLimit(watts=watts):
                self.limiter.threshold_active = watts
                self.limiter.threshold_normal = watts
                self._log(meter_t, EventCode.POWER_LIMIT_SET, watts)
                return f"power limit {watts} W"
            case ClearCredit():
                cleared = self.token_credit.current_credit_amount
                self.token_credit.current_credit_amount = 0
                self.cleared_total += cleared
                self._log(meter_t, EventCode.CREDIT_CLEARED, cleared)
                self._check_credit(meter_t)
                return f"credit cleared ({cleared})"
            case ClearTamper():
                if self.tamper:
                    self.tamper = False
                    self._log(meter_t, EventCode.TAMPER_CLEARED)
                return "tamper cleared"
            case SetPhaseUnbalanceLimit(watts=watts):
                self.phase_unbalance_limit_w = watts
                return f"phase unbalance limit {watts} W"
            case KeyChange():
                self._log(meter_t, EventCode.KEY_CHANGED, action.key_revision, action.tariff_index)
                return (
                    f"key changed: revision {action.key_revision}, tariff index "
                    f"{action.tariff_index}, base date {action.base_date}"
                )
            case KeyChangePending():
                return "first half of a key change stored; enter the second"
            case TestToken(control=control):
                return f"test token, control {control:#x}"
        raise AssertionError(f"unhandled keypad action {action!r}")  # pragma: no cover

    # -- records ----------------------------------------------------------------------------------

    def _log(self, meter_t: float, code: EventCode, a: int = 0, b: int = 0) -> None:
        self.event_seq += 1
        event = Event(self.event_seq, int(meter_t), code, int(a), int(b))
        self.event_log.capture(event.to_row())
        for listener in list(self.listeners):
            listener(event)

    def _capture_profile(self) -> None:
        total = self.energy.value
        self._update_status()
        # a ProfileRow's columns (ProfileRow.to_row), built without the object: hot path
        row = (
            self.next_capture,
            total,
            total - self.last_capture_energy,
            self._available(),
            self._status_bits,
        )
        self.load_profile.capture(row)
        self.last_capture_energy = total
        self.next_capture = self._next_boundary(self.meter_time)

    def events_since(self, seq: int, limit: int = 100) -> list[Event]:
        rows = [row for row in self.event_log if row[1] > seq]
        return [Event.from_row(row) for row in rows[:limit]]

    def events_between(self, start: int, end: int) -> list[Event]:
        return [Event.from_row(row) for row in self.event_log.select_range(start, end)]

    def profile_between(self, start: int, end: int) -> list[ProfileRow]:
        return [ProfileRow.from_row(row) for row in self.load_profile.select_range(start, end)]

    # -- reading ----------------------------------------------------------------------------------

    def read(self, obis: Obis, attribute: int = 2) -> Any:
        obj = self.objects.get(obis)
        if obj is None:
            raise ValidationError(f"no object {obis} in this meter")
        return obj.get(attribute)

    def _update_status(self) -> None:
        """Recompute the status bits and the account's derived attributes (hot path: plain ints)."""
        available = self._available()
        ec_status = self.emergency.credit_status
        bits = self._bits(available, self.in_friendly_period())
        if bits != self._status_bits:
            self._status_bits = bits
            self.status = StatusFlag(bits)
            account_bits = 0
            for flag, bit in _ACCOUNT_BITS:
                if bits & flag:
                    account_bits |= 1 << bit
            self.account.current_credit_status = account_bits
        self.account.available_credit = available
        self.account.aggregated_debt = self.debt + self.emergency_owed
        self.account.current_credit_in_use = (
            OBIS_EMERGENCY_CREDIT
            if ec_status is CreditStatus.IN_USE and not self.token_credit.current_credit_amount
            else OBIS_TOKEN_CREDIT
        )

    def _bits(self, available: int, friendly: bool) -> int:
        """The status bits with ``available`` credit, in a friendly period or not."""
        bits = _IN_CREDIT if available > 0 else _OUT_OF_CREDIT
        if available < self.account.low_credit_threshold:
            bits |= _LOW_CREDIT
        ec_status = self.emergency.credit_status
        if ec_status is CreditStatus.IN_USE:
            bits |= _EC_IN_USE
        elif ec_status is CreditStatus.SELECTABLE:
            bits |= _EC_AVAILABLE
        if friendly:
            bits |= _FRIENDLY
        if self.tamper:
            bits |= _TAMPER
        if self.relay_cause is RelayCause.LIMITER and not self.disconnect.output_state:
            bits |= _LIMITER_TRIPPED
        return bits

    def snapshot_values(self) -> SnapshotValues:
        """The fields of :meth:`snapshot` in ``MeterSnapshot``'s order, as a plain tuple: the
        snapshot is built from it, so two equal tuples are two equal snapshots. The Modbus
        server compares it with the one it last encoded and encodes again only when it differs
        (building no ``MeterSnapshot`` for that)."""
        emergency = self.emergency
        ec_balance = (
            emergency.current_credit_amount if emergency.credit_status is CreditStatus.IN_USE else 0
        )
        config = self.config
        account = self.account
        disconnect = self.disconnect
        rates = self.rates
        return (
            config.meter_id,
            int(self.true_time + self.clock_offset),
            self.energy.value,
            (rates[0].value, rates[1].value, rates[2].value, rates[3].value),
            self.power.value,
            self.voltage.value,
            self.current.value,
            self.power_factor.value,
            self.frequency.value,
            self.token_credit.current_credit_amount,
            ec_balance,
            self.debt + max(self.emergency_owed - ec_balance, 0),
            account.credit_unit,
            config.currency if config.credit_unit == "money" else "Wh",
            account.currency_scale,
            account.low_credit_threshold,
            disconnect.control_state,
            disconnect.control_mode,
            self.status,
            self.event_seq,
            self.last_transfer,
            self.last_seq,
        )

    def snapshot(self) -> MeterSnapshot:
        return MeterSnapshot(*self.snapshot_values())

    # -- non-volatile state -----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything the meter must remember across a power cut, JSON-serialisable."""
        return {
            "version": STATE_VERSION,
            "meter_id": self.config.meter_id,
            "true_time": self.true_time,
            "clock_offset": self.clock_offset,
            "energy": self.energy.value,
            "rates": [r.value for r in self.rates],
            "energy_residue_mj": self.energy_residue_mj,
            "charge_residue": self.charge_residue,
            "credit": self.token_credit.current_credit_amount,
            "emergency_amount": self.emergency.current_credit_amount,
            "emergency_status": int(self.emergency.credit_status),
            "emergency_owed": self.emergency_owed,
            "debt": self.debt,
            "initial_credit": self.initial_credit,
            "topups_total": self.topups_total,
            "charges_total": self.charges_total,
            "total_amount_paid": self.charge.total_amount_paid,
            "last_collection_amount": self.charge.last_collection_amount,
            "low_credit_threshold": self.account.low_credit_threshold,
            "control_mode": self.disconnect.control_mode,
            "control_state": int(self.disconnect.control_state),
            "relay_cause": int(self.relay_cause),
            "limiter_threshold": self.limiter.threshold_active,
            "limiter_threshold_normal": self.limiter.threshold_normal,
            "limiter_over_since": self.limiter_over_since,
            "friendly_active": self.friendly_active,
            "limiter_tripped_at": self.limiter_tripped_at,
            "phase_unbalance_limit_w": self.phase_unbalance_limit_w,
            "last_transfer": self.last_transfer,
            "last_seq": self.last_seq,
            "seq_key_id": self.seq_key_id,
            "last_digest": self.last_digest,
            "last_exec_result": _result_to_state(self.last_exec_result),
            "last_result": _result_to_state(self.last_result),
            "event_seq": self.event_seq,
            "tamper": self.tamper,
            "relay_welded": self.relay_welded,
            "low_credit_armed": self.low_credit_armed,
            "exhausted": self.exhausted,
            "last_capture_energy": self.last_capture_energy,
            "next_capture": self.next_capture,
            "token_gateway": {
                "token": self.token_gateway.token,
                "time": self.token_gateway.token_time,
                "status": int(self.token_gateway.token_status),
                "method": self.token_gateway.token_delivery_method,
            },
            "keypad": self.keypad.to_state() if self.keypad is not None else None,
            "topups_via_tokens": self.topups_via_tokens,
            "cleared_total": self.cleared_total,
            # the rows are tuples of ints that are never changed in place: shared, not copied
            # (a save takes every meter's state, up to thousands of rows each)
            "events": list(self.event_log.buffer),
            "profile": list(self.load_profile.buffer),
        }

    @classmethod
    def from_state(
        cls,
        config: MeterConfig,
        state: dict[str, Any],
        now: float | None,
        load: LoadModel,
    ) -> Meter:
        """Restore a meter saved by :meth:`to_state` and power it up at ``now``, logging the
        power-down/power-up pair. ``now=None`` restores it as saved, without a power cycle
        (to inspect a stopped meter)."""
        if state.get("version") != STATE_VERSION:
            raise ValidationError(f"unknown state version {state.get('version')!r}")
        if state.get("meter_id") != config.meter_id:
            raise ValidationError(
                f"state belongs to meter {state.get('meter_id')!r}, not {config.meter_id!r}"
            )
        meter = cls(config, state["true_time"], load)
        meter.clock_offset = float(state["clock_offset"])
        meter.energy.value = int(state["energy"])
        for register, value in zip(meter.rates, state["rates"], strict=True):
            register.value = int(value)
        meter.energy_residue_mj = int(state["energy_residue_mj"])
        meter.charge_residue = int(state["charge_residue"])
        meter.token_credit.current_credit_amount = int(state["credit"])
        meter.emergency.current_credit_amount = int(state["emergency_amount"])
        meter.emergency.credit_status = CreditStatus(state["emergency_status"])
        meter.emergency_owed = int(state["emergency_owed"])
        meter.debt = int(state["debt"])
        meter.initial_credit = int(state["initial_credit"])
        meter.topups_total = int(state["topups_total"])
        meter.charges_total = int(state["charges_total"])
        meter.charge.total_amount_paid = int(state["total_amount_paid"])
        meter.charge.last_collection_amount = int(state.get("last_collection_amount", 0))
        meter.account.low_credit_threshold = int(state["low_credit_threshold"])
        meter.token_credit.warning_threshold = meter.account.low_credit_threshold
        meter.disconnect.control_mode = int(state["control_mode"])
        meter.disconnect.control_state = ControlState(state["control_state"])
        meter.relay_cause = RelayCause(state["relay_cause"])
        meter.limiter.threshold_active = int(state["limiter_threshold"])
        meter.limiter.threshold_normal = int(
            state.get("limiter_threshold_normal", meter.limiter.threshold_active)
        )
        over_since = state.get("limiter_over_since")
        meter.limiter_over_since = None if over_since is None else float(over_since)
        meter.friendly_active = bool(state.get("friendly_active", False))
        meter.limiter_tripped_at = state["limiter_tripped_at"]
        meter.phase_unbalance_limit_w = int(state["phase_unbalance_limit_w"])
        meter.last_transfer = int(state["last_transfer"])
        meter.last_seq = int(state["last_seq"])
        saved_key_id = str(state.get("seq_key_id", meter.seq_key_id))
        meter.last_digest = str(state["last_digest"])
        meter.last_exec_result = _result_from_state(state["last_exec_result"])
        meter.last_result = _result_from_state(state["last_result"])
        meter.event_seq = int(state["event_seq"])
        meter.tamper = bool(state["tamper"])
        meter.relay_welded = bool(state.get("relay_welded", False))
        meter.low_credit_armed = bool(state["low_credit_armed"])
        meter.exhausted = bool(state["exhausted"])
        meter.last_capture_energy = int(state["last_capture_energy"])
        meter.next_capture = int(state["next_capture"])
        gateway = state["token_gateway"]
        meter.token_gateway.token = str(gateway["token"])
        meter.token_gateway.token_time = int(gateway["time"])
        meter.token_gateway.token_status = TokenStatus(gateway["status"])
        meter.token_gateway.token_delivery_method = int(gateway["method"])
        if config.sts is not None:
            meter.keypad = StsKeypad(config.sts, state.get("keypad"))
        meter.topups_via_tokens = int(state.get("topups_via_tokens", 0))
        meter.cleared_total = int(state.get("cleared_total", 0))
        for row in state["events"]:
            meter.event_log.capture(tuple(int(v) for v in row))
        for row in state["profile"]:
            meter.load_profile.capture(tuple(int(v) for v in row))
        meter.clock.time = int(meter.meter_time)
        meter._update_status()
        if now is None:
            if saved_key_id != meter.seq_key_id:
                meter._restart_sequence()
            return meter
        # The meter was off from its last save until now: no energy, no charges.
        saved_at = meter.meter_time
        meter._log(saved_at, EventCode.POWER_DOWN)
        meter.true_time = max(meter.true_time, now)
        meter.next_capture = meter._next_boundary(meter.meter_time)
        meter.clock.time = int(meter.meter_time)
        meter._log(meter.meter_time, EventCode.POWER_UP, int(meter.meter_time - saved_at))
        if saved_key_id != meter.seq_key_id:
            meter._restart_sequence()
        meter._update_status()
        return meter

    def _restart_sequence(self) -> None:
        """The meter runs under a new command key: its sequence starts again from 0.

        Commands counted under the old key cannot come back (their tags do not match the new
        key), so the restart opens nothing to a replay; it is the documented way out of the top
        of the sequence range.
        """
        self._log(self.meter_time, EventCode.SEQUENCE_RESET, self.last_seq, 0)
        self.last_seq = 0
        self.last_digest = ""
        self.last_exec_result = CommandResult(0, ResultCode.NONE)


@dataclass(frozen=True, slots=True)
class TokenEntryResult:
    """What became of a token: the DLMS token status, the command result, and why."""

    status: TokenStatus
    result: ResultCode
    reason: str = ""  # the keypad refusal in words ("used", "old", ...), "" when accepted
    refusal: int | None = None  # meter_sim.keypad.KeypadRefusal value
    detail: str = ""


def _action_value(action: KeypadAction) -> int:
    """The number an accepted token's event carries: Wh, W or the clear-credit mask."""
    for name in ("wh", "watts", "mask", "key_revision", "control"):
        value = getattr(action, name, None)
        if isinstance(value, int):
            return value
    return 0


def _allows(mode: int, state: ControlState, trigger: Trigger) -> bool:
    """Whether ``trigger`` changes ``state`` in ``mode`` (a refused trigger changes nothing)."""
    try:
        find_transition(mode, state, trigger)
    except TransitionRefused:
        return False
    return True


def _digest(envelope: CommandEnvelope) -> str:
    body = f"{envelope.meter_id}|{envelope.sequence}|{int(envelope.command.code)}|"
    body += ",".join(str(v) for v in envelope.command.args)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def _result_to_state(result: CommandResult) -> list[Any]:
    return [result.sequence, int(result.code), result.last_transfer, result.detail]


def _result_from_state(raw: list[Any]) -> CommandResult:
    sequence, code, last_transfer, detail = raw
    return CommandResult(int(sequence), ResultCode(code), int(last_transfer), str(detail))


_CLEARS_ELECTRICITY = frozenset({0, CLEAR_ALL_REGISTERS})  # STS register 0 is electricity
_IN_CREDIT = int(StatusFlag.IN_CREDIT)
_OUT_OF_CREDIT = int(StatusFlag.OUT_OF_CREDIT)
_LOW_CREDIT = int(StatusFlag.LOW_CREDIT)
_EC_IN_USE = int(StatusFlag.EMERGENCY_CREDIT_IN_USE)
_EC_AVAILABLE = int(StatusFlag.EMERGENCY_CREDIT_AVAILABLE)
_FRIENDLY = int(StatusFlag.FRIENDLY_PERIOD)
_TAMPER = int(StatusFlag.TAMPER)
_LIMITER_TRIPPED = int(StatusFlag.LIMITER_TRIPPED)
_ACCOUNT_BITS = (
    (_IN_CREDIT, CreditStatusBit.IN_CREDIT),
    (_LOW_CREDIT, CreditStatusBit.LOW_CREDIT),
    (_EC_IN_USE, CreditStatusBit.SELECTABLE_CREDIT_IN_USE),
    (_OUT_OF_CREDIT, CreditStatusBit.OUT_OF_CREDIT),
)
_SELF_LOGGING = frozenset({CommandCode.CREDIT_TRANSFER, CommandCode.ENTER_TOKEN})
_Handler = Callable[[Meter, Command, float], tuple[ResultCode, str]]
_HANDLERS: dict[CommandCode, _Handler] = {
    CommandCode.REMOTE_DISCONNECT: Meter._cmd_disconnect,
    CommandCode.REMOTE_RECONNECT: Meter._cmd_reconnect,
    CommandCode.CREDIT_TRANSFER: Meter._cmd_credit,
    CommandCode.SET_CLOCK: Meter._cmd_set_clock,
    CommandCode.SET_LOW_CREDIT_THRESHOLD: Meter._cmd_threshold,
    CommandCode.SET_CONTROL_MODE: Meter._cmd_mode,
    CommandCode.INVOKE_EMERGENCY_CREDIT: Meter._cmd_emergency,
    CommandCode.CLEAR_TAMPER: Meter._cmd_clear_tamper,
    CommandCode.ENTER_TOKEN: Meter._cmd_token,
}
