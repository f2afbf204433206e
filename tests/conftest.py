"""Shared test setup: guards against leaked threads and leaked asyncio tasks, and the shared
fixture plugins."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

pytest_plugins: list[str] = ["tests.mqtt_broker"]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a thread running behind it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 2.0
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest_asyncio.fixture
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail an async test that leaves a task running in its event loop."""
    yield
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    leaked = [t for t in pending if not t.done()]
    for task in leaked:
        task.cancel()
    assert not leaked, f"tasks left running: {[t.get_name() for t in leaked]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every async test gets the task guard (its fixtures are resolved by these names)."""
    for item in items:
        function = getattr(item, "function", None)
        names = getattr(item, "fixturenames", None)
        if inspect.iscoroutinefunction(function) and isinstance(names, list):
            names.insert(0, "_no_leaked_tasks")  # set up first, so torn down last
