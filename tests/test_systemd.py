"""deploy/: the unit under a real systemd, installed exactly as deploy/README.md says.

Each test gets ``system``, a fresh container where the doc's commands ran and the
service started at boot (tests/deployment.py); using it marks a test ``container``
(run by ``make test-systemd``, not ``make test``). Adding a check: act with
``system.write``/``system.systemctl``/``system.shell``, look with ``system.show``
(``systemctl show`` properties), ``system.journal`` and :func:`members_received`,
and wait with :func:`wait_until` on a condition, never on time. Among the checks:

* reload: the lists file changed, ``systemctl reload forwarder`` (the unit's
  ``ExecReload=``) while a message is being forwarded; that message reaches its
  list's members once, a message to the changed list reaches its new members once,
  the process is the same (``MainPID``);
* journal priorities: an error provoked (``systemctl stop smtp-sink``, then a
  message) is in ``journalctl -u forwarder -p err``, and no info line is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.deployment import ADMIN_FUNCTION, CHECKOUT, LISTS, LISTS_FILE, UNIT, doc_commands
from tests.mail import build_message
from tests.servers.systemd import Container, wait_until
from tests.servers.systemd_mail import CATCHALL_PASSWORD, deliver, received

STATE_DIR = "/var/lib/private/forwarder"  # where DynamicUser= keeps StateDirectory=forwarder
WATCHDOG_SEC = 5  # shortened by a drop-in for the watchdog checks (the unit says 120)


def test_doc_commands_are_the_numbered_sections_blocks() -> None:
    markdown = (
        "## 1. A\n```sh\na /path/to/checkout\n```\n"
        "## Other\n```sh\nb\n```\n"
        "## 2. C\n```sh\nc\n```\n"
    )
    assert doc_commands(markdown) == f"a {CHECKOUT}\nc\n"


# --------------------------------------------------------------------------- helpers


def service_state(system: Container) -> dict[str, str]:
    return system.show(
        UNIT, "ActiveState", "SubState", "Result", "MainPID", "NRestarts", "ExecMainCode",
        "ExecMainStatus",
    )  # fmt: skip


def members_received(system: Container) -> dict[str, int]:
    """How many copies each address received, over every transaction so far."""
    counts: dict[str, int] = {}
    for transaction in received(system):
        for rcpt in transaction.rcpt_tos:
            counts[rcpt] = counts.get(rcpt, 0) + 1
    return counts


def copies_of(system: Container, raw: bytes) -> dict[str, int]:
    """How many copies of the message ``raw`` each address received."""
    counts: dict[str, int] = {}
    for transaction in received(system):
        if transaction.data.endswith(raw):
            for rcpt in transaction.rcpt_tos:
                counts[rcpt] = counts.get(rcpt, 0) + 1
    return counts


def wait_for_copies(system: Container, raw: bytes, members: list[str]) -> None:
    try:
        wait_until(lambda: set(members) <= set(copies_of(system, raw)), "a copy for each member")
    except TimeoutError as error:
        raise AssertionError(f"{error}\n{system.diagnosis(UNIT)}") from None


def forward_one(system: Container, list_address: str) -> bytes:
    """Deliver a message to ``list_address``; return once every member received a copy."""
    raw = build_message(to=list_address)
    deliver(system, raw, list_address)
    wait_for_copies(system, raw, LISTS[list_address])
    return raw


def events(journal: str) -> list[dict[str, object]]:
    """The forwarder's JSON log events among journal lines (``-o cat``)."""
    return [json.loads(line) for line in journal.splitlines() if line.startswith("{")]


def shorten_watchdog(system: Container) -> None:
    system.write(
        f"/etc/systemd/system/{UNIT}.service.d/watchdog.conf",
        f"[Service]\nWatchdogSec={WATCHDOG_SEC}\n",
    )
    system.systemctl("daemon-reload")
    system.systemctl("restart", UNIT)


def owner(system: Container, path: str) -> int:
    return int(system.run("stat", "--format=%u", path).stdout)


# --------------------------------------------------------------------------- checks


