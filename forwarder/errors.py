"""The exceptions of the forwarder.

One base class, `ForwarderError`. Each subclass also inherits the builtin it
resembles, so callers that only know the builtin still catch it (as aiosmtplib
does). Configuration errors are distinct from runtime errors: the CLI maps them
to different exit statuses. No message ever contains a secret.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3


class ForwarderError(Exception):
    """Base of every error the forwarder raises on purpose."""

    exit_status = EXIT_RUNTIME


class ConfigError(ForwarderError, ValueError):
    """The configuration is invalid: nothing was contacted."""

    exit_status = EXIT_CONFIG


class ServerError(ForwarderError, ConnectionError):
    """A mail server could not be reached, dropped us, or misbehaved."""


class ImapError(ServerError):
    """The IMAP server could not be reached or refused a command."""


class SmtpError(ServerError):
    """The SMTP server could not be reached or refused the session."""


class AuthError(ServerError, PermissionError):
    """A server refused the login: waiting will not fix it."""

    exit_status = EXIT_AUTH


class ImapAuthError(AuthError, ImapError):
    """The IMAP server refused the catch-all login."""


class SmtpAuthError(AuthError, SmtpError):
    """The SMTP server refused the submission login."""


class KeywordsNotSupported(ImapError):
    """The mailbox does not accept the `$Forwarded` keyword."""

    exit_status = EXIT_CONFIG


class StateError(ForwarderError, OSError):
    """The state store cannot be read or written (disk full, permissions)."""
