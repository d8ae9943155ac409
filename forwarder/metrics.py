"""Prometheus metrics of `forwarder run` (FORWARDER_METRICS_ADDRESS, off by default).

Counters and the cycle-duration histogram are updated as things happen (the workers,
and each mailbox's `Reporter` through `MailboxObserver`); the gauges are read when
Prometheus scrapes (`_StateCollector`): each mailbox's last good cycle, failures in a
row and how it is watched, and the deliveries waiting for a retry, counted by the state
store in one query. Metrics live in their own registry: the process metrics
(`process_resident_memory_bytes`, open file descriptors) are added to it.

The cycle-duration histogram has no mailbox label: a thousand mailboxes times its buckets
would be more series than the rest together; the per-mailbox gauges say which mailbox
is slow or failing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.config import parse_address
from forwarder.errors import ForwarderError, ImapError, SmtpError
from forwarder.state import Status

if TYPE_CHECKING:
    from forwarder.worker import MailboxWorker

log = structlog.get_logger("forwarder.metrics")
CYCLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class MailboxState(Protocol):
    """What the daemon shows of itself at scrape time."""

    def mailbox_workers(self) -> Iterable[MailboxWorker]: ...

    def deferred_counts(self) -> Mapping[str, int]: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.messages = Counter(
            "forwarder_messages",
            "Messages examined, by outcome (forwarded, failed, deferred, skipped, quarantined)",
            ["mailbox", "outcome"],
            registry=r,
        )
        self.deliveries = Counter(
            "forwarder_deliveries",
            "(message, member) delivery results by status, per list the message was sent to",
            ["mailbox", "list", "status"],
            registry=r,
        )
        self.cycles = Histogram(
            "forwarder_cycle_duration_seconds",
            "Duration of poll cycles (all mailboxes), by outcome",
            ["outcome"],
            buckets=CYCLE_BUCKETS,
            registry=r,
        )
        self.connection_errors = Counter(
            "forwarder_connection_errors",
            "IMAP and SMTP connection errors (cycles and IDLE connections)",
            ["mailbox", "protocol"],
            registry=r,
        )
        self.cycle_failures = Counter(
            "forwarder_cycle_failures",
            "Failed cycles, by error type",
            ["mailbox", "error_type"],
            registry=r,
        )
        self._server: WSGIServer | None = None

    def watch(self, state: MailboxState) -> None:
        self.registry.register(_StateCollector(state))

    def serve(self, address: str) -> None:
        """Listen on `address`; raises ForwarderError (naming the variable) if it cannot."""
        host, port = parse_address(address)
        try:
            server, _thread = start_http_server(port, host, registry=self.registry)
        except OSError as exc:
            raise ForwarderError(
                f"cannot listen on {address} ({exc.strerror or exc})",
                settings=("FORWARDER_METRICS_ADDRESS",),
            ) from None
        self._server = server
        log.info("metrics_listening", address=address)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # What the workers report ---------------------------------------------------------

    def cycle(self, mailbox: str, duration: float, error: BaseException | None) -> None:
        self.cycles.labels("error" if error else "ok").observe(duration)
        if error is None:
            return
        self.cycle_failures.labels(mailbox, type(error).__name__).inc()
        protocol = _protocol(error)
        if protocol is not None:
            self.connection_errors.labels(mailbox, protocol).inc()

    def idle_error(self, mailbox: str) -> None:
        self.connection_errors.labels(mailbox, "imap").inc()

    def observer(self, mailbox: str) -> MailboxObserver:
        return MailboxObserver(self, mailbox)

    def forget(self, mailbox: str) -> None:
        """A mailbox no longer served here (reload, lease lost): drop its series."""
        for metric, names in (
            (self.messages, ("mailbox", "outcome")),
            (self.deliveries, ("mailbox", "list", "status")),
            (self.connection_errors, ("mailbox", "protocol")),
            (self.cycle_failures, ("mailbox", "error_type")),
        ):
            for family in metric.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.labels["mailbox"] == mailbox:
                        with contextlib.suppress(KeyError):
                            metric.remove(*(sample.labels[n] for n in names))


def _protocol(error: BaseException) -> str | None:
    if isinstance(error, ImapError):
        return "imap"
    if isinstance(error, SmtpError):
        return "smtp"
    return None


class MailboxObserver:
    """What one mailbox's `Reporter` tells the metrics (`Reporter.observer`)."""

    def __init__(self, metrics: Metrics, mailbox: str) -> None:
        self.metrics = metrics
        self.mailbox = mailbox

    def message(self, outcome: str) -> None:
        self.metrics.messages.labels(self.mailbox, outcome).inc()

    def delivery(self, lists: Iterable[str], status: Status) -> None:
        for address in lists or ("",):
            self.metrics.deliveries.labels(self.mailbox, address, status.value).inc()


class _StateCollector(Collector):
    def __init__(self, state: MailboxState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # collected on demand only (the registry must not call collect() early)

    def collect(self) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "forwarder_last_success_timestamp_seconds",
            "Unix time of the mailbox's last successful cycle (absent: none since start)",
            labels=["mailbox"],
        )
        failing = GaugeMetricFamily(
            "forwarder_mailbox_failures",
            "Cycles of the mailbox failed in a row (0: its last cycle succeeded)",
            labels=["mailbox"],
        )
        watched = GaugeMetricFamily(
            "forwarder_mailbox_watched",
            "1 when new mail is noticed at once (IMAP IDLE), 0 when only the poll finds it",
            labels=["mailbox", "how"],
        )
        for worker in list(self.state.mailbox_workers()):
            if worker.last_success is not None:
                last.add_metric([worker.name], worker.last_success)
            failing.add_metric([worker.name], worker.failures)
            how = worker.watching
            watched.add_metric([worker.name, how or "poll"], 1 if how else 0)
        yield last
        yield failing
        yield watched
        deferred = GaugeMetricFamily(
            "forwarder_deferred_deliveries",
            "Deliveries waiting for a retry now (from the state store)",
            labels=["mailbox"],
        )
        try:
            counts = self.state.deferred_counts()
        except ForwarderError as exc:
            log.warning("metrics_store_error", error=str(exc))
            counts = {}
        for mailbox, count in sorted(counts.items()):
            deferred.add_metric([mailbox], count)
        yield deferred
