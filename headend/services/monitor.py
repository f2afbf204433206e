"""The balance monitor: one notice per downward crossing of an account's low, critical or
exhausted threshold, re-armed only once the balance is back above the threshold plus a margin;
and one reminder when, at the account's own pace of the last two weeks, the credit lasts fewer
than ``horizon_days`` days while it is still above the low threshold.

The crossings and their notices are written in one transaction, the accounts' alert levels
changed by compare-and-set (one UPDATE per pair of levels, however many accounts crossed), so
a crossing is one notice however often the monitor runs, across restarts and with several
workers; the notices go in as one insert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from headend.domain.notices import Channel, Kind, QuietHours, deliver_at
from headend.storage import Database
from headend.storage.balances import (
    LEVEL_CRITICAL,
    LEVEL_EXHAUSTED,
    LEVEL_LOW,
    Recipient,
    forecast_changes,
    level_changes,
    set_forecasts_sent,
    set_levels,
)
from headend.storage.mandates import collect_charges, note_crossing
from headend.storage.notices import enqueue_many, notice_row
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
            won = await set_levels(session, [(c.account_id, c.old, c.new) for c in changes])
            notices: list[dict[str, Any]] = []
            for change in changes:
                if change.account_id not in won:
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
                notices.append(
                    notice_row(
                        key=f"{kind}:{change.account_id}:{change.meter_id}:{change.recipient.meter_time}",
                        kind=kind,
                        channel=channel,
                        address=address,
                        language=change.recipient.language,
                        values={
                            "meter": change.meter_id,
                            "balance": balance_text(change.recipient),
                        },
                        now=now,
                        deliver_at=deliver_at(kind, channel, now, self.quiet),
                        expires_at=now + self.expiry,
                        meter_id=change.meter_id,
                        account_id=change.account_id,
                    )
                )
            result.notices += await enqueue_many(session, notices)
            forecasts = await forecast_changes(session, self.horizon_days)
            won = await set_forecasts_sent(
                session, [(f.account_id, not f.send, f.send) for f in forecasts]
            )
            notices = []
            for forecast in forecasts:
                if forecast.account_id not in won:
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
                notices.append(
                    notice_row(
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
                )
            result.reminders += await enqueue_many(session, notices)
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