def test_installed_as_the_doc_says_the_service_is_active_and_running(system: Container) -> None:
    state = service_state(system)
    running = (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert running, system.diagnosis(UNIT)
    assert "Active: active (running)" in system.systemctl("status", UNIT).stdout


def test_a_message_to_a_list_reaches_each_member_once(system: Container) -> None:
    raw = forward_one(system, "contact@example.org")
    system.systemctl("stop", UNIT)  # nothing more can be sent: count now
    assert members_received(system) == {"alice@example.org": 1, "bob@example.org": 1}
    for transaction in received(system):
        assert transaction.data.endswith(raw)


def test_stop_ends_the_process_with_exit_status_0(system: Container) -> None:
    system.systemctl("stop", UNIT)
    state = service_state(system)
    assert state["ActiveState"] == "inactive", system.diagnosis(UNIT)
    assert (state["ExecMainCode"], state["ExecMainStatus"]) == ("1", "0"), system.diagnosis(UNIT)
    assert state["Result"] == "success"


def test_the_watchdog_does_not_kill_a_live_service(system: Container) -> None:
    shorten_watchdog(system)
    start = system.show(UNIT, "MainPID", "ExecMainStartTimestampMonotonic")
    started = int(start["ExecMainStartTimestampMonotonic"])

    def pinged_after_a_full_period() -> dict[str, str] | None:
        state = system.show(UNIT, "WatchdogTimestampMonotonic", "MainPID", "ActiveState")
        if state["MainPID"] != start["MainPID"] or state["ActiveState"] != "active":
            return state  # killed or restarted: fail below
        last_ping = int(state["WatchdogTimestampMonotonic"])
        return state if last_ping - started > WATCHDOG_SEC * 1_000_000 else None

    wait_until(pinged_after_a_full_period, "a watchdog ping a full WatchdogSec after the start")
    state = service_state(system)
    assert state["MainPID"] == start["MainPID"], system.diagnosis(UNIT)
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0"), system.diagnosis(UNIT)


def test_a_frozen_process_is_killed_by_the_watchdog(system: Container) -> None:
    shorten_watchdog(system)
    system.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", UNIT)
    result = wait_until(
        lambda: (r := system.show(UNIT, "Result")["Result"]) != "success" and r,
        "the watchdog to end the frozen process",
    )
    assert result == "watchdog", system.diagnosis(UNIT)


def test_the_admin_helper_leaves_the_state_directory_to_the_service(system: Container) -> None:
    service_uid = int(system.run("ps", "-o", "uid=", "-p", service_state(system)["MainPID"]).stdout)
    assert owner(system, STATE_DIR) == service_uid
    system.shell(f". {ADMIN_FUNCTION}; forwarder_admin status")
    assert owner(system, STATE_DIR) == service_uid, "forwarder_admin re-owned the state directory"
    forward_one(system, "compta@example.org")  # the service still records its deliveries


def test_the_service_and_the_admin_helper_use_the_state_file_of_the_state_directory(
    system: Container,
) -> None:
    forward_one(system, "contact@example.org")
    system.systemctl("stop", UNIT)  # its results recorded
    system.run("test", "-s", f"{STATE_DIR}/state.db")  # $STATE_DIRECTORY/state.db
    report = json.loads(system.shell(f". {ADMIN_FUNCTION}; forwarder_admin status --json").stdout)
    assert report["state_db"] == "/var/lib/forwarder/state.db", report
    assert report["deliveries"] == {"delivered": 2}, report


def test_a_lists_file_only_root_can_read_stops_the_service_with_status_2(system: Container) -> None:
    system.run("chmod", "0600", LISTS_FILE)
    system.systemctl("restart", UNIT, check=False)  # fails: the process exits before READY
    state = service_state(system)
    failed = (state["ActiveState"], state["ExecMainStatus"]) == ("failed", "2")
    assert failed, system.diagnosis(UNIT)
    error = f"FORWARDER_LISTS_FILE: cannot read {LISTS_FILE} (Permission denied)"
    assert error in system.journal(UNIT)  # as deploy/README.md quotes it


def test_reload_applies_a_changed_lists_file_in_the_same_process(system: Container) -> None:
    before = service_state(system)
    changed = {**LISTS, "contact@example.org": ["alice@example.org", "dave@example.org"]}
    system.write(LISTS_FILE, json.dumps(changed, indent=2) + "\n")  # mode 0644, as installed
    in_flight = build_message(to="compta@example.org")  # a list the reload leaves as it is
    deliver(system, in_flight, "compta@example.org")
    system.systemctl("reload", UNIT)  # needs ExecReload=; returns once SIGHUP is sent

    def reloaded() -> bool:
        state = system.show(UNIT, "ActiveState")["ActiveState"]  # "reloading" until READY=1
        return state == "active" and "lists_changed" in system.journal(UNIT)

    wait_until(reloaded, "the reload to be applied (lists_changed, then READY)")
    wait_for_copies(system, in_flight, LISTS["compta@example.org"])
    after_reload = build_message(to="contact@example.org")
    deliver(system, after_reload, "contact@example.org")
    wait_for_copies(system, after_reload, changed["contact@example.org"])
    state = service_state(system)
    assert state["MainPID"] == before["MainPID"], system.diagnosis(UNIT)
    assert (state["ActiveState"], state["NRestarts"]) == ("active", "0"), system.diagnosis(UNIT)
    system.systemctl("stop", UNIT)  # nothing more can be sent: count now
    assert copies_of(system, in_flight) == {"bob@example.org": 1, "carol@example.org": 1}
    assert copies_of(system, after_reload) == {"alice@example.org": 1, "dave@example.org": 1}
    logged = events(system.journal(UNIT, "--boot"))  # not the install's run
    [change] = [e for e in logged if e["event"] == "lists_changed"]
    assert change["members_added"] == {"contact@example.org": ["dave@example.org"]}
    assert change["members_removed"] == {"contact@example.org": ["bob@example.org"]}
    names = [e["event"] for e in logged]
    assert names.count("started") == 1 and "stop_timeout" not in names, names


def test_journal_priorities_let_p_err_show_the_errors_and_no_info_line(system: Container) -> None:
    forward_one(system, "contact@example.org")  # info lines: message_forwarded, delivery_sent
    system.systemctl("stop", "smtp-sink")
    deliver(system, build_message(to="compta@example.org"), "compta@example.org")
    wait_until(
        lambda: "cycle_failed" in system.journal(UNIT), "the cycle to fail on the stopped sink"
    )
    everything = events(system.journal(UNIT))
    assert {"started", "ready", "message_forwarded"} <= {e["event"] for e in everything}
    errors = events(system.journal(UNIT, "-p", "err"))
    assert "cycle_failed" in [e["event"] for e in errors], system.journal(UNIT, "-p", "err")
    assert {e["level"] for e in errors} == {"error"}, errors
    warnings = events(system.journal(UNIT, "-p", "warning"))
    assert {e["level"] for e in warnings} <= {"error", "warning"}, warnings


# --------------------------------------------------------------------------- a provider's set-up

PROVIDER_DOC = Path(__file__).resolve().parent.parent / "docs" / "provider.md"
# What the administrator types into each file that docs/provider.md opens with `editor`.
PROVIDER_EDITS = {
    "/etc/forwarder/mailboxes.toml": """\
[[mailbox]]
name = "acme"
imap_username = "catchall@example.org"
imap_password_file = "passwords/acme"
lists_file = "lists/acme"
""",
    "/etc/forwarder/passwords/acme": f"{CATCHALL_PASSWORD}\n",
    "/etc/forwarder/lists/acme": "team@example.org: alice@example.org, erin@example.org\n",
}
PATH_EDITOR = """\
#!/bin/sh
# Stands in for the administrator: writes the prepared content of each file, by its path.
set -e
for file; do cat "/root/edits$file" > "$file"; done
"""


def provider_commands() -> str:
    """docs/provider.md's block that creates the user and the files of a mailboxes file."""
    text = PROVIDER_DOC.read_text()
    [block] = [b for b in re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S) if "useradd" in b]
    return block


