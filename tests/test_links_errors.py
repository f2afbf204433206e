"""Every way an endpoint can be wrong ends in the project's error tree: open_link raises a
HesError (never a library's exception), and `hes read` prints one line and exits 1."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.hes_link import register_link_commands
from headend.links.endpoint import LinkOptions, open_link
from headend.links.pool import LinkPool
from protocols.errors import ConfigError, HesError, LinkClosed

NOT_A_CERTIFICATE = Path(__file__).resolve().parent.parent / "pyproject.toml"

MALFORMED = [
    # (endpoint, the error class, a word of its message)
    ("ftp://127.0.0.1/1", ConfigError, "unknown scheme"),
    ("127.0.0.1:502", ConfigError, "an endpoint looks like"),
    ("tcp://127.0.0.1:99999/1", ConfigError, "out of range"),
    ("tcp://127.0.0.1:port/1", ConfigError, "port"),
    ("tcp://:502/1", ConfigError, "no host"),
    ("tcp://127.0.0.1:1/0", ConfigError, "unit id"),
    ("tcp://127.0.0.1:1/248", ConfigError, "unit id"),
    ("tcp://127.0.0.1:1/one", ConfigError, "unit id"),
    ("tcp://127.0.0.1:1/1?colour=blue", ConfigError, "unknown parameter"),
    ("tcp://127.0.0.1:1/1?timeout=-1", ConfigError, "positive"),
    ("tcp://127.0.0.1:1/1?timeout=soon", ConfigError, "a number"),
    ("tcp://127.0.0.1:1/1?retries=1000", ConfigError, "retries"),
    ("tcp://127.0.0.1:1/1?retries=1&retries=2", ConfigError, "twice"),
    ("tcp://127.0.0.1:1/1", LinkClosed, "cannot connect"),
    ("rtu://bogus://x?unit=1", ConfigError, "bogus"),
    ("rtu://?unit=1", ConfigError, "no serial device"),
    ("rtu://loop://?unit=0", ConfigError, "unit"),
    ("rtu://loop://?unit=248", ConfigError, "unit"),
    ("rtu://loop://?unit=x", ConfigError, "an integer"),
    ("rtu://loop://?unit=1&parity=X", ConfigError, "parity"),
    ("rtu://loop://?unit=1&stopbits=3", ConfigError, "stopbits"),
    ("rtu://loop://?unit=1&baud=0", ConfigError, "baud"),
    ("rtu://loop://?unit=1&speed=fast", ConfigError, "unknown parameter"),
    ("rtu:///no/such/tty?unit=1", LinkClosed, "no/such/tty"),
    ("mqtts://127.0.0.1:1/M?ca=/missing.pem", ConfigError, "/missing.pem"),
    (f"mqtts://127.0.0.1:1/M?ca={NOT_A_CERTIFICATE}", ConfigError, "certificate"),
    ("mqtt://127.0.0.1:1/M", LinkClosed, "cannot connect"),
    ("mqtt://127.0.0.1:1/", ConfigError, "the path names the meter"),
    ("mqtt://127.0.0.1:1/bad+id", ConfigError, "bad+id"),
    ("mqtt://127.0.0.1:1/M?keepalive=1", ConfigError, "keepalive"),
    ("mqtt://127.0.0.1:1/M?prefix=a/%2B", ConfigError, "prefix"),
    ("mqtt://127.0.0.1:1/M?colour=blue", ConfigError, "unknown parameter"),
    ("mqtt://[::1/M", ConfigError, "IPv6"),
]
IDS = [endpoint for endpoint, _, _ in MALFORMED]


@pytest.mark.parametrize(("endpoint", "error", "words"), MALFORMED, ids=IDS)
async def test_every_failure_is_a_hes_error(
    endpoint: str, error: type[HesError], words: str
) -> None:
    async with LinkPool() as pool:
        with pytest.raises(HesError) as caught:
            await open_link(endpoint, LinkOptions(timeout=0.5, retries=0), pool=pool)
    assert isinstance(caught.value, error), repr(caught.value)
    assert words in str(caught.value)


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    hes = typer.Typer()
    register_link_commands(hes)
    return hes


@pytest.mark.parametrize(("endpoint", "error", "words"), MALFORMED, ids=IDS)
def test_hes_read_prints_one_line_and_exits_1(
    app: typer.Typer, endpoint: str, error: type[HesError], words: str
) -> None:
    result = CliRunner().invoke(app, ["read", endpoint, "--timeout", "0.5"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert words in lines[0]


def test_foreign_exceptions_are_chained_as_causes() -> None:
    async def attempt(endpoint: str) -> HesError:
        async with LinkPool() as pool:
            with pytest.raises(HesError) as caught:
                await open_link(endpoint, LinkOptions(timeout=0.5, retries=0), pool=pool)
        return caught.value

    missing_ca = asyncio.run(attempt("mqtts://127.0.0.1:1/M?ca=/missing.pem"))
    assert isinstance(missing_ca.__cause__, FileNotFoundError)
    bogus = asyncio.run(attempt("rtu://bogus://x?unit=1"))
    assert isinstance(bogus.__cause__, ValueError)
    refused = asyncio.run(attempt("mqtt://127.0.0.1:1/M"))
    assert isinstance(refused.__cause__, OSError)
