"""The balance monitor: one notice per downward crossing of an account's low, critical or
exhausted threshold, re-armed only once the balance is back above the threshold plus a margin;
and one reminder when, at the account's own pace of the last two weeks, the credit lasts fewer
than ``horizon_days`` days while it is still above the low threshold.

The crossing and its notice are written in one transaction, with the account's alert level
changed by compare-and-set, so a crossing is one notice however often the monitor runs, across
restarts and with several workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from headend.domain.notices import Channel, Kind, QuietHours, deliver_at
from headend.storage import Database
from headend.storage.balances import (
    LEVEL_CRITICAL,
    LEVEL_EXHAUSTED,
    LEVEL_LOW,
    Recipient,
    forecast_changes,
    level_changes,
    set_forecast_sent,
    set_level,
)
from headend.storage.mandates import collect_charges, note_crossing
from headend.storage.notices import enqueue
from protocols.clock import Clock
from protocols.errors import StorageError
from protocols.units import decimal_text

log = logging.getLogger(__name__)

KIND_OF_LEVEL = {
    LEVEL_LOW: Kind.LOW_CREDIT,
    LEVEL_CRITICAL: Kind.CRITICAL,
    LEVEL_EXHAUSTED: Kind.EXHAUSTED,
}


@dataclass(slots=True)
class MonitorRound:
    notices: int = 0
    reminders: int = 0  # forecast reminders
    rearmed: int = 0
    silent: int = 0  # crossings of customers who take no notices
    debits: int = 0  # auto-debit payments made for crossings of the low threshold


def balance_text(recipient: Recipient) -> str:
    if recipient.credit_unit == "energy":
        return f"{decimal_text(recipient.credit, -3)} kWh"
    return f"{decimal_text(recipient.credit, recipient.currency_scale)} {recipient.currency}"


def _address(recipient: Recipient) -> tuple[Channel, str] | None:
    if recipient.channel == "sms" and recipient.phone:
        return Channel.SMS, recipient.phone
    if recipient.channel == "email" and recipient.email:
        return Channel.EMAIL, recipient.email
    return None


class BalanceMonitor:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        margin_percent: int = 10,
        horizon_days: int = 3,
        quiet: QuietHours | None = None,
        expiry: timedelta = timedelta(hours=24),
    ) -> None:
        self.db = db
        self.clock = clock
        self.margin_percent = margin_percent
        self.horizon_days = horizon_days
        self.quiet = quiet or QuietHours()
        self.expiry = expiry

    async def evaluate(self) -> MonitorRound:
        """One pass over the whole fleet."""
        now = datetime.fromtimestamp(self.clock.now(), UTC)
        result = MonitorRound()
        async with self.db.read() as session:  # the usual pass finds nothing: no write lock
            if not await level_changes(session, self.margin_percent) and not (
                await forecast_changes(session, self.horizon_days)
            ):
                return await self._auto_debit(result, now)
        async with self.db.begin() as session:
            changes = await level_changes(session, self.margin_percent)
            for change in changes:
                if not await set_level(session, change.account_id, change.old, change.new):
                    continue  # another worker took this crossing
                if change.new < change.old:
                    result.rearmed += 1
                    continue
                if change.old < LEVEL_LOW <= change.new:  # an auto-debit mandate's cue
                    await note_crossing(
                        session,
                        change.account_id,
                        change.meter_id,
                        meter_time=change.recipient.meter_time,
                        credit=change.recipient.credit,
                        now=now,
                    )
                target = _address(change.recipient)
                if target is None:
                    result.silent += 1
                    continue
                channel, address = target
                kind = KIND_OF_LEVEL[change.new]
                await enqueue(
                    session,
                    key=f"{kind}:{change.account_id}:{change.meter_id}:{change.recipient.meter_time}",
                    kind=kind,
                    channel=channel,
                    address=address,
                    language=change.recipient.language,
                    values={"meter": change.meter_id, "balance": balance_text(change.recipient)},
                    now=now,
                    deliver_at=deliver_at(kind, channel, now, self.quiet),
                    expires_at=now + self.expiry,
                    meter_id=change.meter_id,
                    account_id=change.account_id,
                )
                result.notices += 1
            for forecast in await forecast_changes(session, self.horizon_days):
                if not await set_forecast_sent(
                    session, forecast.account_id, not forecast.send, forecast.send
                ):
                    continue
                if not forecast.send:
                    result.rearmed += 1
                    continue
                target = _address(forecast.recipient)
                if target is None:
                    result.silent += 1
                    continue
                channel, address = target
                kind = Kind.FORECAST
                await enqueue(
                    session,
                    key=f"{kind}:{forecast.account_id}:{forecast.meter_id}:{forecast.recipient.meter_time}",
                    kind=kind,
                    channel=channel,
                    address=address,
                    language=forecast.recipient.language,
                    values={
                        "meter": forecast.meter_id,
                        "balance": balance_text(forecast.recipient),
                        "days": str(forecast.days_left),
                    },
                    now=now,
                    deliver_at=deliver_at(kind, channel, now, self.quiet),
                    expires_at=now + self.expiry,
                    meter_id=forecast.meter_id,
                    account_id=forecast.account_id,
                )
                result.reminders += 1
        return await self._auto_debit(result, now)

    async def _auto_debit(self, result: MonitorRound, now: datetime) -> MonitorRound:
        """Pay the auto-debit charges the crossings left (headend.storage.mandates)."""
        result.debits = (await collect_charges(self.db, now, actor="monitor")).paid
        return result

    async def run(self, stop: asyncio.Event, tick: float = 10.0) -> None:
        while not stop.is_set():
            try:
                await self.evaluate()
            except StorageError as exc:
                log.error("balance monitor: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), tick)
