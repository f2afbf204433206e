"""What both command-line apps share: printing, JSON output, mapping errors to exit codes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from enum import Enum
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, NoArgsIsHelpError
from typer.core import TyperGroup

from protocols.errors import HesError

console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("cli")

P = ParamSpec("P")
R = TypeVar("R")


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, bytes, tuples and sets in a form ``json.dumps`` takes."""
    if is_dataclass(value) and not isinstance(value, type):
        return {key: jsonable(item) for key, item in asdict(value).items()}
    if isinstance(value, Enum):
        return value.name.lower() if not isinstance(value.value, int) else int(value.value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(value), indent=2, sort_keys=False) + "\n")


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


class OneLineErrors(TyperGroup):
    """The command group of both apps: a usage error (an option of the wrong type or out of
    range, a missing argument) is one line on stderr naming the option, and exit status 2,
    instead of a usage box; ``--help`` and a bare command still print the help."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            outcome = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except ClickException as exc:
            fail(exc.format_message(), exc.exit_code)
            sys.exit(exc.exit_code)
        except typer.Abort:
            fail("aborted")
            sys.exit(1)
        sys.exit(outcome if isinstance(outcome, int) else 0)


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the project's errors into one line on stderr and exit code 1."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except HesError as exc:
            log.info("command failed: %s", exc)
            raise fail(str(exc)) from exc

    return wrapper


#: Libraries whose own log lines are not the operator's business unless asked for with -v:
#: the project's adapters turn their failures into one clear line of their own. Without -v,
#: pymodbus says nothing at all (its frame dumps, "requested device id does not exist" and
#: "Failed to connect … Repeating…" are what the adapter already reports); the others only
#: their warnings.
LIBRARY_LOGGERS: dict[str, int] = {
    "pymodbus": logging.CRITICAL + 1,
    "paho": logging.WARNING,
    "aiomqtt": logging.WARNING,
    "asyncio": logging.WARNING,
}


def setup_logging(verbose: int) -> None:
    """Logging for a command: the project's own loggers at WARNING (-v: INFO, -vv: DEBUG);
    the libraries' at their quiet level (-v: WARNING, -vv: DEBUG)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for name, quiet in LIBRARY_LOGGERS.items():
        if verbose >= 2:
            library_level = logging.DEBUG
        elif verbose == 1:
            library_level = logging.WARNING
        else:
            library_level = quiet
        logging.getLogger(name).setLevel(library_level)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


MAX_DURATION = 100 * 366 * 86400.0  # a century of simulated time


def parse_duration(text: str, option: str | None = None) -> float:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"`` or plain seconds -> seconds;
    a refusal names ``option``."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _DURATION_UNITS:
            value = float(text[:-1]) * _DURATION_UNITS[text[-1]]
        else:
            value = float(text)
    except ValueError as exc:
        raise typer.BadParameter(
            f"not a duration: {text!r} (e.g. 90s, 15m, 12h, 30d)", param_hint=option
        ) from exc
    if not 0 <= value <= MAX_DURATION:
        raise typer.BadParameter("a duration is 0 to 100 years", param_hint=option)
    return value
