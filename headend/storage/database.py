"""Opening the database: URL rules, engines, the schema check, migrations, insert-or-ignore.

``sqlite:///hes.db`` (the default, a file in the current directory) and
``postgresql://user@host/db`` are the URLs an operator writes; the async drivers (aiosqlite,
with one trip to its thread per statement: :mod:`headend.storage.sqlite`; psycopg) are chosen
here. Every SQLAlchemy exception that leaves this package is a
:class:`~protocols.errors.StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    cast,
    event,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Dialect, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from headend.storage import sqlite as sqlite_driver
from headend.storage.schema import Base
from protocols.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

DEFAULT_URL = "sqlite:///hes.db"
ENV_VAR = "HES_DB"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_DRIVERS = {"sqlite": sqlite_driver.DRIVER, "postgresql": "postgresql+psycopg"}


#: the transaction handle services pass to storage functions (they never use it themselves)
Session = AsyncSession


class SchemaBehind(StorageError):
    """The database's schema is older (or newer) than this code's."""


def database_url(url: str | None = None) -> str:
    """The URL to use: ``url``, else ``$HES_DB``, else :data:`DEFAULT_URL`."""
    return url or os.environ.get(ENV_VAR) or DEFAULT_URL


def _async_url(text: str) -> URL:
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise ConfigError(f"not a database URL: {text!r} (e.g. {DEFAULT_URL})") from exc
    backend = url.get_backend_name()
    if backend not in _DRIVERS:
        raise ConfigError(
            f"database URL {url.render_as_string(hide_password=True)!r}: sqlite:// or "
            "postgresql:// only"
        )
    return url.set(drivername=_DRIVERS[backend])


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Translate SQLAlchemy's (and the drivers') exceptions into :class:`StorageError`."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise StorageError(f"{what}: {exc.__class__.__name__}: {_first_line(exc)}") from exc
    except OSError as exc:
        raise StorageError(f"{what}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the migrations have no head"
    return head


def _sqlite_pragmas(dbapi_connection: Any, record: Any) -> None:
    # The driver's own transaction handling starts a transaction only at the first write, so a
    # SAVEPOINT could open (and its RELEASE commit) the outermost one: take it over, as
    # SQLAlchemy's SQLite notes advise, and begin every transaction ourselves (_sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
    record.info[_SYNCHRONOUS] = "NORMAL"


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE: take the write lock at the start, so two writers wait for each other (up to
    # busy_timeout) instead of one failing when its read turns into a write; a read-only
    # transaction (Database.read) begins deferred and never waits for a writer (WAL)
    options = conn.get_execution_options()
    if options.get(_READ_ONLY):
        conn.exec_driver_sql("BEGIN")
        return
    # Durability. In WAL mode a commit survives a crash of the process whatever the setting;
    # with synchronous=NORMAL the WAL is synced only at checkpoints, so a power cut or a crash
    # of the machine can lose the last commits. That is fine for readings (read again at the
    # next poll) but not for a payment the channel was answered 201 for: a durable transaction
    # (Database.begin(durable=True)) commits with synchronous=FULL, the WAL synced before
    # COMMIT returns (one sync for a whole group of payments).
    wanted = "FULL" if options.get(DURABLE) else "NORMAL"
    if conn.info.get(_SYNCHRONOUS) != wanted:
        conn.exec_driver_sql(f"PRAGMA synchronous={wanted}")
        conn.info[_SYNCHRONOUS] = wanted
    conn.exec_driver_sql("BEGIN IMMEDIATE")


_READ_ONLY = "hes_read_only"
#: the execution option of a transaction whose commit must survive a power cut (see
#: _sqlite_begin; PostgreSQL's commits always do)
DURABLE = "hes_durable"
_SYNCHRONOUS = "hes_synchronous"
#: seconds a writer of this process waits for SQLite's write lock (as busy_timeout does)
WRITE_WAIT = 10.0
#: SQLite connections a process keeps open (and as many more while it needs them)
SQLITE_POOL = 32


@dataclass(slots=True)
class Database:
    """An engine and its session factory; make one per process with :func:`open_database`."""

    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    _writers: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _writing: asyncio.Task[Any] | None = field(default=None, repr=False)

    @property
    def shown_url(self) -> str:
        """The URL with any password masked, for messages."""
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.asynccontextmanager
    async def begin(self, *, durable: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: committed when the block ends, rolled back if it raises. A
        ``durable`` one's commit survives a power cut too (on SQLite, see _sqlite_begin):
        for what a third party is told is done."""
        with storage_errors("database"):
            async with self.writing(), self.sessions() as session, session.begin():
                if durable:
                    await session.connection(execution_options={DURABLE: True})
                yield session

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Hold this process's turn to write (around a write transaction). SQLite has one
        writer at a time: the writers of a process wait for it here, each taking it the
        moment it is free, rather than in SQLite's busy handler, which sleeps and tries
        again (many writers then leave the lock idle between them). The task that holds the
        turn may ask for it again (its transactions follow each other within it). On
        PostgreSQL, nothing."""
        task = asyncio.current_task()
        if self.engine.dialect.name != "sqlite" or (task is not None and self._writing is task):
            yield
            return
        try:
            async with asyncio.timeout(WRITE_WAIT):
                await self._writers.acquire()
        except TimeoutError as exc:
            raise StorageError(
                f"database: no turn to write within {WRITE_WAIT:g} s (another writer of this "
                "process holds it)"
            ) from exc
        self._writing = task
        try:
            yield
        finally:
            self._writing = None
            self._writers.release()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A transaction that only reads: on SQLite it takes no write lock, so it never waits
        for (or holds up) a writer."""
        with storage_errors("database"):
            async with self.sessions() as session, session.begin():
                await session.connection(execution_options={_READ_ONLY: True})
                yield session

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: never migrated)."""
        with storage_errors("reading the schema revision"):
            async with self.engine.connect() as conn:
                return await conn.run_sync(_current_revision)

    async def check_schema(self) -> None:
        """Refuse a schema that is not this code's, with the one line that says what to do."""
        current, wanted = await self.revision(), head_revision()
        if current != wanted:
            raise SchemaBehind(
                f"database schema is at {current or 'nothing (empty database)'}, this hes "
                f"needs {wanted}: run 'hes db upgrade'"
            )

    async def upgrade(self, revision: str = "head") -> tuple[str | None, str | None]:
        """Run the migrations up to ``revision``; returns (before, after)."""
        before = await self.revision()
        with storage_errors("upgrading the schema"):
            async with self.engine.begin() as conn:
                await conn.run_sync(_upgrade, revision)
        return before, await self.revision()

    async def close(self) -> None:
        await self.engine.dispose()


