"""What the relay asks of the server's ESMTP extensions, and the name it gives in EHLO. Pure.

MAIL FROM parameters:

- `SIZE=<bytes>` when the server offers SIZE (RFC 1870).
- `BODY=8BITMIME` when the message has a byte above 127 and the server offers
  8BITMIME (RFC 6152). Such a message without 8BITMIME is not sent at all:
  `EIGHT_BIT_REFUSED` is recorded for its members (a permanent failure, logged
  as `delivery_failed`), since the bytes cannot go out unchanged and rewriting
  them (quoted-printable) would break the sender's DKIM signature.
- `SMTPUTF8` only when an envelope address (MAIL FROM or a RCPT TO) is not
  ASCII (RFC 6531). Raw UTF-8 in the header or body does not need it, and asking
  for it anyway makes a server like Postfix refuse to hand the copy to a next
  hop without SMTPUTF8 (Dovecot LMTP: "5.6.7 SMTPUTF8 is required"), a bounce
  that is itself lost.

Envelope addresses go out as `<address>` (RFC 5321 4.1.2), as configured: they were
validated when the settings were loaded, so the relay does not parse them again
(aiosmtplib's `mail()` and `rcpt()` call `email.utils.parseaddr` on each, about as
long as the rest of the command); `path()` only refuses what could break the
command line.

EHLO name (RFC 5321 4.1.1.1, 4.1.4): `FORWARDER_SMTP_HELO_NAME` when set, else
the machine's fully-qualified name, else (a machine whose only name is
`localhost` or a single label, which some submission servers refuse) the
address literal of the connection's own end, such as `[192.0.2.10]`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Container, Sequence

from forwarder.replies import Reply, ReplyCode

EIGHT_BIT_REFUSED = Reply(
    ReplyCode.TRANSACTION_FAILED,
    "5.6.3 not sent: the message has 8-bit bytes and the SMTP server offers no 8BITMIME "
    "(RFC 6152), so it cannot be sent unchanged",
)
NON_ASCII_REFUSED = Reply(
    ReplyCode.MAILBOX_NAME_NOT_ALLOWED,
    "5.6.7 not sent: the address is not ASCII and the SMTP server offers no SMTPUTF8 (RFC 6531)",
)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f<>]")


def mail_options(
    offered: Container[str],
    *,
    size: int | None,
    eight_bit: bool,
    utf8_envelope: bool,
) -> list[str]:
    """MAIL FROM parameters. `offered` holds the server's EHLO keywords, lower case;
    `size` is None for a probe without a message.

    The caller checks `eight_bit_refused()` first, and refuses a non-ASCII address
    itself when SMTPUTF8 is not among the options.
    """
    options: list[str] = []
    if size is not None and "size" in offered:
        options.append(f"SIZE={size}")
    if eight_bit and "8bitmime" in offered:
        options.append("BODY=8BITMIME")
    if utf8_envelope and "smtputf8" in offered:
        options.append("SMTPUTF8")
    return options


def path(address: str, utf8: bool) -> bytes:
    """`<address>` for MAIL FROM: or RCPT TO:, UTF-8 when the transaction has SMTPUTF8.

    Raises ValueError for an address that could smuggle something onto the command
    line (a space, a control character, an angle bracket) or that is not ASCII
    without SMTPUTF8.
    """
    address = address.strip()
    if not address or _UNSAFE.search(address):
        raise ValueError(f"{address!r} cannot be sent as an SMTP envelope address")
    if not utf8 and not address.isascii():
        raise ValueError(f"{address!r} is not ASCII and the transaction has no SMTPUTF8")
    return b"<" + address.encode() + b">"


def eight_bit_refused(offered: Container[str], eight_bit: bool) -> bool:
    """An 8-bit message to a server without 8BITMIME: it is not sent (see module docstring)."""
    return eight_bit and "8bitmime" not in offered


def utf8_envelope(mail_from: str, recipients: Sequence[str]) -> bool:
    return not mail_from.isascii() or not all(r.isascii() for r in recipients)


def size_limit(extensions: dict[str, str]) -> int:
    """The server's SIZE limit (RFC 1870), 0 when it gives none."""
    value = extensions.get("size", "")
    return int(value) if value.strip().isdigit() else 0


def check_helo_name(value: str) -> str:
    """A host name or an address literal, as EHLO takes (no space, no control character)."""
    name = value.strip()
    if len(name) > 255 or not (_HOST_NAME.fullmatch(name) or _is_address_literal(name)):
        raise ValueError(
            f"{name!r} is not a host name (mail.example.org) or an address literal ([192.0.2.1])"
        )
    return name


def ehlo_name(configured: str | None, fqdn: str, local_address: str | None) -> str:
    """The name given in EHLO: configured, else a real FQDN, else an address literal."""
    if configured:
        return configured
    if _is_fqdn(fqdn):
        return fqdn.rstrip(".")
    if local_address:
        return address_literal(local_address)
    return fqdn or "localhost"


def address_literal(address: str) -> str:
    """`[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 4.1.3)."""
    ip = ipaddress.ip_address(address.partition("%")[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


def _is_address_literal(name: str) -> bool:
    if not (name.startswith("[") and name.endswith("]")):
        return False
    inner = name[1:-1]
    version = 6 if inner.startswith("IPv6:") else 4
    try:
        return ipaddress.ip_address(inner.removeprefix("IPv6:")).version == version
    except ValueError:
        return False


def _is_fqdn(name: str) -> bool:
    name = name.rstrip(".").lower()
    return (
        "." in name
        and _HOST_NAME.fullmatch(name) is not None
        and not name.startswith("localhost")
        and not name.endswith(".localdomain")
    )
