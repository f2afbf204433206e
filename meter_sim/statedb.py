"""Non-volatile memory of a whole fleet: every meter's state in one SQLite database.

The file is ``<state_dir>/meters.db`` in WAL mode with ``synchronous=FULL``: a committed
transaction is on disk, and a kill -9 at any instant leaves every meter either at its last
committed state or, for the transaction in flight, at the one before, whole. Many meters are
written in one transaction, so a save of the fleet costs one fsync of the log instead of two per
meter. Each row holds the state's canonical JSON and its SHA-256, checked on load: a row whose
checksum does not match, or a file that is not a readable database, raises StateFileError and
the meter does not start (it never silently starts from zero).

A save is split so that nothing slow runs on the event loop: :meth:`MeterStore.prepare` encodes
the state where it is taken, numbered in the order taken (msgspec writes the canonical JSON,
keys sorted and no spaces, in a tenth of the standard library's time, and leaves one bytes
object instead of a tree of containers for the garbage collector to walk), and
:meth:`FleetStore.write` checksums and commits any number of them from any thread, holding the
GIL only briefly. Writes are serialised per database; a prepared state never replaces a newer
one already committed, and a meter whose encoded state did not change since its last write is
not written again.

A state directory written before this store (one ``<meter id>.json`` per meter, meter_sim/nvm.py)
is read as it is: a meter without a row loads from its JSON file, and its next save goes to the
database, which takes precedence from then on.

The connection is opened on first use and kept (``check_same_thread=False``, used under the
store's lock): it holds its descriptors, so a save needs none when the process has run out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from meter_sim.nvm import StateStore
from protocols.errors import StateFileError

log = logging.getLogger(__name__)
DB_NAME = "meters.db"
FORMAT = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meter_state ("
    " meter_id TEXT PRIMARY KEY, format INTEGER NOT NULL, sha256 TEXT NOT NULL,"
    " state BLOB NOT NULL) WITHOUT ROWID"
)
_UPSERT = (
    "INSERT INTO meter_state (meter_id, format, sha256, state) VALUES (?, ?, ?, ?) "
    "ON CONFLICT(meter_id) DO UPDATE SET format = excluded.format, "
    "sha256 = excluded.sha256, state = excluded.state"
)


_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder()


def _canonical(state: dict[str, Any]) -> bytes:
    """The state's canonical JSON: keys sorted, no spaces (what the checksum is taken of)."""
    return _ENCODER.encode(state)


@dataclass(frozen=True, slots=True)
class PreparedState:
    """A meter's state as taken, encoded, numbered in the order it was taken."""

    store: MeterStore
    generation: int
    body: bytes  # the canonical JSON


