"""`hes broker …`: a secured Mosquitto for a fleet, for operators.

``hes broker config`` writes a complete configuration into a directory: ``mosquitto.conf``,
``dynamic-security.json`` (Mosquitto's dynamic-security plugin: every meter of the fleet a user
bound to its own client id, PBKDF2 password hashes, an ACL confining each meter to its own
topic tree, the head-end user everywhere), with ``--tls`` a CA and server certificate in
``tls/``, and the head-end's broker URL with its generated password in ``headend.url``
(mode 0600). ``hes broker run`` runs Mosquitto in the foreground with such a directory until
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from cli.common import handle_errors
from headend.broker import HEADEND_USER, LocalBroker, run_configured
from meter_sim.config import load_fleet
from protocols.errors import ConfigError
from protocols.mqtt import DEFAULT_PREFIX, TopicScheme

broker_app = typer.Typer(
    help="A secured Mosquitto for a fleet: write its configuration, run it.",
    no_args_is_help=True,
    add_completion=False,
)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


def _port(value: int | None, option: str) -> None:
    if value is not None and not 1 <= value <= 65535:
        raise ConfigError(f"{option} is a TCP port, 1..65535, got {value}")


@broker_app.command("config")
@handle_errors
def config(
    fleet: Annotated[
        Path,
        typer.Option("--fleet", help="The fleet file whose meters become the broker's users."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the configuration into.")],
    port: Annotated[
        int | None,
        typer.Option(
            help=f"Port of the plain-TCP listener [default: {DEFAULT_PORT}]; with --tls only "
            "together with --keep-plain.",
            show_default=False,
        ),
    ] = None,
    tls_port: Annotated[int, typer.Option(help="Port of the TLS listener (--tls).")] = (
        DEFAULT_TLS_PORT
    ),
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="Listen on TLS, with a CA and a server certificate made here; closes the "
            "plain listener unless --keep-plain.",
        ),
    ] = False,
    keep_plain: Annotated[
        bool,
        typer.Option("--keep-plain", help="With --tls, keep the plain-TCP listener open too."),
    ] = False,
    prefix: Annotated[str, typer.Option(help="MQTT topic prefix of the fleet.")] = DEFAULT_PREFIX,
    days: Annotated[int, typer.Option(help="Validity of the certificates, in days.")] = 365,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace a configuration already in --out (new head-end password, new CA).",
        ),
    ] = False,
    show_meter_passwords: Annotated[
        bool,
        typer.Option(
            "--show-meter-passwords", help="Also print each meter's MQTT password on stdout."
        ),
    ] = False,
) -> None:
    """Write a complete Mosquitto configuration for FLEET's meters and the head-end into OUT.

    Listeners are on 127.0.0.1. Without --tls there is one plain-TCP listener; with --tls the
    broker listens on TLS only, unless --keep-plain keeps the plain one as well. Meters log in
    with their meter id as user name and client id and their `mqtt_password` (or the one
    derived from the fleet's [mqtt] password_secret when it is unset); the head-end's URL,
    password included, is written to OUT/headend.url and never printed.
    """
    _port(port, "--port")
    _port(tls_port, "--tls-port")
    if days < 1:
        raise ConfigError(f"--days is at least 1, got {days}")
    if keep_plain and not tls:
        raise ConfigError("--keep-plain only applies with --tls")
    if tls and not keep_plain and port is not None:
        raise ConfigError("--port is the plain listener's; with --tls it is closed (--keep-plain)")
    plain = keep_plain or not tls
    if plain and tls and (port or DEFAULT_PORT) == tls_port:
        raise ConfigError(f"the plain and the TLS listener cannot share port {tls_port}")
    config = load_fleet(fleet)
    meters = config.meters
    secret = config.mqtt_password_secret
    if secret is None and config.meters_without_mqtt_password():
        raise ConfigError(
            f"{fleet}: meters without mqtt_password need [mqtt] password_secret to derive theirs "
            "(meter-sim init writes one)"
        )
    out = out.resolve()
    if (out / "mosquitto.conf").exists() and not force:
        raise ConfigError(f"{out} already holds a broker configuration (--force replaces it)")
    broker = LocalBroker(
        out,
        {meter.meter_id: meter.mqtt_password for meter in meters},
        topics=TopicScheme(prefix),
        tls=tls,
        plain=plain,
        meter_secret=secret,  # only derives for meters without mqtt_password
        tls_days=days,
        port=(port or DEFAULT_PORT) if plain else 0,
        tls_port=tls_port if tls else 0,
    )
    try:
        conf = broker.write()
    except OSError as exc:
        raise ConfigError(f"{out}: {exc.strerror or exc}") from exc
    listeners = []
    if plain:
        listeners.append(f"plain {broker.host}:{broker.port}")
    if tls:
        listeners.append(f"TLS {broker.host}:{broker.tls_port}")
    typer.echo(f"wrote a Mosquitto configuration for {len(meters)} meter(s): {conf}")
    typer.echo(f"listeners: {', '.join(listeners)}")
    typer.echo(f"head-end credentials (user {HEADEND_USER}): {broker.headend_file}")
    if broker.tls_files is not None:
        typer.echo(f"CA certificate for meters and head-end: {broker.tls_files.ca_cert}")
    if show_meter_passwords:
        for meter in meters:
            typer.echo(f"{meter.meter_id} {broker.passwords[meter.meter_id]}")
    meters_url = replace(broker.headend_settings(), username=None, password=None).url()
    typer.echo(f"meters connect with: meter-sim serve --mqtt '{meters_url}'")
    typer.echo(f"run it with: hes broker run {out}")


@broker_app.command("run")
@handle_errors
def run(
    directory: Annotated[Path, typer.Argument(help="A directory written by `hes broker config`.")],
) -> None:
    """Run Mosquitto in the foreground with DIRECTORY's configuration; Ctrl-C or SIGTERM
    stops it (it saves its sessions and queued messages first)."""

    def ready(listeners: list[tuple[str, int]]) -> None:
        where = ", ".join(f"{host}:{port}" for host, port in listeners)
        typer.echo(f"mosquitto listening on {where}; log: {directory / 'mosquitto.log'}")
        sys.stdout.flush()

    run_configured(directory.resolve(), ready)
