"""`make demo ARGS=--ops`: the operator commands on the demo stack, as a terminal session.

An old catch-all (mail that was there before the forwarder) is looked at with a dry
run and marked with `baseline`; new mail then goes out, one member's address is
refused, fixed, and re-sent with `retry`; `history` says who received what. A
message for a list that did not exist yet is re-examined with `retry --uid`. Last, the
service (`forwarder run`) is told to reload after a member is added to a list. Every
command is the real `forwarder` process; its output is printed as it comes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.forwarder_process import ForwarderProcess
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, server_env

LISTS = {
    "contact@example.org": ["alice@example.org", "bob@example.org"],
    "compta@example.org": ["bob@example.org", "carol@example.org"],
}
ADMIN = "lists-admin@example.org"
REFUSED = "550 5.1.1 <carol@example.org>: Recipient address rejected: mailbox unknown"
EVENTS = ("delivery_", "message_", "cycle_finished")
FIELDS = ("event", "uid", "member", "code", "reason", "lists", "sent", "failed", "delivered")


def forwarder(env: dict[str, str], *args: str) -> None:
    """Run one command as an administrator would, and show what it printed."""
    print(f"\n$ forwarder {' '.join(args)}")
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = []
    for line in result.stdout.splitlines():
        if not line.startswith("{"):
            shown.append(line)
            continue
        event = json.loads(line)  # the log: the events that say what happened
        if event["event"].startswith(EVENTS):
            shown.append("  log: " + json.dumps({k: event[k] for k in FIELDS if event.get(k)}))
    shown += result.stderr.splitlines()
    print("\n".join(shown) or "  (nothing logged at level info: nothing new to forward)")
    if result.returncode != 0:
        print(f"(exit status {result.returncode})")


def section(text: str) -> None:
    print(f"\n# {text}")


def main() -> None:
    with MailServer() as mail, SmtpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env.update(server_env(mail, sink, Path(tmp) / "state.db", LISTS, ADMIN))

        section("An old catch-all: three messages were there before the forwarder")
        for subject in ("Old quote", "Old invoice", "Old question"):
            mail.deliver(
                build_message(to="contact@example.org", subject=subject), ["contact@example.org"]
            )
        forwarder(env, "once", "--dry-run")
        forwarder(env, "baseline")
        forwarder(env, "once")
        print(f"(SMTP transactions so far: {len(sink.received)})")

        section("New mail; carol's mailbox does not exist yet at her server")
        sink.rcpt_responses["carol@example.org"] = REFUSED
        invoice = build_message(
            to="compta@example.org",
            sender="noreply@impots.example",
            subject="Avis d'impot",
            message_id="<avis-2026-0042@impots.example>",
        )
        mail.deliver(invoice, ["compta@example.org"])
        mail.deliver(
            build_message(to="contact@example.org", cc="bob@example.org"), ["contact@example.org"]
        )
        mail.deliver(build_message(to="info@example.org", subject="Info"), ["info@example.org"])
        forwarder(env, "once", "--dry-run")
        forwarder(env, "once")
        forwarder(env, "history", "carol@example.org")

        section("Carol's mailbox is created; the failed delivery is sent again")
        del sink.rcpt_responses["carol@example.org"]
        forwarder(env, "retry", "--failed")
        forwarder(env, "once")
        forwarder(env, "history", "<avis-2026-0042@impots.example>")

        section("A list info@ is added: the message skipped earlier is examined again")
        env["FORWARDER_LISTS"] = json.dumps(LISTS | {"info@example.org": ["dave@example.org"]})
        info_uid = max(uid for uid, _, _ in mail.messages())
        forwarder(env, "retry", "--uid", str(info_uid))
        forwarder(env, "once")
        forwarder(env, "history", "info@example.org")

        section("The service: a member added to a list, then `systemctl reload` (SIGHUP)")
        reload_demo(env, mail, sink, Path(tmp))
        print(f"\nSMTP transactions in all: {len(sink.received)}")


RELOAD_SHOWN = ("ready", "reload_requested", "config_reloaded", "lists_changed", "stopped")


def reload_demo(env: dict[str, str], mail: MailServer, sink: SmtpSink, tmp: Path) -> None:
    """`forwarder run` with its lists in a file; the file is edited and the service told
    to reload, as `systemctl reload forwarder` does; new mail reaches the new member."""
    lists_file = tmp / "lists"
    lists_file.write_text(
        "# the lists, in the aliases(5) syntax\n"
        "contact@example.org: alice@example.org, bob@example.org\n"
        "compta@example.org: bob@example.org, carol@example.org\n"
        "info@example.org: dave@example.org\n"
    )
    env = {k: v for k, v in env.items() if k != "FORWARDER_LISTS"}
    env |= {"FORWARDER_LISTS_FILE": str(lists_file), "FORWARDER_POLL_INTERVAL": "3600"}
    print(f"\n$ cat {lists_file.name}\n" + lists_file.read_text().rstrip())
    print("\n$ forwarder run &   (its log lines below)")
    service = ForwarderProcess(env, "run")
    try:
        show(service.wait_for_event("ready"))
        print("\n$ sed -i 's/^contact@example.org: .*/&, erin@example.org/' lists")
        lists_file.write_text(
            lists_file.read_text().replace(
                "contact@example.org: alice@example.org, bob@example.org",
                "contact@example.org: alice@example.org, bob@example.org, erin@example.org",
            )
        )
        print("$ kill -HUP $(pidof forwarder)   # what systemctl reload forwarder does")
        service.send(signal.SIGHUP)
        show(service.wait_for_event("config_reloaded"))
        show(service.wait_for_event("lists_changed"))
        before = len(sink.received)
        mail.deliver(
            build_message(to="contact@example.org", subject="After the reload"),
            ["contact@example.org"],
        )
        [received] = sink.wait_for(before + 1, 60)[before:]
        print(f"  (the sink received it for: {', '.join(sorted(received.rcpt_tos))})")
        print("\n$ kill -TERM $(pidof forwarder)   # systemctl stop forwarder")
        service.send(signal.SIGTERM)
        status, _ = service.wait()
        show(service.wait_for_event("stopped"))
        print(f"(exit status {status})")
    finally:
        service.close()


def show(event: dict[str, object]) -> None:
    fields = {k: v for k, v in event.items() if k not in ("timestamp", "level", "logger")}
    print("  log: " + json.dumps(fields))


if __name__ == "__main__":
    main()
