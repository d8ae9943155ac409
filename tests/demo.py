"""`make demo`: the real forwarder against a throwaway Dovecot and SMTP sink.

Starts a private Dovecot (catch-all mailbox) and an SMTP sink on free loopback
ports, delivers a few sample messages the way an MTA would (LMTP), runs
`forwarder once` twice as a real process, and prints who received what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from tests.mail import build_message
from tests.servers import MailServer, SmtpSink, server_env

LISTS = {
    "contact@example.org": ["alice@example.org", "bob@example.org"],
    "compta@example.org": ["bob@example.org", "carol@example.org"],
    "direction@example.org": ["dave@example.org", "compta@example.org"],
}

SAMPLES = [
    (
        "to contact@",
        build_message(to="contact@example.org", subject="Devis"),
        ["contact@example.org"],
    ),
    (
        "to contact@ and compta@ (one delivery, two identical copies)",
        build_message(to="contact@example.org, compta@example.org", subject="Facture"),
        ["contact@example.org", "compta@example.org"],
    ),
    (
        "Bcc to direction@ (nested: includes compta@)",
        build_message(to="someone@partner.example", subject="Confidentiel"),
        ["direction@example.org"],
    ),
    (
        "to Contact+Urgent@Example.ORG",
        build_message(to="Contact+Urgent@Example.ORG", subject="Urgent"),
        ["Contact+Urgent@Example.ORG"],
    ),
    (
        "to nobody@ (no such list: left untouched)",
        build_message(to="nobody@example.org", subject="Perdu ?"),
        ["nobody@example.org"],
    ),
]


def run_forwarder(env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "forwarder", "once"]
    print("\n$ forwarder once   (log lines below are the forwarder's own JSON logs)")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    for line in result.stdout.splitlines():
        event = json.loads(line)
        if event["event"].startswith(("message_", "cycle_")):
            keep = {
                k: event[k]
                for k in (
                    "event",
                    "uid",
                    "lists",
                    "recipients",
                    "sent",
                    "reason",
                    "forwarded",
                    "delivered",
                    "skipped",
                )
                if k in event
            }
            print("  " + json.dumps(keep))
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        raise SystemExit(f"forwarder once exited with status {result.returncode}")


def main() -> None:
    with MailServer() as mail, SmtpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        print("Lists:")
        for address, members in LISTS.items():
            print(f"  {address} -> {', '.join(members)}")
        print("\nDelivering sample messages into the catch-all by LMTP:")
        for label, raw, rcpts in SAMPLES:
            mail.deliver(raw, rcpts)
            print(f"  - {label}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
        env.update(server_env(mail, sink, Path(tmp) / "state.db", LISTS, "lists-admin@example.org"))
        run_forwarder(env)
        print("\nWho received what (from the SMTP sink):")
        copies: Counter[str] = Counter()
        for received in sink.received:
            subject = next(
                (
                    line
                    for line in received.data.decode(errors="replace").splitlines()
                    if line.startswith("Subject:")
                ),
                "Subject: ?",
            )
            for rcpt in received.rcpt_tos:
                copies[rcpt] += 1
            print(f"  {subject[9:]:<22} -> {', '.join(sorted(received.rcpt_tos))}")
        print("  copies per member: " + ", ".join(f"{m} {n}" for m, n in sorted(copies.items())))
        before = len(sink.received)
        run_forwarder(env)
        print(
            f"\nSecond run: {len(sink.received) - before} new transactions "
            "(every member already has every message)."
        )
        print("\nCatch-all flags afterwards:")
        for uid, flags, raw in mail.messages():
            subject = next(
                (
                    line
                    for line in raw.decode(errors="replace").splitlines()
                    if line.startswith("Subject:")
                ),
                "",
            )
            shown = " ".join(sorted(f.decode() for f in flags)) or "(none: left unread)"
            print(f"  uid {uid:<3} {subject[9:]:<22} {shown}")


if __name__ == "__main__":
    if "--ops" in sys.argv[1:]:  # the operator commands: dry run, baseline, retry, history
        from tests.demo_ops import main as ops

        ops()
    else:
        main()
