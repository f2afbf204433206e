"""`hes serve`: the head-end daemon (the poller's schedule and the MQTT ingest into the store)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from cli.common import handle_errors, parse_duration, setup_logging
from cli.hes_db import DbOption
from headend.links.endpoint import LinkOptions
from headend.metrics import METRIC_NAMES
from headend.services.delivery import DeliverySettings
from headend.services.dispatcher import DispatchSettings
from headend.services.poller import PollPlan
from headend.services.senders import (
    JsonLinesSender,
    LogSender,
    Sender,
    SmsGatewaySender,
    SmtpSender,
    WebhookSender,
)
from headend.services.serve import (
    Ready,
    ServeSettings,
    accelerated_clock,
    clock_limits,
    serve,
)
from protocols.clock import Clock, SystemClock
from protocols.errors import ConfigError
from protocols.mqtt import DEFAULT_PREFIX, BrokerSettings, TopicScheme

MQTT_ENV = "HES_MQTT"

ClockSpeedOption = Annotated[
    float | None,
    typer.Option(
        "--clock-speed",
        min=0.001,
        max=1_000_000.0,
        help="Run the head-end on a simulated clock this many times real time, as "
        "`meter-sim serve --speed` does (meter clocks may then differ by ten real seconds' "
        "worth before a reading is flagged CLOCK_SKEW). Intervals are in simulated seconds.",
    ),
]
ClockStartOption = Annotated[
    str | None,
    typer.Option(
        "--clock-start",
        help="Where the simulated clock starts, ISO 8601 (e.g. 2026-01-01T00:00Z: the fleet "
        "file's simulation.start); default now. Only with --clock-speed.",
    ),
]


ClockAtOption = Annotated[
    str | None,
    typer.Option(
        "--clock-at",
        help="The real moment (ISO 8601) at which the simulated clock stood at --clock-start, "
        "e.g. when `meter-sim serve` was started, so that processes started at different "
        "moments agree; default: when this command starts.",
    ),
]


def notice_senders(
    sms_gateway: str | None,
    sms_token: str | None,
    smtp: str | None,
    mail_from: str,
    webhook: str | None,
    webhook_secret: str | None,
    notices_file: Path | None,
) -> dict[str, Sender]:
    """The notice channels this worker sends on, from its options; every notice is also logged."""
    senders: dict[str, Sender] = {"log": LogSender()}
    if sms_token is not None and sms_gateway is None:
        raise ConfigError("--sms-token goes with --sms-gateway")
    if webhook_secret is not None and webhook is None:
        raise ConfigError("--webhook-secret goes with --webhook")
    if not re.fullmatch(r"[^@\s]+@[^@\s]+", mail_from):
        raise ConfigError(f"--mail-from is an e-mail address, got {mail_from!r}")
    for option, url in (("--sms-gateway", sms_gateway), ("--webhook", webhook)):
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ConfigError(f"{option} is an http:// or https:// URL, got {url!r}")
    if sms_gateway is not None:
        if not sms_token:
            raise ConfigError("--sms-gateway needs --sms-token (or HES_SMS_TOKEN)")
        senders["sms"] = SmsGatewaySender(sms_gateway, sms_token)
    if smtp is not None:
        host, _, port = smtp.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--smtp is HOST:PORT, got {smtp!r}")
        senders["email"] = SmtpSender(host, int(port), mail_from)
    if webhook is not None:
        if not webhook_secret:
            raise ConfigError("--webhook needs --webhook-secret (or HES_WEBHOOK_SECRET)")
        senders["webhook"] = WebhookSender(webhook, webhook_secret.encode())
    if notices_file is not None:
        if not notices_file.parent.is_dir():
            raise ConfigError(f"--notices-file: no directory {notices_file.parent}")
        senders["file"] = JsonLinesSender(notices_file)
    return senders


def _iso(option: str, text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(
            f"{option} {text!r}: not an ISO 8601 time (e.g. 2026-01-01T00:00Z)"
        ) from exc
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def make_clock(
    speed: float | None, start: str | None, at: str | None = None
) -> tuple[Clock, float]:
    """The clock of --clock-speed/--clock-start/--clock-at and its speed (1: the system
    clock)."""
    if speed is None:
        if start is not None or at is not None:
            raise ConfigError("--clock-start and --clock-at need --clock-speed")
        return SystemClock(), 1.0
    if at is not None and start is None:
        raise ConfigError("--clock-at needs --clock-start")
    when = None if start is None else _iso("--clock-start", start)
    anchor = None if at is None else _iso("--clock-at", at)
    return accelerated_clock(speed, when, anchor), speed


class JsonLines(logging.Formatter):
    """One JSON object per log record: time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


