"""Prometheus metrics of `hes serve` (prometheus-client), on a registry of their own.

Names (each counter also has the ``_total`` suffix Prometheus gives counters):

* ``hes_polls_total{outcome}``: meter reads by outcome: ``read``, ``failed``;
* ``hes_read_duration_seconds``: a histogram of one meter's read, retries and storing included;
* ``hes_meters{health}``: active meters by read health (unknown, online, degraded, unreachable);
* ``hes_rows_stored_total{table}``: rows written: readings, intervals, events;
* ``hes_ingest_messages_total{outcome}``: MQTT messages the ingest took, by what became of
  them: telemetry, events, states, duplicates, malformed, refused, internal_errors;
* ``hes_duplicates_total{source}``: repeats the store already held: poll, mqtt;
* ``hes_database_errors_total{where}``: storage failures: ``poll`` (storing a read),
  ``ingest`` (storing a message, retried), ``schedule`` (claiming meters), ``housekeeping``
  (counting meters by health).

The ingest's counters are its own (:class:`headend.ingest.IngestStats`) and are read when the
metrics are scraped; the rest are counted as things happen.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from headend.domain.health import Health
from headend.ingest import IngestStats
from headend.services.ingest_sink import SinkStats
from protocols.errors import ConfigError

#: every metric family, as a scrape shows it, with its labels (the --metrics-port help's list)
METRIC_NAMES = (
    "hes_polls_total{outcome}",
    "hes_read_duration_seconds",
    "hes_meters{health}",
    "hes_rows_stored_total{table}",
    "hes_ingest_messages_total{outcome}",
    "hes_duplicates_total{source}",
    "hes_database_errors_total{where}",
)

READ_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)

#: the ingest's outcome label -> its IngestStats field
_INGEST_OUTCOMES = {
    "telemetry": "telemetry",
    "events": "events",
    "states": "states",
    "duplicates": "duplicates",
    "malformed": "malformed",
    "refused": "sink_refused",
    "internal_errors": "internal_errors",
}


class _IngestCollector(Collector):
    def __init__(self) -> None:
        self.ingest: IngestStats | None = None

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "hes_ingest_messages", "MQTT messages the ingest took, by outcome", labels=["outcome"]
        )
        if self.ingest is not None:
            for label, name in _INGEST_OUTCOMES.items():
                messages.add_metric([label], float(getattr(self.ingest, name)))
        yield messages


class ServeMetrics:
    """The daemon's metrics; :meth:`serve` publishes them over HTTP on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.polls = Counter(
            "hes_polls", "Meter reads by outcome", ["outcome"], registry=self.registry
        )
        self.read_seconds = Histogram(
            "hes_read_duration_seconds",
            "One meter's read, retries and storing included",
            buckets=READ_BUCKETS,
            registry=self.registry,
        )
        self.meters = Gauge(
            "hes_meters", "Active meters by read health", ["health"], registry=self.registry
        )
        self.rows = Counter("hes_rows_stored", "Rows written", ["table"], registry=self.registry)
        self.duplicates = Counter(
            "hes_duplicates", "Repeats the store held already", ["source"], registry=self.registry
        )
        self.database_errors = Counter(
            "hes_database_errors", "Storage failures", ["where"], registry=self.registry
        )
        for outcome in ("read", "failed"):
            self.polls.labels(outcome)
        for table in ("readings", "intervals", "events"):
            self.rows.labels(table)
        for source in ("poll", "mqtt"):
            self.duplicates.labels(source)
        for where in ("poll", "ingest", "schedule", "housekeeping"):
            self.database_errors.labels(where)
        self.set_health({})
        self._ingest = _IngestCollector()
        self.registry.register(self._ingest)
        self._sink_counted = SinkStats()
        self._server: tuple[WSGIServer, threading.Thread] | None = None

    def set_health(self, counts: dict[str, int]) -> None:
        for health in Health:
            self.meters.labels(health.value).set(counts.get(health.value, 0))

    def watch_ingest(self, ingest: IngestStats) -> None:
        self._ingest.ingest = ingest

    def count_sink(self, sink: SinkStats) -> None:
        """Add what the storage sink stored since the last call to the row counters."""
        last = self._sink_counted
        self.rows.labels("readings").inc(sink.readings - last.readings)
        self.rows.labels("events").inc(sink.events - last.events)
        self.duplicates.labels("mqtt").inc(sink.duplicates - last.duplicates)
        self._sink_counted = dataclasses.replace(sink)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Answer scrapes on ``http://host:port/metrics`` (port 0: a free one); returns the
        port."""
        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics on {host}:{port}: {exc.strerror or exc}") from exc
        self._server = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            server, thread = self._server
            self._server = None
            server.shutdown()
            server.server_close()
            thread.join()
