"""SMTP replies: named reply codes, and whom a refusal is about. Pure.

A refusal is either about one member (no such mailbox, mailbox full, that
recipient refused by policy) or about the forwarder itself: the envelope
sender it uses (`FORWARDER_ENVELOPE_SENDER`), its login, or its permission to
relay. Only the first kind may count against a member; the second is a
configuration slip that the administrator fixes, after which every member must
still get the message.

The classification reads the enhanced status code (RFC 3463, RFC 5248's
registry, RFC 2034 puts it at the start of the reply text) and, where the code
is the generic X.7.1 "delivery not authorized" or absent, the wording that real
servers use:

- **login**: reply code 530 (RFC 4954 "authentication required", also Postfix's
  "5.7.0 Must issue a STARTTLS command first"); X.7.8, X.7.9, X.7.11 to X.7.14
  (credentials, mechanism, encryption, password transition, account disabled,
  trust: RFC 4954, RFC 5248); X.7.57 (Microsoft 365 "client not
  authenticated"); wording "authentication required", "not authenticated",
  "must authenticate", "Client host rejected" (Postfix's
  smtpd_client_restrictions), "STARTTLS".
- **sender**: X.1.7 and X.1.8 (RFC 3463: bad sender's address, bad sender's
  system); X.7.27 (RFC 7505: the sender's domain has a null MX); X.7.60
  (Microsoft 365 SendAsDenied); wording "Sender address rejected" (Postfix:
  smtpd_sender_login_maps, unknown sender domain...), "not owned by user",
  "sender verify failed" (Exim), "sender ... not allowed / not authorized /
  denied / refused", "not allowed to send as".
- **relay**: X.7.54 and X.7.64 (Microsoft 365); wording "Relay access denied"
  (Postfix), "relay not permitted" (Exim), "Relaying denied" (Sendmail),
  "Unable to relay" (Exchange), "Mail relay denied" (Google).
- **member**: X.1.1 to X.1.6 and X.2.x (RFC 3463: the destination address or
  mailbox) whatever the wording, and everything else: "Recipient address
  rejected", a 5.7.1 spam or policy refusal of this message, 5.3.4 message too
  big...

"Recipient address rejected" (Postfix's wording for a recipient's own refusal)
is read first, so a reply naming the recipient is never taken for one about us.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, IntEnum


class ReplyCode(IntEnum):
    """SMTP reply codes the forwarder names (RFC 5321 4.2.3, RFC 4954, RFC 3207)."""

    READY = 220
    CLOSING = 221
    AUTH_SUCCESSFUL = 235
    OK = 250
    WILL_FORWARD = 251
    START_DATA = 354
    SERVICE_UNAVAILABLE = 421
    MAILBOX_BUSY = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    TLS_NOT_AVAILABLE = 454
    AUTH_REQUIRED = 530
    AUTH_FAILED = 535
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    MAILBOX_NAME_NOT_ALLOWED = 553
    TRANSACTION_FAILED = 554
    PARAMETERS_NOT_RECOGNIZED = 555


@dataclass(frozen=True)
class Reply:
    """The server's answer for one recipient: the RCPT reply if refused, else the DATA reply.

    `code` None stands for a reply that never came after the whole message was sent
    (`no_reply`): the server may have delivered it or not. It is retried like a 4xx.
    """

    code: int | None
    text: str

    @property
    def accepted(self) -> bool:
        return self.code is not None and 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return self.code is None or 400 <= self.code < 500

    @property
    def about(self) -> Concern:
        return Concern.MEMBER if self.code is None else concern(self.code, self.text)


def no_reply(detail: str) -> Reply:
    """The message was sent to the end (the final dot), then `detail` (the connection lost,
    no reply in time): the outcome is unknown. Counted as an attempt, with the back-off
    and the deadline of a 4xx, rather than sent again at once to a server that may
    have delivered it."""
    return Reply(None, f"outcome unknown: {detail} after the message was sent")


class Concern(Enum):
    """Whom a refusal is about."""

    MEMBER = "member"  # this recipient, or this message: counts for the member
    SENDER = "sender"  # the envelope sender the forwarder uses
    LOGIN = "login"  # the forwarder's login (or the TLS it must use before it)
    RELAY = "relay"  # the forwarder's permission to send to that domain at all

    @property
    def ours(self) -> bool:
        """A configuration slip of ours (or of the server's): never the member's fault."""
        return self is not Concern.MEMBER


_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

_BY_CODE: dict[tuple[int, int], Concern] = {
    (1, 7): Concern.SENDER,  # bad sender's mailbox address syntax
    (1, 8): Concern.SENDER,  # bad sender's system address
    (7, 8): Concern.LOGIN,  # authentication credentials invalid
    (7, 9): Concern.LOGIN,  # authentication mechanism is too weak
    (7, 11): Concern.LOGIN,  # encryption required for requested authentication mechanism
    (7, 12): Concern.LOGIN,  # a password transition is needed
    (7, 13): Concern.LOGIN,  # user account disabled
    (7, 14): Concern.LOGIN,  # trust relationship required
    (7, 27): Concern.SENDER,  # sender address has null MX
    (7, 54): Concern.RELAY,  # Microsoft 365: unable to relay recipient in non-accepted domain
    (7, 57): Concern.LOGIN,  # Microsoft 365: client not authenticated to send mail
    (7, 60): Concern.SENDER,  # Microsoft 365: client does not have permission to send as
    (7, 64): Concern.RELAY,  # Microsoft 365: TenantAttribution; relay access denied
}

_MEMBER_WORDING = re.compile(r"recipient address rejected", re.I)
_WORDING: list[tuple[re.Pattern[str], Concern]] = [
    (
        re.compile(
            r"sender address rejected|sender verify failed|not owned by user"
            r"|(permission|allowed|authori[sz]ed|rights?)\s+to\s+send\s+as|send\s*as\s*denied"
            r"|\bsender\b[^.;]*\b(not allowed|not authori[sz]ed|not permitted|denied|refused)",
            re.I,
        ),
        Concern.SENDER,
    ),
    (
        re.compile(
            r"\brelay(ing)?\b[^.;]*\b(denied|not permitted|not allowed|disallowed|prohibited)"
            r"|\bunable to relay|\bnot permitted to relay",
            re.I,
        ),
        Concern.RELAY,
    ),
    (
        re.compile(
            r"authenticat\w*\s+(is\s+)?required|not\s+authenticated|must\s+(first\s+)?"
            r"authenticate|authentication\s+needed|client host rejected|\bstarttls\b",
            re.I,
        ),
        Concern.LOGIN,
    ),
]


def enhanced_status(text: str) -> tuple[int, int, int] | None:
    """The RFC 3463 status code at the start of a reply's text (RFC 2034), if any."""
    match = _ENHANCED.match(text)
    if match is None:
        return None
    klass, subject, detail = (int(part) for part in match.groups())
    return klass, subject, detail


def concern(code: int, text: str) -> Concern:
    """Whom a refusal (4xx or 5xx) is about; MEMBER for anything not clearly ours."""
    if code == ReplyCode.AUTH_REQUIRED:
        return Concern.LOGIN
    status = enhanced_status(text)
    if status is not None:
        _, subject, detail = status
        if subject == 2 or (subject == 1 and 1 <= detail <= 6):
            return Concern.MEMBER  # RFC 3463: the destination mailbox or its address
        if (found := _BY_CODE.get((subject, detail))) is not None:
            return found
    if _MEMBER_WORDING.search(text):
        return Concern.MEMBER
    for pattern, about in _WORDING:
        if pattern.search(text):
            return about
    return Concern.MEMBER


def about_the_message(reply: Reply) -> bool:
    """A MAIL FROM refusal that concerns this message's size or content, not its sender:
    552, X.2.3 (message length exceeds a limit), X.3.4 (too big), X.6.x (content)."""
    status = enhanced_status(reply.text)
    if reply.code == ReplyCode.EXCEEDED_STORAGE:
        return True
    return status is not None and (status[1:] in ((2, 3), (3, 4)) or status[1] == 6)
