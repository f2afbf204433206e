"""`hes policy`: what supply control would do now, and why; changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.common import console, handle_errors, parse_duration, print_json
from cli.hes_db import DbOption, with_db
from cli.hes_views import parse_instant
from headend.domain.policy import Action, Decision, decide
from headend.storage import Database
from headend.storage.supply import PolicyInput, policy_inputs
from protocols.errors import StorageError

policy_app = typer.Typer(help="Supply control by policy (read-only).", no_args_is_help=True)
AtOption = Annotated[str, typer.Option("--at", help="Decide as of this time (ISO 8601 or now).")]
GraceOption = Annotated[
    str, typer.Option(help="How long after exhaustion before a disconnect (e.g. 1h).")
]


def _decide(
    db: str | None, meters: list[str] | None, at: str, grace: str
) -> list[tuple[PolicyInput, Decision]]:
    now = parse_instant(at)
    wait = timedelta(seconds=parse_duration(grace, "--grace"))

    async def fetch(database: Database) -> list[PolicyInput]:
        async with database.read() as session:
            return await policy_inputs(session, meters)

    return [
        (row, decide(row.account, row.meter, row.calendar, now, wait)) for row in with_db(db, fetch)
    ]


def _dict(row: PolicyInput, decision: Decision) -> dict[str, Any]:
    return {
        "meter_id": row.meter_id,
        "account_id": row.account_id,
        "action": decision.action.value,
        "reason": decision.reason,
        "until": decision.until.isoformat() if decision.until else None,
        "balance": row.account.balance,
        "relay": row.meter.control_state.name.lower(),
        "control_mode": row.meter.control_mode,
        "reading_time": datetime.fromtimestamp(row.meter_time, UTC).isoformat(),
    }


@policy_app.command("explain")
@handle_errors
def explain(
    meter_id: Annotated[str, typer.Argument(help="The meter's id.")],
    at: AtOption = "now",
    grace: GraceOption = "1h",
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The policy's decision for one meter from its latest reading, and the reason."""
    rows = _decide(db, [meter_id], at, grace)
    if not rows:
        raise StorageError(f"no active meter {meter_id!r} with a stored reading")
    row, decision = rows[0]
    if as_json:
        print_json(_dict(row, decision))
        return
    until = f" (until {decision.until.isoformat()})" if decision.until else ""
    console.print(
        f"{meter_id}: {decision.action.value}: {decision.reason}{until}",
        markup=False,
        soft_wrap=True,
    )


@policy_app.command("dry-run")
@handle_errors
def dry_run(
    at: AtOption = "now",
    grace: GraceOption = "1h",
    all_meters: Annotated[
        bool, typer.Option("--all", help="Also meters for which there is nothing to do.")
    ] = False,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What the dispatcher would do now for every meter; changes nothing."""
    rows = [
        (row, decision)
        for row, decision in _decide(db, None, at, grace)
        if all_meters or decision.action is not Action.NONE
    ]
    if as_json:
        print_json([_dict(row, decision) for row, decision in rows])
        return
    table = Table("meter", "action", "reason", "until", "balance", "relay")
    for row, decision in rows:
        table.add_row(
            row.meter_id,
            decision.action.value,
            decision.reason,
            decision.until.isoformat(timespec="minutes") if decision.until else "",
            str(row.account.balance),
            row.meter.control_state.name.lower(),
        )
    console.print(table)
    console.print(f"{len(rows)} meter(s) with something to do" if not all_meters else "")
