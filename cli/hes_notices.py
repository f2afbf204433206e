"""`hes notices`: what the head-end told customers and operators, and what it could not."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, handle_errors, print_json
from cli.hes_db import DbOption, with_db
from headend.storage.notices import latest
from headend.storage.schema import Notification

notices_app = typer.Typer(help="Notices to customers and operators.", no_args_is_help=True)


@notices_app.command("list")
@handle_errors
def notices_list(
    state: Annotated[str | None, typer.Option(help="Only pending, sent or failed notices.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="The latest N.")] = 50,
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The latest notices, newest first; failed ones carry the reason."""
    if state is not None and state not in ("pending", "sent", "failed"):
        raise typer.BadParameter(f"--state is pending, sent or failed, got {state!r}")

    rows: list[Notification] = with_db(db, lambda database: latest(database, state, limit))
    if as_json:
        print_json(
            [
                {
                    "key": n.idempotency_key,
                    "kind": n.kind,
                    "channel": n.channel,
                    "to": n.address,
                    "meter_id": n.meter_id,
                    "state": n.state,
                    "attempts": n.attempts,
                    "created_at": n.created_at.isoformat(),
                    "sent_at": n.sent_at.isoformat() if n.sent_at else None,
                    "last_error": n.last_error,
                }
                for n in rows
            ]
        )
        return
    table = Table("created", "kind", "channel", "to", "meter", "state", "tries", "error")
    for n in rows:
        table.add_row(
            n.created_at.isoformat(timespec="seconds"),
            n.kind,
            n.channel,
            n.address,
            n.meter_id or "",
            n.state,
            str(n.attempts),
            n.last_error or "",
        )
    console.print(table)
