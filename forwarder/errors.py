"""The exceptions of the forwarder.

One base class, `ForwarderError`. Each subclass also inherits the builtin it
resembles, so callers that only know the builtin still catch it (as aiosmtplib
does). An error carries fields rather than a finished sentence: the server it
concerns, what happened (`detail`), the reply `code` if any, the settings to
check and a short piece of `advice`. `str()` composes the one line a person
reads ("SMTP server mx:587: connection refused; check FORWARDER_SMTP_HOST and
FORWARDER_SMTP_PORT"), which is what the CLI prints and the logs carry.
Configuration errors are distinct from runtime errors: they map to different
exit statuses. No field ever holds a secret.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3


class ForwarderError(Exception):
    """Base of every error the forwarder raises on purpose."""

    exit_status = EXIT_RUNTIME

    def __init__(
        self,
        detail: str = "",
        *,
        server: str | None = None,
        code: int | None = None,
        settings: Sequence[str] = (),
        advice: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.server = server
        self.code = code
        self.settings = tuple(settings)
        self.advice = advice

    def __str__(self) -> str:
        text = self.detail or type(self).__name__
        if self.server:
            text = f"{self.server}: {text}"
        tail = []
        if self.advice:
            tail.append(self.advice)
        if self.settings:
            tail.append("check " + " and ".join(self.settings))
        return "; ".join([text, *tail])

    def __reduce__(self) -> tuple[object, ...]:  # picklable with its fields
        return (_rebuild, (type(self), self.detail, self.__dict__))


def _rebuild(cls: type[ForwarderError], detail: str, fields: dict[str, object]) -> ForwarderError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, detail)
    exc.__dict__.update(fields)
    return exc


class ConfigError(ForwarderError, ValueError):
    """The configuration is invalid: nothing was contacted."""

    exit_status = EXIT_CONFIG


class ServerError(ForwarderError, ConnectionError):
    """A mail server could not be reached, dropped us, or misbehaved."""


class ImapError(ServerError):
    """The IMAP server could not be reached or refused a command."""


class SmtpError(ServerError):
    """The SMTP server could not be reached or refused the session."""


class SubmissionRefused(SmtpError):
    """The SMTP server refuses the forwarder itself, not a member: its envelope sender, its
    login or its permission to relay, for every recipient of a transaction.

    Nothing is recorded for those members: they stay due and get the message once the
    configuration (ours or the server's) is fixed. `settings` names what to check.
    """


class AuthError(ServerError, PermissionError):
    """A server refused the login: waiting will not fix it."""

    exit_status = EXIT_AUTH


class ImapAuthError(AuthError, ImapError):
    """The IMAP server refused the catch-all login."""


class ImapBusyError(ImapError):
    """The IMAP server refused the session for now (a connection limit, a subsystem down,
    a BYE): not the credentials. Retried with back-off, never fatal."""


class UnreadableMessage(ImapError):
    """The IMAP server could not give one message (an unreadable mail file): the others go on."""


class SmtpAuthError(AuthError, SmtpError):
    """The SMTP server refused the submission login."""


class StateError(ForwarderError, OSError):
    """The state store cannot be read or written (disk full, permissions)."""


class StoreBusy(StateError):
    """Another forwarder process holds the state store (the SQLite file's lock)."""
