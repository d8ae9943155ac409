"""SIGHUP (`systemctl reload`): the configuration is read again and checked in full, what
changed is logged and applied between cycles, an invalid one is refused and the running
one kept, and a delivery in flight is never cut."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LISTS
from tests.daemon_process import Daemon
from tests.faults import FaultProxy
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, self_signed_certificate


@pytest.fixture
def lists_file(tmp_path: Path) -> Path:
    path = tmp_path / "lists.json"
    path.write_text(json.dumps(LISTS))
    return path


@pytest.fixture
def reload_env(daemon_env: dict[str, str], lists_file: Path) -> Iterator[dict[str, str]]:
    env = {k: v for k, v in daemon_env.items() if k != "FORWARDER_LISTS"}
    env["FORWARDER_LISTS_FILE"] = str(lists_file)
    yield env


def changed_lists() -> dict[str, list[str]]:
    lists = {k: list(v) for k, v in LISTS.items() if k != "direction@example.org"}
    lists["contact@example.org"] = [*lists["contact@example.org"], "erin@example.org"]
    return lists


def test_sighup_applies_the_new_lists_and_logs_what_changed(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    reload_env: dict[str, str],
    lists_file: Path,
    start_daemon: type[Daemon],
) -> None:
    daemon = start_daemon(reload_env)
    mailbox.deliver(build_message(subject="before"), ["contact@example.org"])
    assert smtp_sink.wait_for(1, timeout=20)[0].rcpt_tos == ["alice@example.org", "bob@example.org"]
    lists_file.write_text(json.dumps(changed_lists()))
    daemon.send(signal.SIGHUP)
    reloaded = daemon.wait_for_event("config_reloaded")
    assert reloaded["mailboxes_changed"] == ["default"]
    changed = daemon.wait_for_event("lists_changed")
    assert changed["mailbox"] == "default"
    assert changed["lists_removed"] == ["direction@example.org"]
    assert changed["members_added"] == {"contact@example.org": ["erin@example.org"]}
    mailbox.deliver(build_message(subject="after"), ["contact@example.org"])
    received = smtp_sink.wait_for(2, timeout=20)
    assert sorted(received[1].rcpt_tos) == [
        "alice@example.org",
        "bob@example.org",
        "erin@example.org",
    ]
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert [e["event"] for e in events][-1] == "stopped"


def test_an_invalid_configuration_on_reload_is_refused_and_the_old_one_kept(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    reload_env: dict[str, str],
    lists_file: Path,
    start_daemon: type[Daemon],
) -> None:
    daemon = start_daemon(reload_env)
    daemon.wait_for_event("ready")
    lists_file.write_text('{"contact@example.org": ["alice@example.org",]}')  # a stray comma
    daemon.send(signal.SIGHUP)
    failed = daemon.wait_for_event("reload_failed")
    assert "FORWARDER_LISTS" in str(failed["error"])
    assert failed["level"] == "error"
    mailbox.deliver(build_message(), ["contact@example.org"])
    assert smtp_sink.wait_for(1, timeout=20)[0].rcpt_tos == ["alice@example.org", "bob@example.org"]
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert "config_reloaded" not in [e["event"] for e in events]


def test_a_reload_during_a_delivery_waits_for_it(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    reload_env: dict[str, str],
    lists_file: Path,
    start_daemon: type[Daemon],
    smtp_proxy: FaultProxy,
) -> None:
    slow = smtp_proxy.stall_after(0, side="client", after=b"DATA\r\n")
    mailbox.deliver(build_message(), ["contact@example.org"])
    daemon = start_daemon({**reload_env, "FORWARDER_SMTP_PORT": str(smtp_proxy.port)})
    assert slow.wait(20)  # the message is on its way, its content held up
    lists_file.write_text(json.dumps(changed_lists()))
    daemon.send(signal.SIGHUP)
    daemon.wait_for_event("config_reloaded")
    slow.release()
    assert smtp_sink.wait_for(1, timeout=20)[0].rcpt_tos == ["alice@example.org", "bob@example.org"]
    forwarded = daemon.wait_for_event("message_forwarded")
    assert forwarded["sent"] == 2
    status, events, stderr = daemon.stop()
    assert status == 0, stderr
    assert "cycle_failed" not in [e["event"] for e in events]


def test_settings_a_reload_cannot_apply_are_named_and_kept(
    mailbox: MailServer,
    smtp_sink: SmtpSink,
    reload_env: dict[str, str],
    lists_file: Path,
    start_daemon: type[Daemon],
    tmp_path: Path,
) -> None:
    """The lease length and the CA file need a restart: said so, and the old values kept
    (new delivery claims with another lease than the mailbox leases would disagree)."""
    daemon = start_daemon(reload_env)
    daemon.wait_for_event("ready")
    ca, _ = self_signed_certificate(tmp_path)
    (tmp_path / ".env").write_text(f"FORWARDER_TAKEOVER_AFTER=30s\nFORWARDER_TLS_CA_FILE={ca}\n")
    lists_file.write_text(json.dumps(changed_lists()))
    daemon.send(signal.SIGHUP)
    needs = daemon.wait_for_event("reload_needs_restart")
    assert sorted(needs["settings"]) == ["FORWARDER_TAKEOVER_AFTER", "FORWARDER_TLS_CA_FILE"]
    daemon.wait_for_event("lists_changed")  # what can be applied still is
    mailbox.deliver(build_message(subject="after"), ["contact@example.org"])
    assert "erin@example.org" in smtp_sink.wait_for(1, timeout=20)[0].rcpt_tos
    status, _, stderr = daemon.stop()
    assert status == 0, stderr