def test_a_mailboxes_file_with_group_readable_password_files_as_the_provider_guide_says(
    system: Container,
) -> None:
    system.systemctl("stop", UNIT)  # the guide: the user is created before the service runs
    for path, text in PROVIDER_EDITS.items():
        system.write(f"/root/edits{path}", text, 0o600)
    system.write("/usr/local/bin/editor", PATH_EDITOR, 0o755)
    system.shell(provider_commands())
    env = "/etc/forwarder/forwarder.env"
    system.shell(f"echo FORWARDER_MAILBOXES_FILE=/etc/forwarder/mailboxes.toml >> {env}")
    system.write("/etc/forwarder/imap_password", "", 0o600)  # every mailbox has its own
    system.systemctl("start", UNIT)
    state = service_state(system)
    running = (state["ActiveState"], state["SubState"]) == ("active", "running")
    assert running, system.diagnosis(UNIT)
    static_uid = int(system.run("id", "-u", "forwarder").stdout)
    assert int(system.run("ps", "-o", "uid=", "-p", state["MainPID"]).stdout) == static_uid
    raw = build_message(to="team@example.org")
    deliver(system, raw, "team@example.org")
    wait_for_copies(system, raw, ["alice@example.org", "erin@example.org"])
    logged = events(system.journal(UNIT, "--boot"))
    assert [e["mailbox"] for e in logged if e["event"] == "message_forwarded"] == ["acme"]
    check = system.shell(f". {ADMIN_FUNCTION}; forwarder_admin check --mailbox acme", check=False)
    assert check.returncode == 0, check.stdout + check.stderr  # reads the same files
