"""FORWARDER_METRICS_ADDRESS: `forwarder run` serves Prometheus metrics, scraped here over
HTTP from the real process."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_process import Daemon
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_count_messages_and_deliveries_per_mailbox_and_list(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    port = free_port("127.0.0.1")
    daemon = start_daemon({**daemon_env, "FORWARDER_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    mailbox.deliver(build_message(), ["contact@example.org"])
    mailbox.deliver(build_message(to="nobody@example.org"), ["nobody@example.org"])  # no list
    smtp_sink.wait_for(1, timeout=20)
    daemon.wait_for_event("idle_started")
    daemon.wait_for_event("message_skipped")
    samples = scrape(port)
    box = {"mailbox": "default"}
    assert value(samples, "forwarder_messages_total", **box, outcome="forwarded") == 1
    assert value(samples, "forwarder_messages_total", **box, outcome="skipped") == 1
    assert (
        value(
            samples,
            "forwarder_deliveries_total",
            **box,
            list="contact@example.org",
            status="delivered",
        )
        == 2
    )
    cycles = value(samples, "forwarder_cycle_duration_seconds_count", outcome="ok")
    assert cycles is not None and cycles >= 1
    last = value(samples, "forwarder_last_success_timestamp_seconds", **box)
    assert last is not None and last > 0
    assert value(samples, "forwarder_mailbox_failures", **box) == 0
    assert value(samples, "forwarder_mailbox_watched", **box, how="idle") == 1
    assert value(samples, "process_resident_memory_bytes") is not None
    status, _, stderr = daemon.stop()
    assert status == 0, stderr


def test_metrics_show_deferred_deliveries_and_connection_errors(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
    smtp_proxy: FaultProxy,
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 try later"
    port = free_port("127.0.0.1")
    env = {
        **daemon_env,
        "FORWARDER_METRICS_ADDRESS": f"127.0.0.1:{port}",
        "FORWARDER_SMTP_PORT": str(smtp_proxy.port),
        "FORWARDER_POLL_INTERVAL": "1",
    }
    daemon = start_daemon(env)
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon.wait_for_event("message_deferred")
    smtp_proxy.refuse_connections()
    smtp_proxy.drop_all()
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon.wait_for_event("cycle_failed")
    samples = scrape(port)
    box = {"mailbox": "default"}
    assert value(samples, "forwarder_deferred_deliveries", **box) == 1
    errors = value(samples, "forwarder_connection_errors_total", **box, protocol="smtp")
    assert errors is not None and errors >= 1
    failures = value(samples, "forwarder_mailbox_failures", **box)
    assert failures is not None and failures >= 1
    status, _, stderr = daemon.stop()
    assert status == 0, stderr
