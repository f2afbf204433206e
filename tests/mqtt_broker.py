"""Pytest fixtures for the MQTT tests: a real Mosquitto per test, meters to put behind it.

Each broker listens on a free loopback port with its own password file, ACL, data directory
and (when asked) TLS listener; starting one takes a few tens of milliseconds, so every test
gets a fresh one and tests never see each other's sessions or retained messages.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from headend.broker import LocalBroker, find_mosquitto
from meter_sim.config import MeterConfig
from meter_sim.runtime import MeterRuntime
from protocols.clock import ManualClock
from protocols.mqtt import TopicScheme

#: meters every test broker knows (passwords derived from TEST_SECRET)
TEST_METERS = tuple(f"MTR-{n:04d}" for n in range(1, 9))
#: the fleet password secret of the test brokers and agents, new in every test session
TEST_SECRET = secrets.token_hex(32)
TEST_KEY = "000102030405060708090a0b0c0d0e0f"


@pytest.fixture
def mosquitto_path() -> Path:
    path = find_mosquitto()
    if path is None:
        message = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


BrokerFactory = Callable[..., LocalBroker]


@pytest.fixture
def broker_factory(tmp_path: Path, mosquitto_path: Path) -> Iterator[BrokerFactory]:
    """``make(meters=TEST_METERS, tls=False, prefix="phs", **LocalBroker kwargs)`` -> a started
    broker (meter passwords derived from TEST_SECRET unless ``meter_secret`` is given), stopped
    after the test."""
    started: list[LocalBroker] = []

    def make(
        meters: Any = TEST_METERS, *, tls: bool = False, prefix: str = "phs", **kwargs: Any
    ) -> LocalBroker:
        broker = LocalBroker(
            tmp_path / f"broker-{len(started)}",
            meters,
            topics=TopicScheme(prefix),
            tls=tls,
            binary=mosquitto_path,
            **{"meter_secret": TEST_SECRET, **kwargs},
        )
        broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> LocalBroker:
    """A started broker with TEST_METERS provisioned."""
    return broker_factory()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


RuntimeFactory = Callable[..., MeterRuntime]


@pytest.fixture
def make_runtime(tmp_path: Path, clock: ManualClock) -> RuntimeFactory:
    """``make(meter_id, **MeterConfig fields)`` -> a MeterRuntime with its state in tmp_path,
    on the shared ManualClock, keyed with TEST_KEY unless told otherwise."""

    def make(meter_id: str = TEST_METERS[0], **config: Any) -> MeterRuntime:
        config.setdefault("auth_key", TEST_KEY)
        config.setdefault("initial_credit", 100_000)
        return MeterRuntime.open(MeterConfig(meter_id, **config), clock, tmp_path / "meters")

    return make