def _engine(text: str) -> AsyncEngine:
    async_url = _async_url(text)
    options: dict[str, Any] = {}
    if async_url.get_backend_name() == "sqlite":
        _check_sqlite()
        # a write transaction's small statements run on the event loop's thread, the rest on
        # the connection's own (headend.storage.sqlite): never both at once
        options["connect_args"] = {"check_same_thread": False}
        database = async_url.database
        if database and database != ":memory:":
            parent = Path(database).expanduser().resolve().parent
            if not parent.is_dir():
                raise ConfigError(f"database {text!r}: the directory {parent} does not exist")
            # every request, poll and step of a busy process holds a connection at once;
            # one made past the pool's size is closed when returned, and a new aiosqlite
            # connection is a thread, a file opened and the pragmas run again
            options["pool_size"] = SQLITE_POOL
            options["max_overflow"] = SQLITE_POOL
    else:
        options["pool_pre_ping"] = True
    with storage_errors("opening the database"):
        engine = create_async_engine(async_url, **options)
    if engine.dialect.name == "sqlite":
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


#: the oldest SQLite the store runs on (RETURNING, DROP COLUMN)
SQLITE_OLDEST = (3, 35, 0)


@functools.cache
def _check_sqlite() -> None:
    """Refuse an SQLite library too old for the store, or built without its JSON functions
    (lists of ids reach it as one JSON text), with one clear line rather than a syntax
    error at the first poll."""
    found = sqlite3.sqlite_version
    if sqlite3.sqlite_version_info < SQLITE_OLDEST:
        oldest = ".".join(map(str, SQLITE_OLDEST))
        raise ConfigError(f"this Python's SQLite is {found}: hes needs {oldest} or newer")
    try:
        with contextlib.closing(sqlite3.connect(":memory:")) as conn:
            conn.execute("SELECT value FROM json_each('[1]')").fetchall()
    except sqlite3.Error as exc:
        raise ConfigError(
            f"this Python's SQLite {found} has no JSON functions ({exc}): hes needs them"
        ) from exc


def _current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _upgrade(conn: Connection, revision: str) -> None:
    config = _alembic_config()
    config.attributes["connection"] = conn
    command.upgrade(config, revision)


