"""`hes accounts`: protection from disconnection (medical need, the elderly), set by an
operator with a reason and an expiry, on the audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from cli.common import console, handle_errors, parse_duration, print_json
from cli.hes_commands import ActorOpt, JsonOpt, ReasonOpt, _actor
from cli.hes_db import DbOption, with_db
from cli.hes_views import parse_instant
from headend.storage.supply import Protection, protections, set_protection

accounts_app = typer.Typer(help="Accounts: protection from disconnection.", no_args_is_help=True)
AccountArg = Annotated[str, typer.Argument(help="The account's id.", show_default=False)]


def _dict(p: Protection) -> dict[str, object]:
    return {
        "account_id": p.account_id,
        "protected": p.protected,
        "reason": p.reason,
        "until": p.until.isoformat() if p.until else None,
    }


def _show(p: Protection, as_json: bool) -> None:
    if as_json:
        print_json(_dict(p))
    elif p.protected and p.until is not None:
        console.print(
            f"{p.account_id}: protected until {p.until.isoformat(timespec='minutes')} ({p.reason})",
            markup=False,
        )
    else:
        console.print(f"{p.account_id}: not protected ({p.reason})", markup=False)


@accounts_app.command("protect")
@handle_errors
def protect(
    account_id: AccountArg,
    reason: ReasonOpt,
    until: Annotated[
        str | None, typer.Option("--until", help="Protected until (ISO 8601).")
    ] = None,
    for_: Annotated[
        str | None, typer.Option("--for", help="Protected for this long (e.g. 90d).")
    ] = None,
    actor: ActorOpt = None,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Keep the account's supply on whatever its balance (the policy waits) until a time."""
    now = datetime.now(UTC)
    if (until is None) == (for_ is None):
        raise typer.BadParameter("give --until or --for (one of them)")
    end = (
        parse_instant(until)
        if until is not None
        else now + timedelta(seconds=parse_duration(for_ or "", "--for"))
    )
    who = _actor(actor)
    done = with_db(
        db,
        lambda database: set_protection(
            database, account_id, until=end, reason=reason, actor=who, now=now
        ),
    )
    _show(done, as_json)


@accounts_app.command("unprotect")
@handle_errors
def unprotect(
    account_id: AccountArg,
    reason: ReasonOpt,
    actor: ActorOpt = None,
    db: DbOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Lift the account's protection: the policy applies to it again."""
    now = datetime.now(UTC)
    who = _actor(actor)
    done = with_db(
        db,
        lambda database: set_protection(
            database, account_id, until=None, reason=reason, actor=who, now=now
        ),
    )
    _show(done, as_json)


@accounts_app.command("protected")
@handle_errors
def protected(db: DbOption = None, as_json: JsonOpt = False) -> None:
    """The accounts protected from disconnection now."""
    rows = with_db(db, lambda database: protections(database, datetime.now(UTC)))
    if as_json:
        print_json([_dict(p) for p in rows])
        return
    table = Table("account", "until", "reason")
    for p in rows:
        table.add_row(
            p.account_id, p.until.isoformat(timespec="minutes") if p.until else "", p.reason
        )
    console.print(table)
