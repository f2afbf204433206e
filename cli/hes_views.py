"""`hes status`, `hes readings` and the story behind `hes meters show`."""

from __future__ import annotations

import csv
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, parse_duration, print_json
from cli.hes_db import DbOption, with_db
from headend.domain.validation import Flag
from headend.storage.registry import meter_dict
from headend.storage.schema import Interval, Reading
from headend.storage.views import (
    Export,
    FleetStatus,
    MeterStory,
    credit_band,
    event_name,
    export,
    fleet_status,
    meter_story,
    relay_name,
)
from protocols.units import decimal_text

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def parse_instant(text: str) -> datetime:
    """``2026-03-01``, ``2026-03-01T12:00``, ``…Z`` / ``…+03:00`` (UTC when no zone), ``now``,
    or a duration ago (``7d``, ``12h``)."""
    if text == "now":
        return datetime.now(UTC)
    if text[:1].isdigit() and text[-1:] in "smhdw" and "-" not in text:
        return datetime.now(UTC) - timedelta(seconds=parse_duration(text))
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise typer.BadParameter(
            f"not a time: {text!r} (2026-03-01, 2026-03-01T12:00Z, now, 7d)"
        ) from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _flags(value: int) -> str:
    return ",".join((f.name or "").lower() for f in Flag if f & value) if value else ""


# -- status ---------------------------------------------------------------------------------------


