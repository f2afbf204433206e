"""`hes`: the head-end's command-line interface."""

from __future__ import annotations

import typer

from cli.common import OneLineErrors, setup_logging
from cli.hes_accounts import accounts_app
from cli.hes_api import register as register_api
from cli.hes_audit import audit_app
from cli.hes_billing import bills_app, mandates_app
from cli.hes_billing import register as register_billing
from cli.hes_broker import broker_app
from cli.hes_commands import commands_app
from cli.hes_commands import register as register_commands
from cli.hes_db import db_app
from cli.hes_demo import register as register_demo
from cli.hes_keypad import register as register_keypad
from cli.hes_link import register_link_commands
from cli.hes_notices import notices_app
from cli.hes_pay import channels_app, keypad_app, payments_app
from cli.hes_pay import register as register_pay
from cli.hes_policy import policy_app
from cli.hes_poll import register as register_poll
from cli.hes_registry import customers_app, meters_app, tariffs_app
from cli.hes_serve import register as register_serve
from cli.hes_token import token_app
from cli.hes_transfers import transfers_app
from cli.hes_views import register as register_views

app = typer.Typer(
    name="hes",
    help="Head-end system for prepaid smart meters.",
    no_args_is_help=True,
    add_completion=False,
    cls=OneLineErrors,
)


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="More logging (-vv: debug)."
    ),
) -> None:
    setup_logging(verbose)


# sub-apps
app.add_typer(token_app, name="token")
app.add_typer(accounts_app, name="accounts")
app.add_typer(audit_app, name="audit")
app.add_typer(commands_app, name="commands")
app.add_typer(broker_app, name="broker")
app.add_typer(db_app, name="db")
app.add_typer(meters_app, name="meters")
app.add_typer(notices_app, name="notices")
app.add_typer(policy_app, name="policy")
app.add_typer(customers_app, name="customers")
app.add_typer(tariffs_app, name="tariffs")
app.add_typer(channels_app, name="channels")
app.add_typer(keypad_app, name="keypad")
app.add_typer(payments_app, name="payments")
app.add_typer(transfers_app, name="transfers")
register_keypad(keypad_app)
app.add_typer(bills_app, name="bills")
app.add_typer(mandates_app, name="mandates")
register_link_commands(app)
register_api(app)
register_billing(app)
register_commands(app)
register_demo(app)
register_pay(app)
register_poll(app)
register_serve(app)
register_views(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
