"""The head-end's rules as pure functions and tables: no I/O, no SQLAlchemy."""
