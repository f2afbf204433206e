"""`hes serve`: one asyncio process running the poller's schedule, the MQTT ingest, the balance
monitor, the notifier, the command dispatcher (with the supply-control policy), the credit
deliverer, and with ``api_port`` the payment API (uvicorn in the same event loop).

The poller reads meters as they fall due (claimed through the database, so several workers on
one PostgreSQL database share a fleet); with a broker, the ingest writes what MQTT meters push
into the same tables (a shared subscription, so several workers split the messages). Both stop
when ``stop`` is set: no meter is claimed and no message taken after that, the reads in flight
finish and store what they read, and the message the ingest is writing is committed; messages
received and not yet written stay unacknowledged, and the broker delivers them again to the
next ingest of the group (the store's keys make a repeat harmless). A database that goes away
is logged, counted and retried; it never ends the process.

A worker's name is unique among the workers of one database: a worker that starts takes back
the claims its name holds, as those are left over from an earlier run of it that was killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from headend.api import ApiServer, create_app
from headend.domain.validation import Limits
from headend.ingest import Ingest
from headend.links.endpoint import LinkOptions
from headend.metrics import ServeMetrics
from headend.services.delivery import Deliverer, DeliverySettings
from headend.services.dispatcher import Dispatcher, DispatchSettings
from headend.services.ingest_sink import StorageSink
from headend.services.links import EndpointLinks
from headend.services.monitor import BalanceMonitor
from headend.services.notifier import Notifier
from headend.services.poller import LinkSource, Poller, PollPlan, ReadOutcome
from headend.services.senders import Sender
from headend.storage import Database, open_database
from headend.storage.polling import PollTarget, active_targets, health_counts, release_all
from protocols.clock import AcceleratedClock, Clock
from protocols.errors import StorageError
from protocols.mqtt import BrokerSettings, TopicScheme

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServeSettings:
    db_url: str | None = None
    plan: PollPlan = field(default_factory=PollPlan)
    worker: str = "hes"
    link_options: LinkOptions | None = None
    broker: BrokerSettings | None = None
    topics: TopicScheme = field(default_factory=TopicScheme)
    group: str = "hes"  # the shared subscription's group: every worker of a head-end
    metrics_port: int | None = None  # 0: a free port
    metrics_host: str = "127.0.0.1"
    housekeeping: float = 2.0  # seconds between two updates of the health gauge
    senders: Mapping[str, Sender] = field(default_factory=dict)  # none: no notifier here
    monitor_every: float | None = 10.0  # seconds between balance-monitor passes; None: none
    dispatch: DispatchSettings | None = field(default_factory=DispatchSettings)  # None: none
    policy_every: float | None = 10.0  # seconds between two policy passes; None: none
    delivery: DeliverySettings | None = field(default_factory=DeliverySettings)  # None: none
    poll: bool = True  # False: no poll schedule here (a worker that only ingests)
    api_port: int | None = None  # the payment API on this port (0: a free one); None: none
    api_host: str = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Ready:
    """What a started `hes serve` announces."""

    worker: str
    meters: int
    database: str
    metrics_port: int | None
    mqtt: str | None
    api_port: int | None = None


class MeteredPoller(Poller):
    """The poller, with each read timed and counted in the daemon's metrics."""

    def __init__(
        self,
        db: Database,
        links: LinkSource,
        clock: Clock,
        metrics: ServeMetrics,
        *,
        plan: PollPlan,
        worker: str,
    ) -> None:
        super().__init__(db, links, clock, plan=plan, worker=worker)
        self.metrics = metrics
        self.reading: set[asyncio.Task[object]] = set()

    async def read(self, target: PollTarget) -> ReadOutcome:
        task = asyncio.current_task()
        if task is not None:
            self.reading.add(task)
        started = time.monotonic()
        try:
            outcome = await super().read(target)
        except StorageError:
            self.metrics.database_errors.labels("poll").inc()
            raise
        finally:
            if task is not None:
                self.reading.discard(task)
        self.metrics.read_seconds.observe(time.monotonic() - started)
        self.metrics.polls.labels("read" if outcome.ok else "failed").inc()
        self.metrics.rows.labels("readings").inc(outcome.reading_new)
        self.metrics.rows.labels("intervals").inc(outcome.intervals + outcome.estimated)
        self.metrics.rows.labels("events").inc(outcome.events)
        self.metrics.duplicates.labels("poll").inc(outcome.duplicates)
        return outcome

    async def drain(self) -> None:
        """Wait for reads still in flight (after a schedule that ended on a storage error)."""
        pending = [t for t in self.reading if t is not asyncio.current_task()]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


