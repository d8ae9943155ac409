"""`forwarder status`: a state store written by SqliteStateStore, read back by a real process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import (
    ClaimRequest,
    CycleRecord,
    Delivery,
    MessageResult,
    Status,
    UidRecord,
    UidState,
)
from forwarder.status import FAILED_SHOWN, StatusReport, read_status
from tests.leaks import RAW_CONTROLS
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20+00:00
NEXT_TRY = 1_900_000_000.0  # 2030-03-17T17:46:40+00:00
CANARY = "canary-Pa55w0rd-7Q9"


def forwarder(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


BOX = "default"


def claim(
    store: SqliteStateStore,
    key: str,
    message_id: str | None,
    lists: Sequence[str],
    members: Sequence[str],
    now: float = T0,
) -> None:
    pairs = tuple((m, m) for m in members)
    store.claim(BOX, [ClaimRequest(key, message_id, None, tuple(lists), pairs)], "test", now, 60)


def record(
    store: SqliteStateStore,
    key: str,
    message_id: str | None,
    lists: Sequence[str],
    deliveries: Sequence[Delivery],
    now: float = T0,
) -> None:
    """One attempt: the members claimed, then the server's replies recorded."""
    claim(store, key, message_id, lists, [d.member for d in deliveries], now)
    result = MessageResult(key, message_id, tuple(lists), tuple(deliveries))
    store.record_results(BOX, [result], now)


def skip(store: SqliteStateStore, uid: int, reason: str) -> None:
    store.record_uids(BOX, 1, [UidRecord(uid, UidState.SKIPPED, reason=reason)], T0)


def read(path: Path, lists: tuple[str, ...] = ()) -> StatusReport:
    store = SqliteStateStore(path, readonly=True)
    try:
        return read_status(store, str(path), lists)
    finally:
        store.close()


def ok(member: str) -> Delivery:
    return Delivery(member, member, Status.DELIVERED, 250, "2.0.0 Ok: queued")


def build_state(path: Path) -> None:
    """Three messages, one member deferred twice, one failed, two cycles, a pending row."""
    store = SqliteStateStore(path)
    try:
        record(
            store,
            "key-a",
            "<a@example.net>",
            ["contact@example.org"],
            [ok("alice@example.org"), ok("bob@example.org")],
        )
        reply = "4.2.0 carol: mailbox busy,\ntry later"
        carol = "carol@example.org"
        record(
            store,
            "key-b",
            "<b@example.net>",
            ["contact@example.org", "compta@example.org"],
            [
                ok("alice@example.org"),
                ok("bob@example.org"),
                Delivery(carol, carol, Status.DEFERRED, 451, reply, T0 + 1),
            ],
        )
        record(  # a second attempt, deferred again
            store,
            "key-b",
            "<b@example.net>",
            ["contact@example.org", "compta@example.org"],
            [Delivery(carol, carol, Status.DEFERRED, 451, reply, NEXT_TRY)],
            now=T0 + 2,
        )
        record(
            store,
            "key-c",
            "<c@example.net>",
            ["compta@example.org"],
            [
                ok("bob@example.org"),
                Delivery(
                    "carol@example.org",
                    "carol@example.org",
                    Status.FAILED,
                    550,
                    "5.1.1 carol: mailbox unknown",
                ),
            ],
        )
        record(
            store,
            "key-d",
            None,
            ["direction@example.org"],
            [Delivery("dave@example.org", "dave@example.org", Status.DEFERRED, 421, "", NEXT_TRY)],
        )
        skip(store, 7, "loop")
        skip(store, 8, "loop")
        skip(store, 9, "no-list")
        # A delivery in flight when the daemon died: counted under its own status.
        claim(store, "key-e", "<e@example.net>", ["direction@example.org"], ["dave@example.org"])
        store.record_cycle(BOX, CycleRecord(T0 - 60, T0 - 59, "ok", 3, 3, 6, 1, 1, 0))
        store.record_cycle(
            BOX,
            CycleRecord(
                T0, T0 + 2.5, "error", 1, 0, 0, 0, 0, 0, "IMAP server 192.0.2.1:993: refused"
            ),
        )
    finally:
        store.close()


