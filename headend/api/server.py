"""Serving the API with uvicorn inside the caller's event loop (``hes api``, ``hes serve
--api-port``, a bench): the socket is bound first, so a port in use is a clear error and
port 0 gives a free one; signals stay the caller's; stopping finishes the requests in
flight."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from protocols.errors import ConfigError


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signal handling to the process that runs it."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"API host {host!r}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"the API cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


class ApiServer:
    """``app`` served on ``host``:``port`` until :meth:`stop`."""

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
    ) -> None:
        self.host = host
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            server_header=False,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Serve from now on (returns once the server accepts connections)."""
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._socket]), name="api server"
        )
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            await self._task  # raises what ended it
            raise ConfigError("the API server stopped as it started")

    async def stop(self) -> None:
        """Stop accepting, finish the requests in flight, close the socket."""
        self._server.should_exit = True
        try:
            if self._task is not None:
                await self._task
        finally:
            self._socket.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve (started already, or now) until ``stop`` is set."""
        if self._task is None:
            await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
