"""Faults a served meter injects into its answers over Modbus TCP and MQTT, at random, at the
rates of its :class:`~meter_sim.config.FaultsConfig` (a fleet file's ``[faults]`` table or a
meter's own, or ``meter-sim serve --faults``), so a head-end's retries and exactly-once
delivery can be tested under chaos end to end. Serial lines have the rig's scripted faults
instead (meter_sim/rig/faults.py).

One draw per request the meter receives (a Modbus request for its unit id, an MQTT command or
read request), from the meter's own seeded generator, so the same requests in the same order
meet the same faults:

* ``drop``: the request is lost on its way in: not executed, no answer;
* ``lose_ack``: a write (Modbus 6, 16, 23; an MQTT command) is executed and its answer lost;
  a read it falls on is answered as usual;
* ``disconnect``: the connection is closed (Modbus TCP) or the MQTT session dropped without
  a DISCONNECT packet, so the broker publishes the meter's will; the request is not executed
  and the meter reconnects after its back-off;
* ``corrupt``: the request is executed and the answer malformed: a Modbus PDU cut one byte
  short with a header that agrees with the cut, an MQTT payload that is not the schema's JSON;
* ``delay``: drawn on its own with ``delay_rate``, for an answer that is sent: it goes out
  late by a draw of the delay distribution.

Each injected fault is one log line (WARNING: the meter, the kind, what it hit) and counted per
meter and kind; :meth:`FleetFaults.summary` is what ``meter-sim serve`` prints at shutdown.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from meter_sim.config import FAULT_KINDS, MAX_FAULT_DELAY, FaultsConfig, FleetConfig

log = logging.getLogger(__name__)

DROP, LOSE_ACK, DISCONNECT, CORRUPT, DELAY = FAULT_KINDS


@dataclass(frozen=True, slots=True)
class Draw:
    """What happens to one request: ``fault`` (drop, lose_ack, disconnect, corrupt or None)
    and how many seconds late its answer goes out."""

    fault: str | None = None
    delay: float = 0.0


NO_FAULT = Draw()


class FaultInjector:
    """The faults of one meter: a seeded generator, the draw per request, the counts."""

    def __init__(self, meter_id: str, config: FaultsConfig) -> None:
        self.meter_id = meter_id
        self.config = config
        # a string seed is hashed (SHA-512): the same for this meter in every process
        self._rng = random.Random(f"{config.seed}/{meter_id}")
        self.counts: Counter[str] = Counter()
        self.requests = 0

    def draw(self, write: bool, what: str) -> Draw:
        """The faults of the next request (``write``: it would change the meter); logs and
        counts what it injects. ``what`` names the request in the log line."""
        config = self.config
        rng = self._rng
        self.requests += 1
        x = rng.random()
        fault: str | None = None
        for kind, share in (
            (DROP, config.drop),
            (LOSE_ACK, config.lose_ack),
            (DISCONNECT, config.disconnect),
            (CORRUPT, config.corrupt),
        ):
            if x < share:
                fault = kind
                break
            x -= share
        if fault == LOSE_ACK and not write:
            fault = None  # a read has nothing to apply: its answer goes out
        delay = 0.0
        delayed = rng.random() < config.delay_rate
        if config.delay is not None and delayed and fault in (None, CORRUPT):
            delay = _sample(config.delay.distribution, config.delay.low, config.delay.high, rng)
        if fault is not None:
            self._record(fault, what, "")
        if delay > 0:
            self._record(DELAY, what, f" by {delay:.3f} s")
        return Draw(fault, delay) if fault is not None or delay > 0 else NO_FAULT

    def _record(self, kind: str, what: str, detail: str) -> None:
        self.counts[kind] += 1
        log.warning("meter %s: injected fault %s (%s)%s", self.meter_id, kind, what, detail)


def _sample(distribution: str, low: float, high: float, rng: random.Random) -> float:
    if distribution == "fixed":
        return low
    if distribution == "uniform":
        return rng.uniform(low, high)
    return min(rng.expovariate(1.0 / low), MAX_FAULT_DELAY) if low > 0 else 0.0


@dataclass(slots=True)
class FleetFaults:
    """The injectors of the meters of a fleet that have faults, by meter id."""

    injectors: dict[str, FaultInjector] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        config: FleetConfig,
        override: FaultsConfig | None = None,
        seed: int | None = None,
        meter_ids: Iterable[str] | None = None,
    ) -> FleetFaults:
        """The faults of ``config``'s meters (those of ``meter_ids``, by default all): each
        meter's own table, else the fleet's; ``override`` (``--faults``) replaces both for
        every meter and ``seed`` (``--faults-seed``) every seed."""
        wanted = set(meter_ids) if meter_ids is not None else None
        injectors: dict[str, FaultInjector] = {}
        for meter in config.meters:
            if wanted is not None and meter.meter_id not in wanted:
                continue
            faults = override if override is not None else config.faults_of(meter)
            if faults is None:
                continue
            if seed is not None:
                faults = replace(faults, seed=seed)
            if faults.active:
                injectors[meter.meter_id] = FaultInjector(meter.meter_id, faults)
        return cls(injectors)

    def get(self, meter_id: str) -> FaultInjector | None:
        return self.injectors.get(meter_id)

    def __bool__(self) -> bool:
        return bool(self.injectors)

    def totals(self) -> dict[str, int]:
        """Injected faults by kind over every meter (every kind, zeros included)."""
        total: Counter[str] = Counter()
        for injector in self.injectors.values():
            total.update(injector.counts)
        return {kind: total[kind] for kind in FAULT_KINDS}

    def as_dict(self) -> dict[str, Any]:
        """The configuration and counts, as ``--ready-json`` and the shutdown summary show
        them: ``{"totals": {kind: n}, "meters": {id: {"faults": "drop=...", "requests": n,
        "injected": {kind: n}}}}``."""
        return {
            "totals": self.totals(),
            "meters": {
                meter_id: {
                    "faults": injector.config.text(),
                    "requests": injector.requests,
                    "injected": {kind: injector.counts[kind] for kind in FAULT_KINDS},
                }
                for meter_id, injector in self.injectors.items()
            },
        }

    def summary(self) -> str:
        """One line: ``faults injected into 3 meter(s) over 120 request(s): drop 4, ...``."""
        requests = sum(injector.requests for injector in self.injectors.values())
        counts = ", ".join(f"{kind} {n}" for kind, n in self.totals().items())
        return (
            f"faults injected into {len(self.injectors)} meter(s) over {requests} "
            f"request(s): {counts}"
        )