@handle_errors
def serve_command(
    db: DbOption = None,
    interval: Annotated[
        float, typer.Option(min=1.0, help="Seconds between two reads of a meter.")
    ] = 900.0,
    deadline: Annotated[
        float, typer.Option(min=0.1, help="Longest one meter's read may take, retries included.")
    ] = 20.0,
    timeout: Annotated[float, typer.Option(min=0.05, help="Time-out of one request (s).")] = 2.0,
    lease: Annotated[
        float,
        typer.Option(
            min=1.0,
            help="Real seconds a claim on a meter holds: a killed worker's meters go to the "
            "others after this (longer than --deadline).",
        ),
    ] = 120.0,
    mqtt: Annotated[
        str | None,
        typer.Option(
            envvar=MQTT_ENV,
            help="Also ingest what MQTT meters push, from this broker (mqtt://user:pass@host:"
            f"port, mqtts://...?ca=FILE); default ${MQTT_ENV}.",
        ),
    ] = None,
    mqtt_prefix: Annotated[str, typer.Option(help="MQTT topic prefix.")] = DEFAULT_PREFIX,
    group: Annotated[
        str, typer.Option(help="Shared-subscription group: the workers that split the messages.")
    ] = "hes",
    worker: Annotated[
        str | None,
        typer.Option(
            help="This worker's name, unique among the workers of one database (default: the "
            "host name); a restart under the same name takes back its claims at once.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port): "
            f"{', '.join(METRIC_NAMES)}.",
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics endpoint binds.")
    ] = "127.0.0.1",
    api_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Also serve the payment API (as `hes api` does) on http://HOST:PORT "
            "(0: a free port); default: no API in this worker.",
        ),
    ] = None,
    api_host: Annotated[str, typer.Option(help="Address the payment API binds.")] = "127.0.0.1",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log lines (on stderr) as JSON objects.")
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv: debug).")
    ] = 0,
    clock_speed: ClockSpeedOption = None,
    clock_start: ClockStartOption = None,
    clock_at: ClockAtOption = None,
    monitor_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between two balance-monitor passes.")
    ] = 10.0,
    no_monitor: Annotated[
        bool, typer.Option("--no-monitor", help="Run no balance monitor in this worker.")
    ] = False,
    no_dispatch: Annotated[
        bool,
        typer.Option(
            "--no-dispatch", help="Send no commands to meters from this worker (and no policy)."
        ),
    ] = False,
    no_policy: Annotated[
        bool,
        typer.Option(
            "--no-policy",
            help="Apply no supply-control policy: send only the commands operators queue.",
        ),
    ] = False,
    no_delivery: Annotated[
        bool,
        typer.Option(
            "--no-delivery", help="Deliver no credit transfers to meters from this worker."
        ),
    ] = False,
    grace: Annotated[
        str, typer.Option(help="The policy's wait after credit runs out, before a disconnect.")
    ] = "1h",
    sms_gateway: Annotated[
        str | None, typer.Option(help="SMS gateway URL (POST JSON {to, text, reference}).")
    ] = None,
    sms_token: Annotated[
        str | None, typer.Option(envvar="HES_SMS_TOKEN", help="The SMS gateway's bearer token.")
    ] = None,
    smtp: Annotated[str | None, typer.Option(help="SMTP server HOST:PORT for e-mail.")] = None,
    mail_from: Annotated[str, typer.Option(help="Sender address of e-mail.")] = "hes@localhost",
    webhook: Annotated[str | None, typer.Option(help="Operators' webhook URL.")] = None,
    webhook_secret: Annotated[
        str | None, typer.Option(envvar="HES_WEBHOOK_SECRET", help="The webhook's HMAC key.")
    ] = None,
    notices_file: Annotated[
        Path | None, typer.Option(help="Also write notices as JSON lines to this file.")
    ] = None,
) -> None:
    """Run the head-end: read every active meter once per --interval (spread over it, claimed
    through the database so several workers share a fleet); with --mqtt, store what MQTT
    meters push; watch balances and send notices; send queued commands and the ones the
    supply-control policy asks for; deliver the credit payments owe to remote-credit meters.
    Prints one line when serving (JSON with --log-json).
    SIGTERM or Ctrl-C stops taking new work, finishes the writes in flight and exits 0."""
    if verbose:
        setup_logging(verbose)
    if log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines())
    clock, speed = make_clock(clock_speed, clock_start, clock_at)
    name = worker or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"--worker {name!r}: letters, digits, _ . - (at most 64)")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", group):
        raise ConfigError(f"--group {group!r}: letters, digits, _ . - (no / + #)")
    for option, host in (("--metrics-host", metrics_host), ("--api-host", api_host)):
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            if host != "localhost":
                raise ConfigError(f"{option} {host!r} is an IP address") from exc
    senders = notice_senders(
        sms_gateway, sms_token, smtp, mail_from, webhook, webhook_secret, notices_file
    )
    if lease <= deadline:
        raise ConfigError(f"--lease {lease:g} must be longer than --deadline {deadline:g}")
    settings = ServeSettings(
        db_url=db,
        plan=PollPlan(
            interval=interval, read_deadline=deadline, lease=lease, limits=clock_limits(speed)
        ),
        worker=name,
        link_options=LinkOptions(timeout=timeout, retries=1),
        broker=BrokerSettings.parse_url(mqtt) if mqtt else None,
        topics=TopicScheme(mqtt_prefix),
        group=group,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        senders=senders,
        monitor_every=None if no_monitor else monitor_every,
        dispatch=None
        if no_dispatch
        else DispatchSettings(grace=timedelta(seconds=parse_duration(grace, "--grace"))),
        policy_every=None if no_policy else 10.0,
        api_port=api_port,
        api_host=api_host,
        delivery=None if no_delivery else DeliverySettings(),
    )

    def announce(ready: Ready) -> None:
        if log_json:
            line = json.dumps({"event": "ready"} | _ready_dict(ready))
        else:
            where = f"; metrics on http://{metrics_host}:{ready.metrics_port}/metrics"
            api = f"; payment API on http://{api_host}:{ready.api_port}"
            line = (
                f"serving {ready.meters} meter(s) from {ready.database} as worker "
                f"{ready.worker}{where if ready.metrics_port is not None else ''}"
                f"{api if ready.api_port is not None else ''}"
                f"{'; ingesting from ' + ready.mqtt if ready.mqtt else ''} (Ctrl-C stops)"
            )
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(settings, clock, stop, announce)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(run())


def _ready_dict(ready: Ready) -> dict[str, object]:
    return {
        "worker": ready.worker,
        "meters": ready.meters,
        "database": ready.database,
        "metrics_port": ready.metrics_port,
        "mqtt": ready.mqtt,
        "api_port": ready.api_port,
    }


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
