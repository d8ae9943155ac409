"""Two forwarders on one mailbox, each with its own state file (a manual `forwarder once`
with another FORWARDER_STATE_DB than the service's): the second must not send what the
first did. It learns it from the keywords the first sets in the mailbox (one real
Dovecot): a folder seen for the first time is seeded from `$Forwarded`, and a new message
that already carries it is recorded `elsewhere`, logged `forwarded_elsewhere`, not sent.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from structlog.testing import capture_logs

from forwarder.config import Settings
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import UidState
from tests.conftest import LISTS, MakeSettings, forward_once
from tests.mail import build_message
from tests.servers import MailServer, SmtpSink

CONTACT = "contact@example.org"


def deliver(mailbox: MailServer, subject: str) -> None:
    mailbox.deliver(build_message(subject=subject), [CONTACT])


def copies(sink: SmtpSink) -> Counter[str]:
    return Counter(rcpt for r in sink.received for rcpt in r.rcpt_tos)


def two_forwarders(make_settings: MakeSettings, tmp_path: Path) -> tuple[Settings, Settings]:
    return (
        make_settings(state_db=tmp_path / "a.db"),
        make_settings(state_db=tmp_path / "b.db"),
    )


async def test_a_fresh_state_file_sends_nothing_another_forwarder_flagged(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings, tmp_path: Path
) -> None:
    a, b = two_forwarders(make_settings, tmp_path)
    await forward_once(a)
    for subject in ("one", "two", "three"):
        deliver(mailbox, subject)
    await forward_once(a)
    assert copies(smtp_sink) == Counter({m: 3 for m in LISTS[CONTACT]})

    await forward_once(b)  # its first cycle: the folder seeded from $Forwarded
    assert len(smtp_sink.received) == 3


async def test_new_mail_another_forwarder_flagged_is_logged_elsewhere_and_not_sent(
    mailbox: MailServer, smtp_sink: SmtpSink, make_settings: MakeSettings, tmp_path: Path
) -> None:
    a, b = two_forwarders(make_settings, tmp_path)
    await forward_once(a)
    await forward_once(b)  # both know the folder: the next message is new to both
    deliver(mailbox, "new")
    await forward_once(a)
    assert len(smtp_sink.received) == 1
    with capture_logs() as logs:
        await forward_once(b)
    assert len(smtp_sink.received) == 1  # not sent a second time
    [event] = [e for e in logs if e["event"] == "forwarded_elsewhere"]
    assert event["log_level"] == "error"
    assert "another forwarder" in event["reason"]
    [(uid, _, _)] = mailbox.messages()
    assert event["uids"] == [uid]
    assert recorded(b, uid) == UidState.ELSEWHERE

    with capture_logs() as logs:
        await forward_once(b)  # recorded: neither sent nor reported again
    assert len(smtp_sink.received) == 1
    assert "forwarded_elsewhere" not in [e["event"] for e in logs]


def recorded(settings: Settings, uid: int) -> UidState:
    store = SqliteStateStore(settings.state_db, readonly=True)
    try:
        folder = store.last_folder("default")
        assert folder is not None
        [record] = store.uid_records("default", folder.uidvalidity, uids=[uid])
    finally:
        store.close()
    return record.state
