"""deploy/forwarder-alerts.yml: Prometheus takes it (`promtool check rules`), each alert
fires when it should and only then (`promtool test rules` on tests/forwarder-alerts.test.yml),
and every metric its rules read is one that a running `forwarder run` serves.

promtool comes with Debian's package prometheus (`bash .ci/system-deps`, as `make test`
runs; its service is not started).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_process import Daemon
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, free_port
from tests.servers.systemd import required_tool
from tests.test_metrics import scrape

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "forwarder-alerts.yml"
RULE_TESTS = ROOT / "tests" / "forwarder-alerts.test.yml"
# Series that Prometheus itself writes for every scrape target, not the forwarder.
SCRAPE_SERIES = {"up"}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


@pytest.fixture
def promtool() -> str:
    return required_tool("promtool", "prometheus", "the alert rules")


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not its functions, labels, keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)  # label matchers, ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    functions = set(re.findall(r"([A-Za-z_]\w*)\s*\(", expr))
    return set(re.findall(r"[A-Za-z_:][\w:]*", expr)) - functions - PROMQL_KEYWORDS


def test_metric_names_are_read_from_an_expression() -> None:
    expr = 'max by (mailbox) (delta(a_total{x="y z"}[1h])) > 5 unless on (m) b or absent(up == 1)'
    assert metric_names(expr) == {"a_total", "b", "up"}


def test_prometheus_accepts_the_rules_file(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_only_then(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_unit_tests_see_every_alert_fire() -> None:
    document = yaml.safe_load(RULE_TESTS.read_text())
    fired = {
        check["alertname"]
        for test in document["tests"]
        for check in test.get("alert_rule_test", [])
        if check["exp_alerts"]
    }
    assert fired == {rule["alert"] for rule in rules()}


def test_every_metric_the_rules_read_is_served_by_a_running_forwarder(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    daemon_env: dict[str, str],
    start_daemon: type[Daemon],
) -> None:
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.2.0 try later"  # a deferred delivery
    port = free_port("127.0.0.1")
    daemon = start_daemon({**daemon_env, "FORWARDER_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    daemon.wait_for_event("idle_started")
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon.wait_for_event("message_deferred")
    served = {name for name, _labels in scrape(port)}
    status, _, stderr = daemon.stop()
    assert status == 0, stderr
    read = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    assert read - SCRAPE_SERIES, "the rules read no forwarder metric"
    assert read - SCRAPE_SERIES <= served, sorted(read - SCRAPE_SERIES - served)