@handle_errors
def status(
    stale: Annotated[
        str, typer.Option(help="Data older than this is stale (e.g. 30m, 2h).")
    ] = "30m",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The fleet at a glance: meters by health, relay state and credit band; stale meters;
    the last poll."""

    stale_after = timedelta(seconds=parse_duration(stale))
    result: FleetStatus = with_db(
        db, lambda database: fleet_status(database, datetime.now(UTC), stale_after)
    )
    if as_json:
        print_json(result.as_dict())
        return
    table = Table("", "", title=f"{result.meters} active meter(s)", title_justify="left")
    for title, counts in (
        ("health", result.by_health),
        ("relay", result.by_relay),
        ("credit", result.by_credit),
    ):
        table.add_row(title, ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "-")
    table.add_row("stale", ", ".join(result.stale) or "none")
    table.add_row("never read", ", ".join(result.never_read) or "none")
    table.add_row("last poll", result.last_poll.isoformat() if result.last_poll else "never")
    console.print(table)


# -- readings -------------------------------------------------------------------------------------

_READING_COLUMNS = (
    "meter_time",
    "energy_import_wh",
    "rate1_wh",
    "rate2_wh",
    "rate3_wh",
    "rate4_wh",
    "power_w",
    "voltage_dv",
    "current_ma",
    "credit",
    "emergency_credit",
    "debt",
    "control_state",
    "status",
    "source",
    "flags",
    "flag_reason",
)
_INTERVAL_COLUMNS = (
    "start",
    "period",
    "energy_wh",
    "register_wh",
    "credit",
    "status",
    "estimated",
    "flags",
    "flag_reason",
)


def _row(record: Reading | Interval, columns: tuple[str, ...]) -> dict[str, Any]:
    row = {name: getattr(record, name) for name in columns}
    for name in ("meter_time", "start"):
        if name in row:
            row[name] = _iso(row[name])
    if "flags" in row:
        row["flags"] = _flags(row["flags"])
    return row


@handle_errors
def readings(
    meter_id: Annotated[str, typer.Argument(help="The meter's id.")],
    since: Annotated[str, typer.Option(help="From (ISO 8601, now, or e.g. 7d ago).")] = "7d",
    until: Annotated[str, typer.Option(help="Until, exclusive.")] = "now",
    include_estimated: Annotated[
        bool, typer.Option("--include-estimated", help="Estimated intervals too (marked).")
    ] = False,
    as_csv: Annotated[
        bool, typer.Option("--csv", help="Intervals as CSV (with --readings: readings).")
    ] = False,
    only_readings: Annotated[
        bool, typer.Option("--readings", help="Register readings instead of intervals.")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Export a meter's stored readings and load-profile intervals (meter time, UTC)."""
    start, end = parse_instant(since), parse_instant(until)
    if end <= start:
        raise fail("--until must be after --since")
    if as_csv and as_json:
        raise fail("--csv or --json, not both")

    since_s, until_s = int(start.timestamp()), int(end.timestamp())

    data: Export = with_db(
        db, lambda database: export(database, meter_id, since_s, until_s, include_estimated)
    )
    reading_rows = [_row(r, _READING_COLUMNS) for r in data.readings]
    interval_rows = [_row(i, _INTERVAL_COLUMNS) for i in data.intervals]
    if as_json:
        print_json({"meter_id": meter_id, "readings": reading_rows, "intervals": interval_rows})
        return
    if as_csv:
        columns = _READING_COLUMNS if only_readings else _INTERVAL_COLUMNS
        writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(reading_rows if only_readings else interval_rows)
        return
    if only_readings:
        table = Table("meter time", "energy Wh", "power W", "credit", "relay", "flags")
        for r in data.readings:
            table.add_row(
                _iso(r.meter_time),
                str(r.energy_import_wh),
                str(r.power_w),
                str(r.credit),
                relay_name(r.control_state),
                _flags(r.flags),
            )
    else:
        table = Table("start", "Wh", "register Wh", "estimated", "flags")
        for i in data.intervals:
            table.add_row(
                _iso(i.start),
                str(i.energy_wh),
                str(i.register_wh),
                "yes" if i.estimated else "",
                _flags(i.flags),
            )
    console.print(table)
    console.print(
        f"{len(data.readings)} reading(s), {len(data.intervals)} interval(s)"
        + ("" if include_estimated else " (actual only; --include-estimated for estimates)"),
        highlight=False,
    )


# -- one meter's story ----------------------------------------------------------------------------


def story_dict(story: MeterStory) -> dict[str, Any]:
    latest = story.latest
    health = story.health
    return {
        "meter": meter_dict(story.meter),
        "customer": story.customer,
        "account_status": story.account_status,
        "latest": None
        if latest is None
        else _row(latest, _READING_COLUMNS)
        | {
            "relay": relay_name(latest.control_state),
            "credit_band": credit_band(latest.credit, latest.low_credit_threshold, latest.status),
        },
        "health": None
        if health is None
        else {
            "health": health.health,
            "last_seen": health.last_seen.isoformat() if health.last_seen else None,
            "consecutive_failures": health.consecutive_failures,
            "last_error": health.last_error,
        },
        "events": [
            {
                "seq": e.seq,
                "time": _iso(e.meter_time),
                "event": event_name(e.code),
                "a": e.a,
                "b": e.b,
            }
            for e in story.events
        ],
        "flagged": [_row(r, ("meter_time", "flags", "flag_reason")) for r in story.flagged],
        "health_changes": [
            {"at": c.at.isoformat(), "from": c.old, "to": c.new, "reason": c.reason}
            for c in story.health_changes
        ],
        "daily_wh": [{"date": d, "wh": wh, "estimated": est} for d, wh, est in story.daily_wh],
    }


def _money(story: MeterStory, amount: int) -> str:
    meter = story.meter
    if meter.credit_unit == "energy":
        return f"{decimal_text(amount, -3)} kWh"
    return f"{decimal_text(amount, meter.currency_scale)} {meter.currency}"


def print_story(story: MeterStory) -> None:
    meter, latest, health = story.meter, story.latest, story.health
    table = Table(show_header=False, title=meter.id, title_justify="left")
    table.add_row("endpoint", meter.endpoint)
    table.add_row(
        "customer",
        f"{story.customer or '-'} (account {meter.account_id or '-'}, "
        f"{story.account_status or '-'})",
    )
    table.add_row("tariff", meter.tariff_id or "-")
    table.add_row("status", meter.status)
    if health is not None:
        seen = health.last_seen.isoformat() if health.last_seen else "never"
        table.add_row(
            "health",
            f"{health.health}, last seen {seen}"
            + (f", {health.last_error}" if health.last_error else ""),
        )
    if latest is not None:
        band = credit_band(latest.credit, latest.low_credit_threshold, latest.status)
        energy = decimal_text(latest.energy_import_wh, -3)
        table.add_row(
            "latest",
            f"{_iso(latest.meter_time)}: {energy} kWh, {latest.power_w} W, credit "
            f"{_money(story, latest.credit)} ({band}), relay {relay_name(latest.control_state)}",
        )
    console.print(table)
    if story.daily_wh:
        peak = max(wh for _, wh, _ in story.daily_wh) or 1
        chart = Table("day", "kWh", "", title="daily consumption", title_justify="left")
        for day, wh, estimated in story.daily_wh:
            bar = "█" * round(30 * wh / peak)
            chart.add_row(day, decimal_text(wh, -3) + (" *" if estimated else ""), bar)
        console.print(chart)
        if any(est for _, _, est in story.daily_wh):
            console.print("* includes estimated intervals")
    if story.events:
        events = Table(
            "seq", "meter time", "event", "a", "b", title="recent events", title_justify="left"
        )
        for e in story.events:
            events.add_row(str(e.seq), _iso(e.meter_time), event_name(e.code), str(e.a), str(e.b))
        console.print(events)
    for reading in story.flagged:
        console.print(f"flagged {_iso(reading.meter_time)}: {reading.flag_reason}", markup=False)
    for change in story.health_changes:
        console.print(
            f"health {change.at.isoformat()}: {change.old} -> {change.new} ({change.reason})",
            markup=False,
        )


def load_story(db: str | None, meter_id: str) -> MeterStory:
    return with_db(db, lambda database: meter_story(database, meter_id, datetime.now(UTC)))


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("readings")(readings)