async def open_database(url: str | None = None, *, check: bool = True) -> Database:
    """Open the database at ``url`` (see :func:`database_url`); with ``check``, refuse a schema
    that is behind (:class:`SchemaBehind`)."""
    text = database_url(url)
    engine = _engine(text)
    db = Database(text, engine, async_sessionmaker(engine, expire_on_commit=False))
    if check:
        try:
            await db.check_schema()
        except BaseException:
            await db.close()
            raise
    return db


async def insert_ignore(
    conn: AsyncConnection | AsyncSession, model: type[Base] | Table, rows: Sequence[dict[str, Any]]
) -> int:
    """Insert ``rows``, skipping any whose primary or unique key is already stored; returns how
    many were new. The one upsert helper: SQLite and PostgreSQL spell it differently."""
    return len(await insert_new(conn, model, rows))


async def insert_new(
    conn: AsyncConnection | AsyncSession,
    model: type[Base] | Table,
    rows: Sequence[dict[str, Any]],
    *returning: Any,
) -> list[tuple[Any, ...]]:
    """As :func:`insert_ignore`, returning of each row that was new its primary key (or the
    ``returning`` columns)."""
    if not rows:
        return []
    table = model if isinstance(model, Table) else model.__table__
    assert isinstance(table, Table)
    dialect = (
        conn.dialect.name if isinstance(conn, AsyncConnection) else conn.get_bind().dialect.name
    )
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # RETURNING the key of each row actually inserted is the one count that both dialects give
    # for a batch (psycopg's executemany reports no row count)
    key = list(returning) or list(table.primary_key.columns)
    statement = insert(table).on_conflict_do_nothing().returning(*key)
    with storage_errors(f"storing {table.name}"):
        result = await conn.execute(statement, list(rows))
        return [tuple(row) for row in result.all()]


class JsonList(TypeDecorator[Sequence[Any]]):
    """A list bound as one JSON text (of strings or integers)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Sequence[Any] | None, dialect: Dialect) -> str | None:
        return None if value is None else _JSON.encode(list(value)).decode()


_JSON = msgspec.json.Encoder()


class list_values(FunctionElement[Any]):  # noqa: N801 (SQL functions are lower case)
    """The elements of a JSON list, as a table of one column, ``value``:
    ``json_array_elements_text`` on PostgreSQL, ``json_each`` on SQLite."""

    inherit_cache = True
    name = "list_values"


@compiles(list_values, "postgresql")
def _list_values_postgresql(element: list_values, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_array_elements_text(CAST({compiler.process(element.clauses, **kw)} AS JSON))"


@compiles(list_values, "sqlite")
def _list_values_sqlite(element: list_values, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_each({compiler.process(element.clauses, **kw)})"


def in_list(column: Any, name: str) -> ColumnElement[bool]:
    """``column IN (…)`` of the list given as the one parameter ``name`` (bound as JSON
    text), for lists of many ids on hot paths.

    An expanding ``IN`` (``bindparam(expanding=True)``) renders one placeholder a value at
    each execution, so its SQL differs with the list's length: SQLAlchemy renders it again,
    psycopg parses it again (a few milliseconds of CPU for 200 ids), and PostgreSQL
    neither keeps it prepared nor reuses its plan. This statement's text is the same for any
    list."""
    values = list_values(bindparam(name, type_=JsonList())).table_valued("value")
    condition: ColumnElement[bool] = column.in_(select(cast(values.c.value, column.type)))
    return condition


#: rows a bulk change adds to a table before the planner's statistics are refreshed at once
STATISTICS_AFTER = 1000


async def refresh_statistics(db: Database, *tables: str) -> None:
    """On PostgreSQL, ``ANALYZE`` the ``tables`` (by name; none: the whole database) after a
    bulk change added many rows to them.

    Autovacuum does this within a minute or so, but until then the planner plans from a
    table it believes empty: a poll round's look-up of 200 meters' health by primary key ran
    as a sequential scan comparing each row with each of the 200 ids (40 ms a batch on a
    table of 10,000 meters, its dead row versions included). SQLite plans from its indexes
    alone: nothing to do there."""
    if db.dialect != "postgresql":
        return
    names = ", ".join(db.engine.dialect.identifier_preparer.quote(t) for t in tables)
    with storage_errors("refreshing the planner's statistics"):
        async with db.engine.connect() as conn:
            await conn.execute(text(f"ANALYZE {names}".rstrip()))
            await conn.commit()
