"""Quiet by default: the libraries' log lines reach the operator's terminal only with -v.

The commands run as child processes, as an operator runs them, so the logging set up by the
command-line apps is what is tested (not pytest's capture).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

LIBRARY_NOISE = ("pymodbus", ">>>>>", "does not exist", "Failed to connect", "Repeating")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _read_frame(sock: socket.socket) -> bytes:
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        assert chunk, "the server closed the connection"
        header += chunk
    length = int.from_bytes(header[4:6], "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the server closed the connection"
        body += chunk
    return header + body


def _serve_and_ask_a_missing_unit(tmp_path: Path, verbose: list[str]) -> str:
    """``meter-sim serve`` answering one request to unit 99 (no such meter); the stderr of the
    whole run."""
    command = [sys.executable, "-m", "cli.meter_sim", *verbose, "serve"]
    command += ["--state-dir", str(tmp_path / "state"), "--modbus-port", "0", "--ready-json"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        host, port = ready["modbus_tcp"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(bytes.fromhex("000100000006630300000001"))
            assert _read_frame(sock)[7:] == b"\x83\x0b"  # gateway: no such unit
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    return stderr


@pytest.mark.slow
def test_serve_keeps_pymodbus_quiet_without_v(tmp_path: Path) -> None:
    quiet = _serve_and_ask_a_missing_unit(tmp_path, [])
    assert not [word for word in LIBRARY_NOISE if word in quiet], quiet
    loud = _serve_and_ask_a_missing_unit(tmp_path, ["-v"])
    assert "does not exist" in loud


def _hes_read_closed_port(verbose: list[str]) -> subprocess.CompletedProcess[str]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}/1"
    return subprocess.run(
        [sys.executable, "-m", "cli.hes", *verbose, "read", endpoint, "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_failed_connect_is_one_line_without_v() -> None:
    result = _hes_read_closed_port([])
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: cannot connect")
    assert not [word for word in LIBRARY_NOISE if word in result.stderr], result.stderr
    loud = _hes_read_closed_port(["-v"])
    assert "Failed to connect" in loud.stderr
