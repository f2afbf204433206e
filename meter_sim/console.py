"""A meter's service console: one command per line in, one JSON object per line out.

For test rigs that script a meter through a pipe (and for the kill -9 tests): an answer is
written only after the meter's state is on disk, so an acknowledged top-up survives any crash.

Commands::

    topup TRANSFER AMOUNT     credit transfer (as the head-end would send it)
    token DIGITS              a 20-digit STS token typed on the keypad
    button                    the customer's button (reconnect from ready, or disconnect)
    tamper                    open the terminal cover
    show                      the standard readings
    events [SINCE]            events after sequence SINCE (default 0)
    quit                      stop
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any, TextIO

from meter_sim.runtime import MeterRuntime
from protocols.commands import U32_MAX, Command, CommandEnvelope
from protocols.errors import CommandRefused, HesError

log = logging.getLogger(__name__)


def local_envelope(runtime: MeterRuntime, command: Command) -> CommandEnvelope:
    """A command from the meter's own service port: the sequence after the meter's last one,
    signed with its own key. CommandRefused once the last one is the top of the range: the
    sequence then restarts only with a new key, so nothing more can be sent under this one."""
    last = runtime.meter.last_seq
    if last >= U32_MAX:
        raise CommandRefused(
            f"meter {runtime.meter_id} has used its last command sequence number ({U32_MAX}): "
            "give it a new auth_key (a key change restarts the sequence from 0)"
        )
    return CommandEnvelope.signed(runtime.meter_id, last + 1, command, runtime.config.key_bytes)


def handle_line(runtime: MeterRuntime, line: str) -> dict[str, Any] | None:
    """The answer to one console line; None for ``quit``."""
    words = line.split()
    if not words:
        return {"error": "empty command"}
    verb, args = words[0].lower(), words[1:]
    try:
        if verb == "quit":
            return None
        if verb == "topup":
            if len(args) != 2 or not all(a.isdigit() for a in args):
                return {"error": "usage: topup TRANSFER AMOUNT (whole numbers)"}
            command = Command.credit_transfer(int(args[0]), int(args[1]))
            result = runtime.execute(local_envelope(runtime, command))
            return {
                "result": result.code.name.lower(),
                "transfer": int(args[0]),
                "amount": int(args[1]),
                "credit": runtime.meter.balances.credit,
                "detail": result.detail,
            }
        if verb == "token":
            if len(args) != 1:
                return {"error": "usage: token DIGITS"}
            outcome = runtime.enter_token(args[0])
            return {
                "result": outcome.result.name.lower(),
                "status": outcome.status.name.lower(),
                "detail": outcome.detail,
            }
        if verb == "button":
            return {"result": runtime.press_button().name.lower()}
        if verb == "tamper":
            runtime.meter.set_tamper(runtime.clock.now())
            runtime.save()
            return {"result": "ok"}
        if verb == "show":
            snap = runtime.snapshot()
            return {
                "meter_id": snap.meter_id,
                "energy_wh": snap.energy_import_wh,
                "credit": snap.credit,
                "debt": snap.debt,
                "relay": snap.control_state.name.lower(),
                "last_transfer": snap.last_transfer,
            }
        if verb == "events":
            if len(args) > 1 or (args and not args[0].isdigit()):
                return {"error": "usage: events [SINCE] (a whole number)"}
            since = int(args[0]) if args else 0
            return {
                "events": [
                    [e.seq, e.time, e.code.name.lower(), e.a, e.b]
                    for e in runtime.events_since(since, 1000)
                ]
            }
    except HesError as exc:
        log.warning("console command %r refused: %s", line, exc)
        return {"error": str(exc)}
    return {"error": f"unknown command {verb!r}"}


def serve_console(runtime: MeterRuntime, lines: Iterable[str], out: TextIO) -> None:
    for line in lines:
        answer = handle_line(runtime, line)
        if answer is None:
            break
        out.write(json.dumps(answer) + "\n")
        out.flush()
