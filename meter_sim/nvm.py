"""Non-volatile memory: a meter's state saved atomically and checked on load.

The file is JSON ``{"format": 1, "sha256": <hex of the state's canonical JSON>, "state": {...}}``.
A save writes a temporary file in the same directory, fsyncs it, renames it over the old one and
fsyncs the directory, so a kill -9 at any instant leaves either the old or the new state, whole.
A file that does not parse or whose checksum does not match raises StateFileError: a meter
never silently starts from zero.

A save can be split so that the file is written off the event loop: :meth:`StateStore.prepare`
encodes the state where it is taken (the meter's own thread), :meth:`StateStore.write` writes and
fsyncs it in any thread. Writes of one store are serialised and a prepared state never replaces
a newer one already on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocols.errors import StateFileError

log = logging.getLogger(__name__)
FORMAT = 1


def _canonical(state: dict[str, Any]) -> bytes:
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class PreparedState:
    """A meter state encoded for its file, numbered in the order it was taken."""

    generation: int
    document: bytes


class StateStore:
    """The state file of one meter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._taken = 0  # generations handed out by prepare()
        self._written = 0  # the newest generation on disk

    @classmethod
    def for_meter(cls, state_dir: Path, meter_id: str) -> StateStore:
        return cls(state_dir / f"{meter_id}.json")

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` durably; returns once it is on disk."""
        self.write(self.prepare(state))

    def prepare(self, state: dict[str, Any]) -> PreparedState:
        """``state`` encoded for :meth:`write`; call it where the state is taken."""
        body = _canonical(state)
        document = (
            b'{"format":%d,"sha256":"%s","state":'
            % (FORMAT, hashlib.sha256(body).hexdigest().encode())
            + body
            + b"}"
        )
        with self._lock:
            self._taken += 1
            return PreparedState(self._taken, document)

    def write(self, prepared: PreparedState) -> None:
        """Write a prepared state durably (from any thread); nothing when a newer one already
        is on disk."""
        with self._lock:
            if prepared.generation <= self._written:
                return
            try:
                self._write(prepared.document)
            except OSError as exc:
                log.error("cannot save %s: %s", self.path, exc)
                raise StateFileError(f"{self.path}: cannot save the meter's state: {exc}") from exc
            self._written = prepared.generation

    def _write(self, document: bytes) -> None:
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(document)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror}") from exc
        try:
            document = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StateFileError(f"{self.path}: corrupt state file: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise StateFileError(f"{self.path}: not a meter state file of format {FORMAT}")
        state = document.get("state")
        if not isinstance(state, dict):
            raise StateFileError(f"{self.path}: the state is missing")
        if hashlib.sha256(_canonical(state)).hexdigest() != document.get("sha256"):
            raise StateFileError(f"{self.path}: checksum mismatch, the state file is corrupt")
        return state
