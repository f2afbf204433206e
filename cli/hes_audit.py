"""`hes audit`: read the audit trail and check that nobody has changed it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, fail, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from headend.domain.audit import Entry
from headend.storage.audit import Verification, entries, verify_chain

audit_app = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@audit_app.command("verify")
@handle_errors
def audit_verify(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Check the hash chain from the first entry to the last; exit 1 naming the first entry
    that was edited, deleted, inserted or moved."""

    result: Verification = with_db(db, verify_chain)
    broken = result.broken
    if as_json:
        print_json(
            {
                "entries": result.entries,
                "intact": broken is None,
                "first_bad": None if broken is None else broken.position,
                "why": None if broken is None else broken.why,
            }
        )
        if broken is not None:
            raise typer.Exit(1)
        return
    if broken is not None:
        raise fail(f"audit entry {broken.position} breaks the chain: {broken.why}")
    console.print(f"the audit trail is intact: {result.entries} entries")


def _entry_dict(entry: Entry) -> dict[str, object]:
    return {
        "position": entry.position,
        "at": entry.at.isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "subject": entry.subject,
        "reason": entry.reason,
        "outcome": entry.outcome,
        "detail": entry.detail,
    }


@audit_app.command("show")
@handle_errors
def audit_show(
    meter: Annotated[
        str | None, typer.Option("--meter", help="Only entries about this meter.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N entries.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The latest entries, oldest first: who did what, when, why, and with what outcome."""

    rows = with_db(db, lambda database: entries(database, meter, limit))
    if as_json:
        print_json([_entry_dict(entry) for entry in rows])
        return
    table = Table("#", "at", "actor", "action", "subject", "reason", "outcome")
    for entry in rows:
        table.add_row(
            str(entry.position),
            entry.at.isoformat(timespec="seconds"),
            entry.actor,
            entry.action,
            entry.subject,
            entry.reason,
            entry.outcome,
        )
    console.print(table)
