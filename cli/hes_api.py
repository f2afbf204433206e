"""`hes api`: the payment channels' HTTP API, served alone (``hes serve --api-port`` serves it
inside the daemon)."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import sys
from typing import Annotated

import typer

from cli.common import handle_errors, setup_logging
from cli.hes_db import DbOption
from headend.api import ApiServer, create_app
from headend.storage import open_database
from protocols.errors import ConfigError

ApiHostOption = Annotated[
    str,
    typer.Option(
        "--host",
        help="IP address the API listens on (0.0.0.0: every interface; beyond this machine, "
        "put TLS in front of it).",
    ),
]


@handle_errors
def api_command(
    host: ApiHostOption = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0: a free one).")
    ] = 8080,
    db: DbOption = None,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv: debug).")
    ] = 0,
) -> None:
    """Serve the payment API (POST /v1/payments and the rest; the OpenAPI document at
    /openapi.json). Prints one line when serving; SIGTERM or Ctrl-C finishes the requests in
    flight and exits 0."""
    if verbose:
        setup_logging(verbose)
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        if host != "localhost":
            raise ConfigError(f"--host {host!r} is an IP address") from exc

    async def run() -> None:
        database = await open_database(db)
        try:
            server = ApiServer(create_app(database), host, port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await server.start()
                sys.stdout.write(
                    f"serving the payment API on {server.url} from {database.shown_url} "
                    "(Ctrl-C stops)\n"
                )
                sys.stdout.flush()
                await server.run(stop)
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        finally:
            await database.close()

    asyncio.run(run())


def register(app: typer.Typer) -> None:
    app.command("api")(api_command)
