"""The head-end's database: the only package that imports SQLAlchemy.

SQLite (a file, the embedded default) or PostgreSQL, chosen by URL. Alembic owns the schema
(``migrations/``); :func:`open_database` refuses a schema that is behind this code's.
"""

from headend.storage.database import (
    DEFAULT_URL,
    Database,
    SchemaBehind,
    Session,
    database_url,
    open_database,
)

__all__ = ["DEFAULT_URL", "Database", "SchemaBehind", "Session", "database_url", "open_database"]
