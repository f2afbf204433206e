"""The payment channels' HTTP API: :func:`create_app` over a database, served by uvicorn in
the caller's event loop with :class:`ApiServer`."""

from __future__ import annotations

from headend.api.app import create_app, openapi_document
from headend.api.server import ApiServer

__all__ = ["ApiServer", "create_app", "openapi_document"]
