"""What the head-end tells customers and operators, in their language, and when.

A notice is a kind, a language, a channel and the values it reports; :func:`render` turns it
into a subject and a body from the template table. :func:`deliver_at` applies the customer's
quiet hours: no SMS at night, except the notice that their supply was cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from string import Formatter
from typing import Final

from protocols.errors import ValidationError


class Kind(StrEnum):
    LOW_CREDIT = "low_credit"
    CRITICAL = "critical"
    FORECAST = "forecast"  # credit will last fewer than N days at the account's own pace
    EXHAUSTED = "exhausted"
    DISCONNECTED = "disconnected"
    READY_FOR_RECONNECTION = "ready_for_reconnection"  # press the button
    RECONNECTED = "reconnected"
    PAYMENT_RECEIVED = "payment_received"
    COMMAND_FAILED = "command_failed"  # to operators
    BILL = "bill"  # the monthly bill, its PDF attached


class Channel(StrEnum):
    SMS = "sms"
    EMAIL = "email"
    WEBHOOK = "webhook"
    LOG = "log"
    FILE = "file"


#: (kind, language) -> (subject, body); placeholders are filled from the notice's values
TEMPLATES: Final[dict[tuple[Kind, str], tuple[str, str]]] = {
    (Kind.LOW_CREDIT, "en"): (
        "Low credit on meter {meter}",
        "Your electricity credit on meter {meter} is low: {balance} left. Top up soon.",
    ),
    (Kind.LOW_CREDIT, "zh"): (
        "电表 {meter} 余额不足",
        "您的电表 {meter} 余额不足，剩余 {balance}。请尽快充值。",
    ),
    (Kind.CRITICAL, "en"): (
        "Credit almost used up on meter {meter}",
        "Only {balance} of electricity credit is left on meter {meter}. Top up now to keep "
        "your supply.",
    ),
    (Kind.CRITICAL, "zh"): (
        "电表 {meter} 余额即将用尽",
        "您的电表 {meter} 仅剩 {balance}。请立即充值以免停电。",
    ),
    (Kind.FORECAST, "en"): (
        "About {days} day(s) of credit left on meter {meter}",
        "At your recent use, the {balance} on meter {meter} lasts about {days} more day(s).",
    ),
    (Kind.FORECAST, "zh"): (
        "电表 {meter} 余额约可用 {days} 天",
        "按您近期的用电量，电表 {meter} 的余额 {balance} 约可再用 {days} 天。",
    ),
    (Kind.EXHAUSTED, "en"): (
        "Credit used up on meter {meter}",
        "The credit on meter {meter} is used up. Top up to keep or restore your supply.",
    ),
    (Kind.EXHAUSTED, "zh"): (
        "电表 {meter} 余额已用尽",
        "您的电表 {meter} 余额已用尽。请充值以保持或恢复供电。",
    ),
    (Kind.DISCONNECTED, "en"): (
        "Supply disconnected at meter {meter}",
        "Your electricity supply at meter {meter} was disconnected: {reason}. Top up to have "
        "it restored.",
    ),
    (Kind.DISCONNECTED, "zh"): (
        "电表 {meter} 已停电",
        "您的电表 {meter} 已停止供电：{reason}。充值后即可恢复。",
    ),
    (Kind.READY_FOR_RECONNECTION, "en"): (
        "Press the button on meter {meter}",
        "Your supply at meter {meter} is ready to be restored: press the button on the meter.",
    ),
    (Kind.READY_FOR_RECONNECTION, "zh"): (
        "请按电表 {meter} 上的按钮",
        "电表 {meter} 已可恢复供电：请按电表上的按钮。",
    ),
    (Kind.RECONNECTED, "en"): (
        "Supply restored at meter {meter}",
        "Your electricity supply at meter {meter} is back on.",
    ),
    (Kind.RECONNECTED, "zh"): ("电表 {meter} 已恢复供电", "您的电表 {meter} 已恢复供电。"),
    (Kind.PAYMENT_RECEIVED, "en"): (
        "Payment received: {amount}",
        "We received {amount} for meter {meter}. New balance: {balance}.{token_line}",
    ),
    (Kind.PAYMENT_RECEIVED, "zh"): (
        "已收到付款：{amount}",
        "已收到电表 {meter} 的付款 {amount}。新余额：{balance}。{token_line}",
    ),
    (Kind.COMMAND_FAILED, "en"): (
        "Command failed on meter {meter}",
        "The {command} command to meter {meter} failed: {reason}.",
    ),
    (Kind.COMMAND_FAILED, "zh"): (
        "电表 {meter} 命令失败",
        "发往电表 {meter} 的 {command} 命令失败：{reason}。",
    ),
    (Kind.BILL, "en"): (
        "Your electricity bill {number} for {month}",
        "Your bill for account {account}, {month}, is attached. Paid in the month: {paid}. "
        "Balance at the month's end: {balance}.",
    ),
    (Kind.BILL, "zh"): (
        "您 {month} 的电费账单 {number}",
        "账户 {account} {month} 的账单见附件。本月付款：{paid}。月末余额：{balance}。",
    ),
}
LANGUAGES: Final = ("en", "zh")
#: an SMS is this long at most (three concatenated parts); longer bodies are refused
SMS_MAX: Final = 459


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    body: str


def render(kind: Kind, language: str, values: dict[str, str], channel: Channel) -> Rendered:
    """The notice's text; ValidationError for an unknown language or a missing value."""
    language = language if (kind, language) in TEMPLATES else "en"
    subject, body = TEMPLATES[(kind, language)]
    needed = {name for _, name, _, _ in Formatter().parse(subject + body) if name}
    missing = needed - set(values)
    if missing:
        raise ValidationError(f"a {kind} notice needs {', '.join(sorted(missing))}")
    rendered = Rendered(subject.format(**values), body.format(**values))
    if channel is Channel.SMS and len(rendered.body) > SMS_MAX:
        raise ValidationError(f"an SMS is at most {SMS_MAX} characters")
    return rendered


@dataclass(frozen=True, slots=True)
class QuietHours:
    """No SMS between ``start`` and ``end`` (minutes of the customer's local day; the span may
    cross midnight), except a disconnection notice."""

    start: int = 21 * 60
    end: int = 7 * 60
    utc_offset_minutes: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.start < 1440 and 0 <= self.end < 1440):
            raise ValidationError("quiet hours are minutes of the day, 0..1439")

    def is_quiet(self, minute: int) -> bool:
        """Whether ``minute`` of the local day is inside the quiet hours."""
        if self.start == self.end:
            return False
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def deliver_at(kind: Kind, channel: Channel, now: datetime, quiet: QuietHours) -> datetime:
    """When a notice raised ``now`` may go out."""
    if channel is not Channel.SMS or kind is Kind.DISCONNECTED:
        return now
    zone = timezone(timedelta(minutes=quiet.utc_offset_minutes))
    local = now.astimezone(zone)
    minute = local.hour * 60 + local.minute
    if not quiet.is_quiet(minute):
        return now
    wait = (quiet.end - minute) % 1440
    ends = (local + timedelta(minutes=wait)).replace(second=0, microsecond=0)
    return ends.astimezone(now.tzinfo)
