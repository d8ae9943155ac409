"""The hostile-input corpus (tests/corpus/) through the real servers.

Every corpus file is delivered by LMTP to contact@example.org alone (one
recipient per transaction, so Dovecot adds ``Delivered-To``), in file name
order; then poll cycles run until one finds nothing to do. The run happens
once per module (``corpus_run``); each test checks one property of it.

"Byte-exact": the sink received our trace lines on top of the bytes IMAP
serves, and nothing else changed, with one exception SMTP itself imposes: a
bare CR cannot be sent in DATA (RFC 5321 2.3.8), so aiosmtplib sends it as
CRLF. For the few messages that IMAP serves with a bare CR (Dovecot keeps
them), the expected bytes are therefore that CRLF form; for every other
message, they are exactly the IMAP bytes. What Dovecot changes on delivery is
described in tests/corpus/README.md.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from structlog.testing import capture_logs

from forwarder.config import load_settings
from forwarder.reporting import CycleSummary
from tests.conftest import ADMIN, LISTS, forward_once
from tests.corpus.make_corpus import CORPUS, HERE, SENTINEL, SHARED_ID
from tests.servers import MailServer, Received, SmtpSink

FORWARDED = b"$Forwarded"
FORWARD_FAILED = b"$ForwardFailed"
QUARANTINE = b"$ForwarderQuarantine"
CONTACT = "contact@example.org"
CONTACT_MEMBERS = ["alice@example.org", "bob@example.org"]
ALL_MEMBERS = {member for members in LISTS.values() for member in members}
ADDED_LINE = re.compile(rb"(Received|X-Loop): [^\r\n]*\r\n")
BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
MAX_CYCLES = 5


@dataclass
class Stored:
    name: str
    uid: int
    flags: set[bytes]
    served: bytes  # what IMAP serves, after the cycles

    @property
    def wire(self) -> bytes:
        """The bytes SMTP can carry for it: every CR and LF as CRLF."""
        return BARE_CR_OR_LF.sub(b"\r\n", self.served)


@dataclass
class CorpusRun:
    refused: dict[str, str]  # corpus file -> why Dovecot's LMTP refused it
    stored: dict[str, Stored]  # corpus file -> the message in the catch-all
    received: list[Received]
    cycles: list[CycleSummary | BaseException] = field(default_factory=list)
    events: list[list[MutableMapping[str, Any]]] = field(default_factory=list)  # per cycle

    def all_events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for cycle in self.events for e in cycle if e["event"] == name]

    def sent(self) -> dict[bytes, list[tuple[list[bytes], Received]]]:
        """Transactions by the bytes under our added lines: rest -> [(added, transaction)]."""
        found: dict[bytes, list[tuple[list[bytes], Received]]] = {}
        for received in self.received:
            added, rest = split_added_lines(received.data)
            found.setdefault(rest, []).append((added, received))
        return found


def split_added_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Our Received/X-Loop lines on top of a forwarded message, and the rest.

    The rest starts with Dovecot's own ``Return-Path:``, so the split is unambiguous.
    """
    added: list[bytes] = []
    while match := ADDED_LINE.match(data):
        added.append(match.group())
        data = data[match.end() :]
    return added, data


@pytest.fixture(scope="module")
def corpus_run(
    mailserver: MailServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CorpusRun]:
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):  # module scope: before the autouse clean_environment
            if name.startswith("FORWARDER_"):
                env.delenv(name)
        if not mailserver.running:
            mailserver.start()
        mailserver.clear()
        refused: dict[str, str] = {}
        delivered: list[str] = []
        for name, raw in CORPUS.items():
            try:
                mailserver.deliver(raw, [CONTACT])
            except Exception as exc:
                refused[name] = repr(exc)
            else:
                delivered.append(name)
        uids = [uid for uid, _, _ in mailserver.messages()]
        assert len(uids) == len(delivered)  # one stored message per accepted delivery
        with SmtpSink(max_line_length=1024 * 1024) as sink:  # records any line, however long
            settings = load_settings(
                _env_file=None,
                imap_host=mailserver.host,
                imap_port=mailserver.imap_port,
                imap_security="none",
                imap_username=mailserver.username,
                imap_password=mailserver.password,
                smtp_host=sink.host,
                smtp_port=sink.port,
                smtp_security="none",
                lists=LISTS,
                envelope_sender=ADMIN,
                state_db=tmp_path_factory.mktemp("corpus") / "state.db",
            )
            run = CorpusRun(refused, {}, [])

            async def cycles() -> None:
                for _ in range(MAX_CYCLES):
                    with capture_logs() as events:
                        try:
                            summary = await forward_once(settings)
                        except Exception as exc:
                            run.cycles.append(exc)
                            continue
                        finally:
                            run.events.append(events)
                    run.cycles.append(summary)
                    if summary.messages == 0:
                        return

            # A loop of its own, in a thread of its own: independent of the tests' loops.
            with ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, cycles()).result(timeout=120)
            run.received = list(sink.received)
        by_uid = dict(zip(uids, delivered, strict=True))
        for uid, flags, served in mailserver.messages():
            run.stored[by_uid[uid]] = Stored(by_uid[uid], uid, flags, served)
        yield run
        mailserver.clear()