@pytest.fixture
def state_env(env_for_subprocess: dict[str, str], tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "status" / "state.db"
    path.parent.mkdir()
    build_state(path)
    env_for_subprocess["FORWARDER_STATE_DB"] = str(path)
    env_for_subprocess["FORWARDER_IMAP_PASSWORD"] = CANARY
    return env_for_subprocess


def test_status_prints_the_last_cycle_lists_deferred_and_failed(state_env: dict[str, str]) -> None:
    result = forwarder(state_env, "status")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert CANARY not in out
    lines = out.splitlines()
    assert lines[0] == f"state store: {state_env['FORWARDER_STATE_DB']}"
    assert lines[1] == (
        "last cycle: 2023-11-14T22:13:22+00:00 (error), started 2023-11-14T22:13:20+00:00"
    )
    assert lines[2] == (
        "  messages 1, forwarded 0, delivered 0, deferred 0, failed 0, skipped 0, quarantined 0"
    )
    assert lines[3] == "  error: IMAP server 192.0.2.1:993: refused"
    assert "deliveries: deferred 2, delivered 5, failed 1, pending 1" in lines
    at = lines.index("messages forwarded per list:")
    assert lines[at + 1 : at + 4] == [  # a message still deferred for one member: not yet
        "  compta@example.org: 1",
        "  contact@example.org: 1",
        "  direction@example.org: 0",
    ]
    assert "skipped: loop 2, no-list 1" in lines
    at = lines.index("deferred deliveries: 2")
    assert lines[at + 1] == (
        "  carol@example.org  <b@example.net>  attempts 2  next try 2030-03-17T17:46:40+00:00  "
        "last reply: 451 4.2.0 carol: mailbox busy, try later"
    )
    assert lines[at + 2] == (
        "  dave@example.org  (no Message-ID)  attempts 1  next try 2030-03-17T17:46:40+00:00  "
        "last reply: 421"
    )
    at = lines.index("failed deliveries: 1")
    failed = lines[at + 1]
    assert failed.startswith("  carol@example.org  <c@example.net>  20")
    assert failed.endswith("  550 5.1.1 carol: mailbox unknown")
    assert len(lines) == at + 2


def test_status_json_is_one_object_with_the_same_content(state_env: dict[str, str]) -> None:
    result = forwarder(state_env, "status", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    status = json.loads(result.stdout)
    assert status["state_db"] == state_env["FORWARDER_STATE_DB"]
    assert status["last_cycle"] == {
        "started": "2023-11-14T22:13:20+00:00",
        "finished": "2023-11-14T22:13:22+00:00",
        "outcome": "error",
        "messages": 1,
        "forwarded": 0,
        "delivered": 0,
        "deferred": 0,
        "failed": 0,
        "skipped": 0,
        "quarantined": 0,
        "error": "IMAP server 192.0.2.1:993: refused",
    }
    assert status["cycles"] == 2
    assert status["deliveries"] == {"deferred": 2, "delivered": 5, "failed": 1, "pending": 1}
    assert status["forwarded_per_list"] == {
        "compta@example.org": 1,
        "contact@example.org": 1,
        "direction@example.org": 0,
    }
    assert status["skipped"] == {"loop": 2, "no-list": 1}
    assert status["deferred"] == [
        {
            "member": "carol@example.org",
            "message_id": "<b@example.net>",
            "attempts": 2,
            "next_try": "2030-03-17T17:46:40+00:00",
            "code": 451,
            "reply": "4.2.0 carol: mailbox busy,\ntry later",
            "lists": ["contact@example.org", "compta@example.org"],
        },
        {
            "member": "dave@example.org",
            "message_id": None,
            "attempts": 1,
            "next_try": "2030-03-17T17:46:40+00:00",
            "code": 421,
            "reply": "",
            "lists": ["direction@example.org"],
        },
    ]
    [failed] = status["failed"]
    assert failed.pop("updated").endswith("+00:00")
    assert failed == {
        "member": "carol@example.org",
        "message_id": "<c@example.net>",
        "code": 550,
        "reply": "5.1.1 carol: mailbox unknown",
        "lists": ["compta@example.org"],
    }


def test_status_reads_next_to_a_writer_without_writing(state_env: dict[str, str]) -> None:
    """The daemon may be mid-transaction: status neither waits for it nor sees its rows."""
    path = Path(state_env["FORWARDER_STATE_DB"])
    before = path.read_bytes()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # what SqliteStateStore holds while it writes
        writer.execute(
            "INSERT INTO deliveries (mailbox, message_key, member, address, status, attempts, "
            "first_try, updated, lists) VALUES ('default', 'key-x', 'x@example.org', "
            "'x@example.org', 'delivered', 1, 0, 0, 'direction@example.org')"
        )
        result = forwarder(state_env, "status", "--json")
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["forwarded_per_list"]["direction@example.org"] == 0
    assert path.read_bytes() == before


def test_missing_state_file_is_one_line_naming_the_variable(
    state_env: dict[str, str], tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "state.db"
    state_env["FORWARDER_STATE_DB"] = str(missing)
    for args in (["status"], ["status", "--json"]):
        result = forwarder(state_env, *args)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert str(missing) in result.stderr and "FORWARDER_STATE_DB" in result.stderr
    assert not missing.exists() and not missing.parent.exists()


def test_a_file_that_is_not_a_state_store_is_a_clear_error(
    state_env: dict[str, str], tmp_path: Path
) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("not a database\n" * 100)
    state_env["FORWARDER_STATE_DB"] = str(other)
    result = forwarder(state_env, "status")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert str(other) in result.stderr and "FORWARDER_STATE_DB" in result.stderr
    assert other.read_text() == "not a database\n" * 100


def test_json_flag_belongs_to_reading_commands_only(state_env: dict[str, str]) -> None:
    result = forwarder(state_env, "check", "--json")
    assert result.returncode == 2
    assert "unrecognized arguments: --json" in result.stderr


def test_a_fresh_store_has_no_cycle_yet(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    SqliteStateStore(path).close()
    report = read(path, ("contact@example.org",))
    assert report.last_cycle is None
    assert report.cycles == 0
    assert report.deliveries == {}
    assert report.forwarded_per_list == {"contact@example.org": 0}
    assert report.deferred == [] and report.failed == []


def test_only_the_most_recent_failures_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    try:
        for n in range(FAILED_SHOWN + 5):
            failure = Delivery("carol@example.org", "carol@example.org", Status.FAILED, 550, "no")
            record(
                store,
                f"key-{n:03}",
                f"<{n:03}@example.net>",
                ["compta@example.org"],
                [failure],
                now=T0 + n,
            )
    finally:
        store.close()
    report = read(path)
    assert report.deliveries == {"failed": FAILED_SHOWN + 5}
    ids = [f.message_id for f in report.failed]
    assert len(ids) == FAILED_SHOWN
    assert ids[0] == f"<{FAILED_SHOWN + 4:03}@example.net>"  # the newest first
    assert "<000@example.net>" not in ids


def test_a_message_with_a_member_still_deferred_is_not_counted_as_forwarded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    try:
        carol = "carol@example.org"
        busy = Delivery(carol, carol, Status.DEFERRED, 451, "4.2.0 busy", NEXT_TRY)
        record(
            store, "key-a", "<a@example.net>", ["compta@example.org"], [ok("bob@example.org"), busy]
        )
        record(store, "key-b", "<b@example.net>", ["compta@example.org"], [ok("bob@example.org")])
    finally:
        store.close()
    report = read(path, ("compta@example.org",))
    assert report.forwarded_per_list == {"compta@example.org": 1}  # key-b only


def test_status_escapes_control_characters_from_messages_and_servers(
    mailbox: MailServer, smtp_sink: SmtpSink, env_for_subprocess: dict[str, str]
) -> None:
    evil = "<evil\x1b]0;pwned\x07\x1b[2J\x08\x7f\x9b31m\u202e@remote.example>"
    mailbox.deliver(build_message(message_id=evil), ["contact@example.org"])
    smtp_sink.rcpt_responses["bob@example.org"] = "451 4.3.0 busy\x1b[31m"
    assert forwarder(env_for_subprocess, "once").returncode == 0
    text = forwarder(env_for_subprocess, "status")
    as_json = forwarder(env_for_subprocess, "status", "--json")
    for output in (text.stdout, as_json.stdout):
        assert RAW_CONTROLS.findall(output) == []
    assert r"  evil\x1b]0;pwned\x07\x1b[2j\x08\x7f\x9b31m\u202e@remote.example  " in text.stdout
    assert r"busy\x1b[31m" in text.stdout
    (deferred,) = json.loads(as_json.stdout)["deferred"]
    assert deferred["message_id"] == evil.lower()[1:-1]


def test_a_state_url_without_psycopg_is_exit_2_in_one_line(
    state_env: dict[str, str], tmp_path: Path
) -> None:
    shim = tmp_path / "shim" / "psycopg"  # first on the path: psycopg as if not installed
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text('raise ImportError("No module named psycopg")\n')
    del state_env["FORWARDER_STATE_DB"]
    state_env["FORWARDER_STATE_URL"] = "postgresql://forwarder@127.0.0.1:1/forwarder"
    state_env["PYTHONPATH"] = str(shim.parent)
    result = forwarder(state_env, "status")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1
    assert "FORWARDER_STATE_URL" in result.stderr and "psycopg" in result.stderr
