"""SQLite through aiosqlite with one trip to its thread per statement.

aiosqlite runs each call of the sqlite3 module in a thread of its connection; SQLAlchemy's
cursor for it makes three or four such calls for a statement (open a cursor, execute, fetch
the rows, close the cursor), and each wakes that thread and then the event loop again, which
costs more than most statements themselves. This dialect's cursor does the four in one call
and keeps the rows, the description, the row count and the last row id it gave; everything
else is SQLAlchemy's aiosqlite dialect. URLs name it ``sqlite+hes_aiosqlite``
(:mod:`headend.storage.database` does).

Inside a write transaction (after ``BEGIN IMMEDIATE``, until its commit or rollback) the
connection holds SQLite's write lock, so no statement can wait for another writer: a small
statement then runs in place, on the event loop's thread, which costs a few microseconds
where the trip to the connection's thread and back costs some hundred. A large one (more
than :data:`IN_PLACE_MOST` bound values, or one whose SQL once took more than
:data:`IN_PLACE_SLOW` in place twice: a query over many rows) and everything outside a write
transaction (reads, ``BEGIN``, ``COMMIT`` and its sync to disk) still go to the thread, where
SQLite works beside the event loop. The sqlite3 connection is opened with
``check_same_thread=False`` for this; its two users never overlap (each waits for the other's
call to end).
"""

from __future__ import annotations

import collections
import sqlite3
import time
from collections.abc import Sequence
from typing import Any, cast

import aiosqlite
from sqlalchemy.dialects import registry
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.util import EMPTY_DICT
from sqlalchemy.util.concurrency import await_

DRIVER = "sqlite+hes_aiosqlite"

#: the most bound values of a statement run in place in a write transaction (see the module)
IN_PLACE_MOST = 500
#: seconds a statement may hold the event loop: one that took longer (a query over many rows)
#: runs in the connection's thread from then on
IN_PLACE_SLOW = 0.002
#: how often a statement must take longer before it leaves the loop (once may be a pause of
#: the garbage collector's during a quick one)
IN_PLACE_SLOW_RUNS = 2
_SLOW: set[str] = set()  # the statements (their SQL) that took longer in place
_SLOWER: dict[str, int] = {}  # the others that did, how often
_SLOW_MOST = 1024
_BEGIN_WRITE = "BEGIN IMMEDIATE"

#: what a statement gave: (description, row count, last row id, rows)
_Outcome = tuple[Any, int, int | None, list[Any]]


def _execute(conn: sqlite3.Connection, operation: str, parameters: Any) -> _Outcome:
    cursor = conn.cursor()
    try:
        if parameters is None:
            cursor.execute(operation)
        else:
            cursor.execute(operation, parameters)
        rows = cursor.fetchall() if cursor.description else []
        return cursor.description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


def _executemany(conn: sqlite3.Connection, operation: str, parameters: Any) -> _Outcome:
    cursor = conn.cursor()
    try:
        cursor.executemany(operation, parameters)
        return cursor.description, cursor.rowcount, cursor.lastrowid, []
    finally:
        cursor.close()


