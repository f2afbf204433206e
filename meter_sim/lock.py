"""One process at a time per state directory: a running simulator holds an exclusive lock, so
that an offline command (``meter-sim token``, ``show``) never races it over a meter's state."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from protocols.errors import StateFileError


class StateDirLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StateFileError(
                f"{self.path.parent} is in use by process {owner}: reach those meters through "
                "the running simulator (Modbus, MQTT) or stop it first"
            ) from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
