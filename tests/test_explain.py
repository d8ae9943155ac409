"""`forwarder explain FILE.eml`: one message routed against the lists, no server contacted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN, LISTS
from tests.mail import build_message
from tests.servers import free_port


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A configuration whose servers do not exist: explain must not need them."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FORWARDER_")}
    return base | {
        "FORWARDER_IMAP_HOST": "127.0.0.1",
        "FORWARDER_IMAP_PORT": str(free_port()),
        "FORWARDER_IMAP_USERNAME": "catchall@example.org",
        "FORWARDER_IMAP_PASSWORD": "secret",
        "FORWARDER_SMTP_HOST": "127.0.0.1",
        "FORWARDER_SMTP_PORT": str(free_port()),
        "FORWARDER_LISTS": json.dumps(LISTS),
        "FORWARDER_ENVELOPE_SENDER": ADMIN,
        "FORWARDER_STATE_DB": str(tmp_path / "state.db"),
        "FORWARDER_LOG_FORMAT": "json",
    }


def explain(
    env: dict[str, str], *args: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", "explain", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )


def test_explain_names_the_list_the_members_and_who_is_left_out(
    env: dict[str, str], tmp_path: Path
) -> None:
    eml = tmp_path / "message.eml"
    eml.write_bytes(
        build_message(
            to="someone@partner.example",
            cc="bob@example.org",
            extra=["Delivered-To: Contact+Urgent@Example.org"],
        )
    )
    result = explain(env, str(eml))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0] == str(eml)
    assert lines[2:5] == [
        "  lists: contact@example.org (matched by delivered-to)",
        "  send  alice@example.org",
        "  skip  bob@example.org  named in To/Cc: received the original directly",
    ]
    assert not Path(env["FORWARDER_STATE_DB"]).exists()


def test_explain_says_why_a_message_names_no_list(env: dict[str, str]) -> None:
    raw = build_message(to="nobody@example.org", extra=["X-Original-To: info@example.org"])
    result = explain(env, "-", stdin=raw)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "  not forwarded: it names no configured list" in out
    assert "    X-Original-To: info@example.org" in out
    assert "    To/Cc: nobody@example.org" in out


def test_explain_recognises_a_loop(env: dict[str, str]) -> None:
    raw = build_message(extra=["X-Loop: contact@example.org"])
    result = explain(env, "-", stdin=raw)
    assert "not forwarded: it carries an X-Loop: header naming a list" in result.stdout.decode()


def test_explain_json_is_one_object_per_mailbox(env: dict[str, str]) -> None:
    raw = build_message(sender="alice@example.org", to="contact@example.org")
    result = explain(env, "--json", "-", stdin=raw)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)["default"]
    assert plan["action"] == "forward" and plan["matched_by"] == "to/cc"
    assert [(m["address"], m["reason"]) for m in plan["members"]] == [
        ("bob@example.org", "new"),
        ("alice@example.org", "sender"),
    ]


def test_explain_of_a_missing_file_is_one_line(env: dict[str, str], tmp_path: Path) -> None:
    result = explain(env, str(tmp_path / "missing.eml"))
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"forwarder: cannot read {tmp_path / 'missing.eml'} (No such file or directory)"
    ]


def test_explain_says_a_message_would_be_quarantined(env: dict[str, str]) -> None:
    raw = b"From: a@remote.example\rX: y\r\nTo: contact@example.org\r\n\r\nbody\r\n"
    result = explain(env, "-", stdin=raw)
    assert result.returncode == 0, result.stderr
    assert "  quarantined, not sent: bare CR in the header block" in result.stdout.decode()