def test_corpus_files_are_what_make_corpus_writes() -> None:
    on_disk = {path.name: path.read_bytes() for path in HERE.glob("*.eml")}
    assert sorted(on_disk) == sorted(CORPUS)
    assert [name for name in CORPUS if on_disk[name] != CORPUS[name]] == []
    assert len(CORPUS) >= 40


def test_dovecot_stores_every_corpus_message(corpus_run: CorpusRun) -> None:
    assert corpus_run.refused == {}
    assert sorted(corpus_run.stored) == sorted(CORPUS)


def test_the_cycles_end_idle_and_none_fails(corpus_run: CorpusRun) -> None:
    failures = [c for c in corpus_run.cycles if not isinstance(c, CycleSummary)]
    assert failures == []
    last = corpus_run.cycles[-1]
    assert isinstance(last, CycleSummary) and last.messages == 0


def test_every_message_is_forwarded_byte_exact_or_quarantined_with_a_reason(
    corpus_run: CorpusRun,
) -> None:
    sent = corpus_run.sent()
    quarantined = {e["uid"]: e for e in corpus_run.all_events("message_quarantined")}
    problems: list[str] = []
    explained = 0
    for name, stored in corpus_run.stored.items():
        copies = sent.get(stored.wire, [])
        if QUARANTINE in stored.flags:
            event = quarantined.get(stored.uid)
            if FORWARDED in stored.flags or copies:
                problems.append(f"{name}: quarantined, yet forwarded")
            if event is None or not str(event.get("reason") or "").strip():
                problems.append(f"{name}: quarantined without a logged reason: {event}")
            continue
        if FORWARDED not in stored.flags or FORWARD_FAILED in stored.flags:
            problems.append(f"{name}: neither forwarded nor quarantined: {stored.flags}")
        if stored.wire != stored.served and not BARE_CR_OR_LF.search(stored.served):
            problems.append(f"{name}: unexpected wire form")  # only bare CR may differ
        if len(copies) != 1:
            problems.append(f"{name}: {len(copies)} transactions carry its exact bytes")
            continue
        explained += 1
        added, received = copies[0]
        if sorted(received.rcpt_tos) != CONTACT_MEMBERS or received.mail_from != ADMIN:
            problems.append(f"{name}: envelope {received.mail_from} -> {received.rcpt_tos}")
        loop_line = b"X-Loop: " + CONTACT.encode() + b"\r\n"
        if not added or not added[0].startswith(b"Received: ") or loop_line not in added:
            problems.append(f"{name}: unexpected added lines {added}")
    if explained != len(corpus_run.received):
        problems.append(f"{len(corpus_run.received) - explained} transaction(s) match no message")
    assert problems == []


def test_messages_sharing_a_message_id_are_both_forwarded(corpus_run: CorpusRun) -> None:
    sharing = [s for s in corpus_run.stored.values() if SHARED_ID.encode() in s.served]
    assert len(sharing) == 2
    bodies = {stored.served.partition(b"\r\n\r\n")[2] for stored in sharing}
    assert len(bodies) == 2
    sent = corpus_run.sent()
    for stored in sharing:
        assert FORWARDED in stored.flags
        [(_, received)] = sent[stored.wire]
        assert sorted(received.rcpt_tos) == CONTACT_MEMBERS


def test_rcpt_to_addresses_are_only_configured_members(corpus_run: CorpusRun) -> None:
    recipients = {rcpt for received in corpus_run.received for rcpt in received.rcpt_tos}
    assert recipients  # the corpus did get through
    assert recipients <= ALL_MEMBERS


def test_a_bad_message_never_blocks_the_ones_after_it(corpus_run: CorpusRun) -> None:
    last = corpus_run.stored[SENTINEL]
    assert list(corpus_run.stored)[-1] == SENTINEL  # delivered after all the hostile ones
    first_cycle = corpus_run.events[0]
    assert [e["uid"] for e in first_cycle if e["event"] == "message_forwarded"].count(last.uid) == 1
    assert FORWARDED in last.flags


def test_a_bare_cr_in_a_header_never_becomes_a_header_line_of_its_own(
    corpus_run: CorpusRun,
) -> None:
    stored = corpus_run.stored["35-bare-cr-in-a-header.eml"]
    assert b"X-Note: hello\rX-Smuggled:" in stored.served  # one field, as IMAP serves it
    for received in corpus_run.received:
        assert b"\r\nX-Smuggled:" not in received.data


def test_corpus_readme_documents_every_file() -> None:
    readme = (HERE / "README.md").read_text()
    assert [name for name in CORPUS if name.removesuffix(".eml") not in readme] == []