async def serve(
    settings: ServeSettings,
    clock: Clock,
    stop: asyncio.Event,
    ready: Callable[[Ready], None] | None = None,
) -> ServeMetrics:
    """Run until ``stop`` is set; refuses a schema that is behind (``SchemaBehind``)."""
    db = await open_database(settings.db_url)
    metrics = ServeMetrics()
    links = EndpointLinks(settings.link_options)
    ingest: Ingest | None = None
    sink: StorageSink | None = None
    housekeeping: _Housekeeping | None = None
    api: ApiServer | None = None
    notifier = (
        Notifier(db, settings.senders, clock, worker=f"{settings.worker}-notifier")
        if settings.senders
        else None
    )
    try:
        port = None
        if settings.metrics_port is not None:
            port = metrics.serve(settings.metrics_port, settings.metrics_host)
        poller = MeteredPoller(
            db, links, clock, metrics, plan=settings.plan, worker=settings.worker
        )
        if settings.broker is not None:
            sink = StorageSink(db, clock, settings.plan.limits)
            ingest = Ingest(
                settings.broker,
                sink,
                settings.topics,
                group=settings.group,
                client_id=f"hes-serve-{settings.worker}",
            )
            metrics.watch_ingest(ingest.stats)
            await ingest.start()
        taken_back = await release_all(db, settings.worker)
        if taken_back:
            log.warning(
                "took back %d claim(s) of an earlier run of %s", taken_back, settings.worker
            )
        meters = len(await active_targets(db))
        housekeeping = _Housekeeping(db, metrics, ingest)
        await housekeeping.once()
        deliverer = None
        if settings.delivery is not None:
            deliverer = Deliverer(
                db, links, clock, worker=settings.worker, settings=settings.delivery
            )
        if settings.api_port is not None:
            # a payment the API commits wakes this process's deliverer at once
            taken = None if deliverer is None else deliverer.wake
            api = ApiServer(
                create_app(db, clock, taken=taken), settings.api_host, settings.api_port
            )
            await api.start()
        log.info("serving %d meter(s) as worker %s", meters, settings.worker)
        if ready is not None:
            ready(
                Ready(
                    settings.worker,
                    meters,
                    db.shown_url,
                    port,
                    settings.broker.url() if settings.broker else None,
                    None if api is None else api.port,
                )
            )
        async with asyncio.TaskGroup() as group:
            if api is not None:  # stops taking requests when stop is set
                group.create_task(api.run(stop), name="api")
            if settings.poll:
                group.create_task(_schedule(poller, stop, metrics), name="poll schedule")
            group.create_task(housekeeping.run(stop, settings.housekeeping), name="housekeeping")
            if settings.monitor_every is not None:
                monitor = BalanceMonitor(db, clock)
                group.create_task(monitor.run(stop, settings.monitor_every), name="monitor")
            if notifier is not None:
                group.create_task(notifier.run(stop), name="notifier")
            if settings.dispatch is not None:
                dispatcher = Dispatcher(
                    db, links, clock, worker=settings.worker, settings=settings.dispatch
                )
                group.create_task(
                    dispatcher.run(stop, policy_every=settings.policy_every), name="dispatcher"
                )
            if deliverer is not None:
                group.create_task(deliverer.run(stop), name="credit deliverer")
            if ingest is not None and sink is not None:
                group.create_task(_stop_ingest(ingest, sink, stop), name="ingest stop")
        log.info("stopped: the reads in flight are stored")
    finally:
        if api is not None:
            await api.stop()
        if notifier is not None:
            await notifier.close()
        if ingest is not None:
            await ingest.close()
        await links.close()
        if housekeeping is not None:
            await housekeeping.once()  # the last counts, for the caller
        metrics.close()
        await db.close()
    return metrics


async def _schedule(poller: MeteredPoller, stop: asyncio.Event, metrics: ServeMetrics) -> None:
    """The poller's schedule, started again after a storage failure, until ``stop``."""
    delay = 0.5
    while not stop.is_set():
        try:
            await poller.run(stop)
        except StorageError as exc:
            metrics.database_errors.labels("schedule").inc()
            log.error("the poll schedule failed (%s); again in %.1f s", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 10.0)
        else:
            delay = 0.5
    await poller.drain()


async def _stop_ingest(ingest: Ingest, sink: StorageSink, stop: asyncio.Event) -> None:
    await stop.wait()
    await sink.stop()  # the write in flight is committed (and acknowledged); no new one starts
    await ingest.close()  # the messages not yet taken are delivered again to the group


class _Housekeeping:
    """Brings the gauges and the ingest's counts into the metrics, every few seconds."""

    def __init__(self, db: Database, metrics: ServeMetrics, ingest: Ingest | None) -> None:
        self.db = db
        self.metrics = metrics
        self.ingest = ingest
        self._sink_failures = 0

    async def once(self) -> None:
        if self.ingest is not None:
            sink = self.ingest.sink
            if isinstance(sink, StorageSink):
                self.metrics.count_sink(sink.stats)
            failures = self.ingest.stats.sink_failures
            self.metrics.database_errors.labels("ingest").inc(failures - self._sink_failures)
            self._sink_failures = failures
        try:
            self.metrics.set_health(await health_counts(self.db))
        except StorageError as exc:
            self.metrics.database_errors.labels("housekeeping").inc()
            log.warning("counting meters by health failed: %s", exc)

    async def run(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            await self.once()


def accelerated_clock(
    speed: float, start: datetime | None, at: datetime | None = None
) -> AcceleratedClock:
    """The head-end's clock for a simulation: ``speed`` times real time, standing at ``start``
    (default: the real time now) at the real moment ``at`` (default: now), as
    `meter-sim serve --speed` runs from ``simulation.start``."""
    if start is None:
        return AcceleratedClock(speed)
    elapsed = 0.0 if at is None else time.time() - at.timestamp()
    return AcceleratedClock(speed, start.timestamp() + elapsed * speed)


def clock_limits(speed: float, limits: Limits | None = None) -> Limits:
    """Validation limits for a head-end on a clock ``speed`` times real time: the meters'
    clocks may differ from it by what ten real seconds of start-up difference make."""
    base = limits or Limits()
    tolerance = max(base.clock_tolerance_s, int(speed * 10))
    return Limits(max_power_w=base.max_power_w, clock_tolerance_s=tolerance)
