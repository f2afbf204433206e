"""`hes db`: the head-end database's schema (Alembic migrations)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer

from cli.common import console, handle_errors, print_json
from headend.storage import Database, open_database
from headend.storage.database import ENV_VAR, head_revision

T = TypeVar("T")


def with_db(url: str | None, work: Callable[[Database], Awaitable[T]], *, check: bool = True) -> T:
    """Open the database at ``url`` (refusing a schema that is behind unless ``check`` is
    off), run ``work`` on it, close it: each command's one trip to the store."""

    async def run() -> T:
        database = await open_database(url, check=check)
        try:
            return await work(database)
        finally:
            await database.close()

    return asyncio.run(run())


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

    async def run(database: Database) -> tuple[str | None, str | None, str]:
        before, after = await database.upgrade()
        return before, after, database.shown_url

    before, after, url = with_db(db, run, check=False)
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

    async def run(database: Database) -> tuple[str | None, str]:
        return await database.revision(), database.shown_url

    revision, url = with_db(db, run, check=False)
    wanted = head_revision()
    if as_json:
        current = revision == wanted
        print_json({"url": url, "revision": revision, "head": wanted, "current": current})
        return
    state = "current" if revision == wanted else "behind: run 'hes db upgrade'"
    console.print(f"{url}: schema at {revision or 'nothing (empty)'}, needs {wanted} ({state})")
