"""Test messages written as raw bytes (never built with the email package)."""

from __future__ import annotations

import itertools

_counter = itertools.count(1)


def build_message(
    *,
    to: str = "contact@example.org",
    cc: str | None = None,
    sender: str = "customer@remote.example",
    subject: str = "Hello",
    body: bytes = b"Hello list,\r\nplease call me back.\r\n",
    message_id: str | None = "auto",
    extra: list[str] | None = None,
) -> bytes:
    n = next(_counter)
    lines = [f"From: Customer <{sender}>", f"To: {to}"]
    if cc:
        lines.append(f"Cc: {cc}")
    lines += [f"Subject: {subject} #{n}", "Date: Tue, 24 Nov 2026 10:00:00 +0000"]
    if message_id == "auto":
        lines.append(f"Message-ID: <test-{n}@remote.example>")
    elif message_id is not None:
        lines.append(f"Message-ID: {message_id}")
    lines += extra or []
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
