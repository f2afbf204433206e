"""`hes db`: the head-end database's schema (Alembic migrations)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from cli.common import console, handle_errors, print_json
from headend.storage import open_database
from headend.storage.database import ENV_VAR, head_revision

db_app = typer.Typer(help="The head-end's database: schema migrations.", no_args_is_help=True)

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=ENV_VAR,
        help="Database URL: sqlite:///FILE or postgresql://USER@HOST/DB "
        f"[default: ${ENV_VAR}, else sqlite:///hes.db in the current directory]",
        show_default=False,
    ),
]


@db_app.command("upgrade")
@handle_errors
def upgrade(db: DbOption = None) -> None:
    """Create or migrate the schema to this hes's version (safe to run again)."""

    async def run() -> tuple[str | None, str | None, str]:
        database = await open_database(db, check=False)
        try:
            before, after = await database.upgrade()
            return before, after, database.shown_url
        finally:
            await database.close()

    before, after, url = asyncio.run(run())
    if before == after:
        console.print(f"{url}: schema already at {after}")
    else:
        console.print(f"{url}: schema {before or 'empty'} -> {after}")


@db_app.command("current")
@handle_errors
def current(
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the schema version of the database and the one this hes needs."""

    async def run() -> tuple[str | None, str]:
        database = await open_database(db, check=False)
        try:
            return await database.revision(), database.shown_url
        finally:
            await database.close()

    revision, url = asyncio.run(run())
    wanted = head_revision()
    if as_json:
        current = revision == wanted
        print_json({"url": url, "revision": revision, "head": wanted, "current": current})
        return
    state = "current" if revision == wanted else "behind: run 'hes db upgrade'"
    console.print(f"{url}: schema at {revision or 'nothing (empty)'}, needs {wanted} ({state})")