class FleetStore:
    """The state database of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / DB_NAME
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None

    def meter(self, meter_id: str) -> MeterStore:
        return MeterStore(self, meter_id)

    # -- connection -------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if not self.path.exists():
                self._create()
            connection = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            try:
                connection.execute("PRAGMA synchronous=FULL")
                found = connection.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meter_state'"
                ).fetchone()
                if found is None or connection.execute("PRAGMA journal_mode").fetchone() != (
                    "wal",
                ):
                    raise StateFileError(f"{self.path}: not a meter state store (it is empty)")
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def _create(self) -> None:
        """A new, empty store, made under another name and renamed into place: a file at
        ``path`` always has the schema, so an empty or damaged one is refused, never taken for
        a new fleet."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fresh = self.state_dir / f".{DB_NAME}.new"
        fresh.unlink(missing_ok=True)
        connection = sqlite3.connect(fresh, isolation_level=None)
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
        finally:
            connection.close()
        fd = os.open(fresh, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(fresh, self.path)
        fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _failed(self, action: str, exc: Exception) -> StateFileError:
        return StateFileError(f"{self.path}: cannot {action} the meters' state: {exc}")

    # -- reading ----------------------------------------------------------------------------------

    def _rows(self, meter_ids: list[str] | None) -> dict[str, tuple[int, str, bytes]]:
        if not self.path.exists():
            return {}
        with self._lock:
            try:
                connection = self._connect()
                if meter_ids is None:
                    cursor = connection.execute(
                        "SELECT meter_id, format, sha256, state FROM meter_state"
                    )
                else:
                    marks = ",".join("?" * len(meter_ids))
                    cursor = connection.execute(
                        "SELECT meter_id, format, sha256, state FROM meter_state "
                        f"WHERE meter_id IN ({marks})",
                        meter_ids,
                    )
                found = {row[0]: (row[1], row[2], row[3]) for row in cursor}
            except (sqlite3.Error, OSError) as exc:
                raise StateFileError(
                    f"{self.path}: corrupt or unreadable meter state store: {exc}"
                ) from exc
        return found

    def _decode(self, meter_id: str, row: tuple[int, str, bytes]) -> dict[str, Any]:
        form, digest, body = row
        where = f"{self.path} (meter {meter_id})"
        if form != FORMAT or not isinstance(body, bytes):
            raise StateFileError(f"{where}: not a meter state of format {FORMAT}")
        if hashlib.sha256(body).hexdigest() != digest:
            raise StateFileError(f"{where}: checksum mismatch, the stored state is corrupt")
        try:
            state = _DECODER.decode(body)
        except msgspec.DecodeError as exc:
            raise StateFileError(f"{where}: corrupt state: {exc}") from exc
        if not isinstance(state, dict):
            raise StateFileError(f"{where}: the state is missing")
        return state

    def load_many(self, meter_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The saved state of each of ``meter_ids`` that has one (from the database, else from
        its JSON file of before); StateFileError for any that is corrupt."""
        states: dict[str, dict[str, Any]] = {}
        rows: dict[str, tuple[int, str, bytes]] = {}
        for start in range(0, len(meter_ids), 500):  # SQLite bounds the number of parameters
            rows.update(self._rows(meter_ids[start : start + 500]))
        for meter_id in meter_ids:
            row = rows.get(meter_id)
            if row is not None:
                states[meter_id] = self._decode(meter_id, row)
                continue
            legacy = StateStore.for_meter(self.state_dir, meter_id)
            if legacy.exists():
                states[meter_id] = legacy.load()
        return states

    # -- writing ----------------------------------------------------------------------------------

    def write(self, prepared: Iterable[PreparedState]) -> int:
        """Commit ``prepared`` (from any thread) in one transaction; returns how many meters
        were written. A state older than the one committed for its meter, or equal to it, is
        left out. StateFileError when the commit fails: nothing of it is stored."""
        with self._lock:
            newest: dict[MeterStore, PreparedState] = {}
            for item in prepared:
                if item.generation > item.store.written:
                    kept = newest.get(item.store)
                    if kept is None or item.generation > kept.generation:
                        newest[item.store] = item
            rows: list[tuple[str, int, str, bytes]] = []
            digests: list[tuple[PreparedState, str]] = []
            for item in newest.values():
                digest = hashlib.sha256(item.body).hexdigest()
                digests.append((item, digest))
                if digest != item.store.digest:
                    rows.append((item.store.meter_id, FORMAT, digest, item.body))
            if rows:
                try:
                    connection = self._connect()
                    connection.execute("BEGIN IMMEDIATE")
                    try:
                        connection.executemany(_UPSERT, rows)
                        connection.execute("COMMIT")
                    except BaseException:
                        if connection.in_transaction:
                            connection.execute("ROLLBACK")
                        raise
                except (sqlite3.Error, OSError) as exc:
                    log.error("cannot save %d meter state(s) in %s: %s", len(rows), self.path, exc)
                    raise self._failed("save", exc) from exc
            for item, digest in digests:
                item.store.written = item.generation
                item.store.digest = digest
            return len(rows)


class MeterStore:
    """One meter's state in its fleet's database."""

    def __init__(self, fleet: FleetStore, meter_id: str) -> None:
        self.fleet = fleet
        self.meter_id = meter_id
        self._taken = 0  # generations handed out by prepare()
        self.written = 0  # the newest generation committed (under the fleet store's lock)
        self.digest = ""  # the SHA-256 of the state last committed or loaded

    @property
    def path(self) -> Path:
        return self.fleet.path

    def exists(self) -> bool:
        return bool(self.fleet.load_many([self.meter_id]))

    def load(self) -> dict[str, Any]:
        state = self.fleet.load_many([self.meter_id]).get(self.meter_id)
        if state is None:
            raise StateFileError(f"{self.path}: no saved state for meter {self.meter_id}")
        return state

    def prepare(self, state: dict[str, Any]) -> PreparedState:
        """``state`` encoded for :meth:`FleetStore.write`; call it where the state is taken."""
        body = _canonical(state)
        self._taken += 1
        return PreparedState(self, self._taken, body)

    def write(self, prepared: PreparedState) -> None:
        self.fleet.write([prepared])

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` durably; returns once it is committed."""
        self.write(self.prepare(state))
