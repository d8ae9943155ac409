"""Where each setting comes from: the environment, a `.env` file, systemd credentials.

`read_sources()` returns every `FORWARDER_*` value that is set, by field name, each
with its source, in order of precedence (a credential file over the environment, the
environment over `.env`). It refuses what must never reach the validation: a
`FORWARDER_*` name that is no setting (in the environment or in `.env`, a misspelt
optional setting would otherwise be ignored), a value holding CR, LF or NUL, and an
unreadable file. Passwords are wrapped in `SecretStr` as soon as they are read.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import SecretStr

from forwarder.errors import ConfigError
from forwarder.setting_values import check_protocol_text

PREFIX = "FORWARDER_"
SECRET_FIELDS = frozenset({"imap_password", "smtp_password", "state_url", "state_password"})
MULTILINE_FIELDS = frozenset({"lists"})  # JSON may span lines; its addresses are checked
CREDENTIAL_FILES = {
    "imap_password": "imap_password",
    "smtp_password": "smtp_password",
    "state_password": "state_password",
}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value was read: `kind` is one of default, .env, environment, credential file,
    mailboxes file, argument; `detail` a path or a key."""

    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}" if self.detail else self.kind


DEFAULT = Source("default")
ENVIRONMENT = Source("environment")
ARGUMENT = Source("argument")


@dataclass(frozen=True, slots=True)
class Raw:
    """A value as given (a string, or a Python value passed as an argument), and its source."""

    value: Any
    source: Source


def read_sources(
    known: Collection[str],
    environ: Mapping[str, str],
    env_file: Path | None,
    overrides: Mapping[str, Any],
) -> dict[str, Raw]:
    """Every setting that is set, by field name: `.env` < environment < credentials <
    `overrides` (tests). Raises ConfigError (one line, no secret)."""
    values: dict[str, Raw] = {}
    if env_file is not None:
        source = Source(".env", str(env_file.absolute()))
        for name, value in _read_env_file(env_file).items():
            field = _field(name, known, f" (in {env_file})")
            if field is not None and value is not None:
                values[field] = Raw(value, source)
    for name, value in environ.items():
        field = _field(name, known, "")
        if field is not None:
            values[field] = Raw(value, ENVIRONMENT)
    values.update(read_credentials(environ))
    for field, value in overrides.items():
        if field not in known:
            raise TypeError(f"{field!r} is not a setting")
        values[field] = Raw(value, ARGUMENT)
    for field, raw in values.items():
        if field in SECRET_FIELDS and isinstance(raw.value, str):
            values[field] = raw = Raw(SecretStr(raw.value), raw.source)
        check_raw(field, raw, env_name(field))
    return values


def check_raw(field: str, raw: Raw, name: str) -> None:
    """Refuse CR, LF and NUL in any value but the lists' text; the error starts with `name`."""
    if field in MULTILINE_FIELDS:
        return
    value = raw.value
    if isinstance(value, SecretStr):
        text, secret = value.get_secret_value(), True
    else:
        text, secret = (str(value) if isinstance(value, str | Path) else ""), False
    try:
        check_protocol_text(text, secret=secret)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def read_credentials(environ: Mapping[str, str]) -> dict[str, Raw]:
    """Passwords from systemd's LoadCredential= ($CREDENTIALS_DIRECTORY), when set."""
    directory = environ.get("CREDENTIALS_DIRECTORY")
    found: dict[str, Raw] = {}
    if not directory:
        return found
    for field, filename in CREDENTIAL_FILES.items():
        path = Path(directory) / filename
        try:
            path.stat()
        except FileNotFoundError:
            continue  # no such credential: the variable, if any, is used
        except OSError:
            pass  # read_secret_file says why
        text = read_secret_file(path, env_name(field), "credential file")
        found[field] = Raw(text, Source("credential file", str(path)))
    return found


def read_secret_file(path: Path, label: str, what: str) -> SecretStr:
    """A password alone in a file (a trailing newline ignored); ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"{label}: cannot read the {what} {path} ({_reason(exc)})",
            advice="it must be a file readable by the user the forwarder runs as",
        ) from None
    return SecretStr(text.rstrip("\r\n"))


def read_text_file(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{label}: cannot read {path} ({_reason(exc)})") from None


def _read_env_file(path: Path) -> dict[str, str | None]:
    if not path.is_file():
        return {}
    try:
        return dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({_reason(exc)})", advice="or remove it") from None


def _field(name: str, known: Collection[str], where: str) -> str | None:
    """The field a variable sets, None if it is no FORWARDER_* variable; ConfigError for a
    FORWARDER_* name that is no setting."""
    upper = name.upper()
    if not upper.startswith(PREFIX):
        return None
    field = upper[len(PREFIX) :].lower()
    if field not in known:
        names = [env_name(k) for k in known]
        close = difflib.get_close_matches(upper, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{name}{where} is not a forwarder setting{hint}")
    return field


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return getattr(exc, "strerror", None) or str(exc)
