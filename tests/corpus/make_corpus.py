"""Writes the hostile-input corpus: malformed and hostile messages, one ``.eml`` file each.

Run ``python -m tests.corpus.make_corpus`` from the repository root to
(re)write the files next to this script; ``tests/test_corpus.py`` checks that
the committed files are exactly what this script produces, then delivers them
all to the catch-all. Every message was written for this project; none is
real mail. Dates and identifiers are fixed, so the output is reproducible.

File names start with a number: they are delivered in that order, and the
last one is an ordinary message that must get through whatever came before.
Some contents are built from bytes (NUL, bare CR, Latin-1, invalid UTF-8) that
cannot be written in a text file; see README.md for what Dovecot does with them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
CRLF = b"\r\n"
DATE = b"Date: Tue, 24 Nov 2026 10:00:00 +0000"
FROM = b"From: Customer <customer@remote.example>"
TO = b"To: contact@example.org"
# Messages named here share one Message-ID with different content.
SHARED_ID = "<shared-id-0001@remote.example>"
SENTINEL = "99-ordinary-message-last.eml"


def message(
    name: str,
    *,
    headers: list[bytes] | None = None,
    body: bytes = b"Hello list,\r\nplease call me back.\r\n",
    msgid: bytes | None = None,
    to: bytes = TO,
    eol: bytes = CRLF,
) -> bytes:
    """An ordinary message with the given extra header lines and body."""
    default_id = b"Message-ID: <corpus-" + name.encode() + b"@remote.example>"
    ident = msgid if msgid is not None else default_id
    lines = [FROM, to, b"Subject: corpus " + name.encode(), DATE, ident, *(headers or [])]
    return eol.join(lines) + eol + eol + body


def _nested_multipart(depth: int) -> bytes:
    head = [FROM, TO, b"Subject: corpus nested multipart", DATE]
    head += [b"Message-ID: <corpus-nested@remote.example>", b"MIME-Version: 1.0"]
    head.append(b'Content-Type: multipart/mixed; boundary="b0"')
    out = CRLF.join(head) + CRLF + CRLF
    for level in range(1, depth):
        out += b'--b%d\r\nContent-Type: multipart/mixed; boundary="b%d"\r\n\r\n' % (
            level - 1,
            level,
        )
    out += b"--b%d\r\nContent-Type: text/plain\r\n\r\ninnermost part\r\n" % (depth - 1)
    for level in range(depth - 1, -1, -1):
        out += b"--b%d--\r\n" % level
    return out


def _corpus() -> dict[str, bytes]:
    files: dict[str, Callable[[], bytes]] = {
        # -- structure
        "01-no-headers-at-all.eml": lambda: b"No header at all, only a body.\r\nSecond line.\r\n",
        "02-header-without-colon.eml": lambda: message(
            "02", headers=[b"This header line has no colon at all"]
        ),
        "03-only-headers-no-body.eml": lambda: (
            CRLF.join([FROM, TO, b"Subject: corpus 03 only headers", DATE]) + CRLF
        ),
        "04-only-headers-no-final-newline.eml": lambda: CRLF.join(
            [FROM, TO, b"Subject: corpus 04 headers, no final newline", DATE]
        ),
        "05-empty-body.eml": lambda: message("05", body=b""),
        "06-empty-message.eml": lambda: b"",
        "07-leading-whitespace-on-first-line.eml": lambda: b" \t" + message("07"),
        "08-whitespace-only-line-in-headers.eml": lambda: message(
            "08", headers=[b"X-Before: 1", b" \t ", b"X-After: 2"]
        ),
        "09-header-name-with-space-and-controls.eml": lambda: message(
            "09", headers=[b"Bad Header Name: value", b"X-Ctrl\x01\x7f: value", b": no name"]
        ),
        "10-very-long-header-name.eml": lambda: message(
            "10", headers=[b"X-" + b"N" * 2000 + b": v"]
        ),
        "11-two-thousand-header-lines.eml": lambda: message(
            "11", headers=[b"X-Filler-%04d: some value" % i for i in range(2000)]
        ),
        "12-subject-folded-1000-times.eml": lambda: message(
            "12", headers=[b"X-Folded: start" + b"".join(b"\r\n\tfold %d" % i for i in range(1000))]
        ),
        # -- encodings
        "13-bad-base64.eml": lambda: message(
            "13",
            headers=[b"MIME-Version: 1.0", b"Content-Transfer-Encoding: base64"],
            body=b"!!!! this is *not* base64 ####\r\n====\r\nQUJD=RA==\r\n",
        ),
        "14-bad-quoted-printable.eml": lambda: message(
            "14",
            headers=[b"MIME-Version: 1.0", b"Content-Transfer-Encoding: quoted-printable"],
            body=b"=ZZ=G1 soft break at end =\r\n=\r\n=4\r\n=e9t=C3=\r\n",
        ),
        "15-unknown-charset.eml": lambda: message(
            "15",
            headers=[b"MIME-Version: 1.0", b'Content-Type: text/plain; charset="x-martian-7"'],
            body=b"\xf0\x9f\x91\xbd \xa4\xb5\xc6 unknown charset\r\n",
        ),
        "16-latin1-8bit-headers.eml": lambda: message(
            "16",
            headers=[b"X-Name: Zo\xe9 M\xfcller", b"Comments: r\xe9union \xe0 14h"],
            body=b"Corps en Latin-1: \xe9t\xe9\r\n",
        ),
        "17-invalid-utf8-headers.eml": lambda: message(
            "17", headers=[b"X-Broken: \xc3\x28 \xff\xfe \xe2\x82 \xf0\x28\x8c\x28"]
        ),
        "18-invalid-utf8-body.eml": lambda: message(
            "18",
            headers=[b"MIME-Version: 1.0", b"Content-Type: text/plain; charset=utf-8"],
            body=b"valid \xc3\xa9 then invalid \xc3\x28 \xa0\xa1 \xff\r\n",
        ),
        "19-garbage-encoded-words.eml": lambda: message(
            "19",
            headers=[
                b"X-Words: =?utf-8?b?!!!not-base64?= =?utf-8?q?=ZZ?= =?unknown?x?abc?=",
                b"X-Unterminated: =?utf-8?q?never closed",
                b"Reply-To: =?utf-8?b?=?= <reply@remote.example>",
            ],
        ),
        "20-raw-utf8-addresses.eml": lambda: message(
            "20",
            headers=["Reply-To: Zoé <zoé@exämple.example>".encode()],
            body=b"Adresse en UTF-8 brut.\r\n",
        ),
        "21-binary-body-every-byte.eml": lambda: message(
            "21",
            headers=[b"MIME-Version: 1.0", b"Content-Transfer-Encoding: binary"],
            body=CRLF.join(
                bytes(b for b in range(start, start + 64) if b not in (10, 13))
                for start in range(0, 256, 64)
            )
            + CRLF,
        ),
        "22-nul-bytes.eml": lambda: message(
            "22", headers=[b"X-Nul: before\x00after"], body=b"body with a NUL \x00 byte\r\n\x00\r\n"
        ),
        # -- sizes
        "23-100k-header-line.eml": lambda: message("23", headers=[b"X-Long: " + b"a" * 100_000]),
        "24-to-10000-addresses.eml": lambda: message(
            "24", to=b"To: " + b", ".join(b"u%d@remote.example" % i for i in range(10_000))
        ),
        "25-100k-line-without-crlf.eml": lambda: message("25", body=b"x" * 100_000),
        "26-nested-multipart-50-deep.eml": lambda: _nested_multipart(50),
        # -- line endings and SMTP framing
        "27-lf-only-line-endings.eml": lambda: message("27", eol=b"\n", body=b"one\ntwo\n"),
        "28-mixed-line-endings.eml": lambda: (
            FROM + b"\n" + TO + CRLF + b"Subject: corpus 28 mixed\r\n" + DATE + b"\n"
            b"Message-ID: <corpus-28@remote.example>\r\n\nCRLF line\r\nLF line\nCR line\rend\r\n"
        ),
        "29-dot-alone-on-a-line.eml": lambda: message("29", body=b"before\r\n.\r\nafter\r\n"),
        "30-lines-starting-with-dots.eml": lambda: message(
            "30", body=b"..two dots\r\n...three\r\n.one\r\n..\r\n"
        ),
        "31-trailing-whitespace.eml": lambda: message(
            "31",
            headers=[b"X-Trailing: value \t ", b"Keywords: a, b,   "],
            body=b"body  \t\r\n \r\n",
        ),
        "32-smuggling-crlf-dot-crlf.eml": lambda: message(
            "32",
            body=b"text\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\n"
            b"RCPT TO:<evil@attacker.example>\r\nDATA\r\nSubject: smuggled\r\n\r\n"
            b"smuggled\r\n.\r\n",
        ),
        "33-smuggling-bare-lf-dot.eml": lambda: message(
            "33",
            body=b"text\n.\nMAIL FROM:<evil@attacker.example>\nRCPT TO:<evil@attacker.example>\n"
            b"DATA\n\nsmuggled\n.\n",
        ),
        "34-smuggling-bare-cr-dot.eml": lambda: message(
            "34",
            body=b"text\r.\rMAIL FROM:<evil@attacker.example>\rRCPT TO:<evil@attacker.example>\r"
            b"DATA\r\rsmuggled\r.\r\n",
        ),
        "35-bare-cr-in-a-header.eml": lambda: message(
            "35", headers=[b"X-Note: hello\rX-Smuggled: this was inside X-Note"]
        ),
        "36-mbox-from-line-on-top.eml": lambda: (
            b"From customer@remote.example Tue Nov 24 10:00:00 2026\r\n" + message("36")
        ),
        # -- injection attempts in addresses
        "37-crlf-injection-in-to.eml": lambda: message(
            "37", to=b"To: contact@example.org\r\nRCPT TO:<evil@attacker.example>"
        ),
        "38-crlf-injection-folded-in-to.eml": lambda: message(
            "38", to=b"To: contact@example.org\r\n RCPT TO:<evil@attacker.example>"
        ),
        "39-bare-lf-injection-in-to.eml": lambda: message(
            "39", to=b"To: contact@example.org\nRCPT TO:<evil@attacker.example>\nX-Injected: yes"
        ),
        "40-encoded-words-hiding-crlf.eml": lambda: message(
            "40",
            to=b"To: =?utf-8?q?contact@example.org=0D=0ARCPT_TO:<evil@attacker.example>?="
            b" <contact@example.org>",
            headers=[
                # base64 of "contact@example.org\r\nBcc: evil@attacker.example"
                b"Cc: =?utf-8?b?Y29udGFjdEBleGFtcGxlLm9yZw0KQmNjOiBldmlsQGF0dGFja2VyLmV4YW1wbGU=?=",
                b"Reply-To: =?utf-8?q?evil=0D=0A=2E=0D=0AMAIL_FROM:<evil@attacker.example>?="
                b" <reply@remote.example>",
            ],
        ),
        "41-quoted-and-commented-addresses.eml": lambda: message(
            "41",
            headers=[
                b'Cc: "evil@attacker.example" <x@remote.example> (evil@attacker.example),'
                b' "a\\"b"@remote.example, <@route.example:y@remote.example>, group: z@r.example;'
            ],
        ),
        # -- Message-ID
        "42-duplicate-message-id-a.eml": lambda: message(
            "42",
            msgid=b"Message-ID: " + SHARED_ID.encode(),
            body=b"First message with this id.\r\n",
        ),
        "43-duplicate-message-id-b.eml": lambda: message(
            "43", msgid=b"Message-ID: " + SHARED_ID.encode(), body=b"Another message, same id.\r\n"
        ),
        "44-message-id-missing.eml": lambda: (
            CRLF.join([FROM, TO, b"Subject: corpus 44 no Message-ID", DATE])
            + CRLF * 2
            + b"body\r\n"
        ),
        "45-message-id-empty.eml": lambda: message("45", msgid=b"Message-ID:"),
        "46-message-id-empty-brackets.eml": lambda: message("46", msgid=b"Message-ID: <>"),
        "47-message-id-garbage.eml": lambda: message(
            "47", msgid=b"Message-ID: <<<@@ not an id \x01 >> > <a> <b>"
        ),
        "48-message-id-twice.eml": lambda: message(
            "48",
            msgid=b"Message-ID: <corpus-48-one@remote.example>\r\n"
            b"Message-ID: <corpus-48-two@remote.example>",
        ),
        # -- loops, bounces, automatic mail
        "49-x-loop-for-a-foreign-list.eml": lambda: message(
            "49", headers=[b"X-Loop: other-list@elsewhere.example", b"List-Id: <other.elsewhere>"]
        ),
        "50-fifty-received-headers.eml": lambda: message(
            "50",
            headers=[
                b"Received: from hop%d.example by hop%d.example; Tue, 24 Nov 2026 10:00:00 +0000"
                % (i, i + 1)
                for i in range(49)  # Dovecot's LMTP adds the 50th: the limit, not over it
            ],
        ),
        "51-return-path-null.eml": lambda: (
            b"Return-Path: <>\r\n"
            + message(
                "51", headers=[b"Content-Type: multipart/report; report-type=delivery-status"]
            )
        ),
        "52-auto-submitted.eml": lambda: message(
            "52",
            headers=[b"Auto-Submitted: auto-replied", b"Precedence: bulk", b"X-Autoreply: yes"],
        ),
        SENTINEL: lambda: message("99", body=b"An ordinary message, delivered last.\r\n"),
    }
    return {name: make() for name, make in files.items()}


CORPUS: dict[str, bytes] = _corpus()


def write(directory: Path = HERE) -> list[Path]:
    """Write every corpus file into ``directory``; remove stale ``.eml`` files there."""
    for stale in directory.glob("*.eml"):
        if stale.name not in CORPUS:
            stale.unlink()
    paths = []
    for name, raw in CORPUS.items():
        path = directory / name
        path.write_bytes(raw)
        paths.append(path)
    return paths


if __name__ == "__main__":
    written = write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
    print(f"{len(written)} files written to {written[0].parent}")
