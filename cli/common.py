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


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"30d"``, ``"2w"`` or plain seconds -> seconds."""
    text = text.strip().lower()
    try:
        if text and text[-1] in _DURATION_UNITS:
            value = float(text[:-1]) * _DURATION_UNITS[text[-1]]
        else:
            value = float(text)
    except ValueError as exc:
        raise typer.BadParameter(f"not a duration: {text!r} (e.g. 90s, 15m, 12h, 30d)") from exc
    if not value >= 0:
        raise typer.BadParameter("a duration is not negative")
    return value