class _Cursor(AsyncAdapt_aiosqlite_cursor):
    """A statement's results, fetched whole in the call that executed it."""

    __slots__ = ("_description", "_lastrowid", "_rowcount")

    def __init__(self, adapt_connection: AsyncAdapt_aiosqlite_connection) -> None:
        # no driver cursor is kept between calls: each statement opens and closes its own
        self._adapt_connection = adapt_connection
        self._connection = adapt_connection._connection
        self._cursor = None  # type: ignore[assignment]
        self._rows = collections.deque()
        self._soft_closed_memoized = EMPTY_DICT
        self._description: Any = None
        self._rowcount = -1
        self._lastrowid: int | None = None

    @property
    def description(self) -> Any:
        return self._description

    @property
    def rowcount(self) -> int:
        return self._rowcount

    @property
    def lastrowid(self) -> int:
        return self._lastrowid  # type: ignore[return-value]

    @property
    def arraysize(self) -> int:
        return 1

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        pass  # the rows are all fetched at once

    async def _async_soft_close(self) -> None:
        pass  # nothing is open: the rows are kept already

    def close(self) -> None:
        self._rows.clear()

    def execute(self, operation: Any, parameters: Any = None) -> Any:
        adapted = cast("_Connection", self._adapt_connection)
        try:
            if (
                adapted._writing
                and (parameters is None or len(parameters) <= IN_PLACE_MOST)
                and operation not in _SLOW
            ):
                await_(self._in_place(_execute, operation, parameters))
                return None
            await_(self._run(_execute, operation, parameters))
            if operation == _BEGIN_WRITE:
                adapted._writing = True
        except Exception as error:
            adapted._handle_exception(error)
        return None

    def executemany(self, operation: Any, seq_of_parameters: Sequence[Any]) -> Any:
        adapted = cast("_Connection", self._adapt_connection)
        try:
            if (
                adapted._writing
                and _values(seq_of_parameters) <= IN_PLACE_MOST
                and operation not in _SLOW
            ):
                await_(self._in_place(_executemany, operation, seq_of_parameters))
                return None
            await_(self._run(_executemany, operation, seq_of_parameters))
        except Exception as error:
            adapted._handle_exception(error)
        return None

    async def _in_place(self, fn: Any, operation: Any, parameters: Any) -> None:
        # awaited though it never waits: SQLAlchemy's async engine insists that a statement
        # awaits; a coroutine that returns at once costs two greenlet switches, no loop turn
        began = time.perf_counter()
        try:
            self._keep(fn(self._connection._conn, operation, parameters))
        finally:
            if time.perf_counter() - began > IN_PLACE_SLOW:
                _slower(operation)

    def _keep(self, outcome: _Outcome) -> None:
        self._description, self._rowcount, self._lastrowid, rows = outcome
        self._rows = collections.deque(rows)

    async def _run(self, fn: Any, operation: Any, parameters: Any) -> None:
        connection = self._connection
        async with self._adapt_connection._execute_mutex:
            outcome: _Outcome = await connection._execute(
                fn, connection._conn, operation, parameters
            )
        self._keep(outcome)


def _slower(operation: str) -> None:
    """``operation`` took longer than IN_PLACE_SLOW in place: after IN_PLACE_SLOW_RUNS such
    runs (a query over many rows), it runs in the connection's thread from then on."""
    runs = _SLOWER.get(operation, 0) + 1
    if runs < IN_PLACE_SLOW_RUNS:
        if len(_SLOWER) >= _SLOW_MOST:
            _SLOWER.clear()
        _SLOWER[operation] = runs
        return
    _SLOWER.pop(operation, None)
    if len(_SLOW) >= _SLOW_MOST:
        _SLOW.clear()
    _SLOW.add(operation)


def _values(seq_of_parameters: Sequence[Any]) -> int:
    return len(seq_of_parameters) * (len(seq_of_parameters[0]) if seq_of_parameters else 0)


class _Connection(AsyncAdapt_aiosqlite_connection):
    """Knows whether it is in a write transaction (its statements then run in place)."""

    __slots__ = ("_writing",)
    _cursor_cls = _Cursor  # type: ignore[assignment]

    def __init__(self, dbapi: Any, connection: Any) -> None:
        super().__init__(dbapi, connection)
        self._writing = False

    def commit(self) -> None:
        self._writing = False
        super().commit()

    def rollback(self) -> None:
        self._writing = False
        super().rollback()

    def close(self) -> None:
        self._writing = False
        super().close()


class _Dbapi(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> AsyncAdapt_aiosqlite_connection:
        adapted = super().connect(*arg, **kw)
        return _Connection(self, adapted._connection)


class Dialect(SQLiteDialect_aiosqlite):
    """SQLAlchemy's aiosqlite dialect with :class:`_Cursor`."""

    driver = "hes_aiosqlite"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> AsyncAdapt_aiosqlite_dbapi:
        return _Dbapi(aiosqlite, sqlite3)


registry.register("sqlite.hes_aiosqlite", __name__, "Dialect")
