"""Connections to the PostgreSQL state store: the URL and its password, TLS, a small pool,
and every failure turned into one StateError line that names the server, never the password.

The password comes from the URL, or FORWARDER_STATE_PASSWORD (the `state_password`
credential file under systemd), or libpq's own PGPASSWORD and ~/.pgpass. TLS is
verified by default (`sslmode=verify-full`, the system's CA certificates, or
FORWARDER_TLS_CA_FILE) unless the URL or PGSSLMODE says otherwise; a server on
loopback or a Unix socket is reached as libpq does by default.

Connections are pooled (a few per store): store calls come from several threads.
A connection that failed is closed; the next call opens a new one.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict

from forwarder.errors import StateError

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]
SETTING = "FORWARDER_STATE_URL"
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "")
_TRANSIENT = (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)
_LOGIN_REFUSED = ("28P01", "28000")  # invalid_password, invalid_authorization_specification
# At connection time libpq gives only the text: the server's reasons for a refused login.
_LOGIN_SIGNS = ("authentication failed", "no password supplied", "does not exist")
TRIES = 4  # a transaction aborted by a deadlock or serialization failure is run again


@dataclass(frozen=True)
class Target:
    """Where the store is, and how to log in: the secret parts never printed."""

    url: str = field(repr=False)
    params: dict[str, Any] = field(repr=False)
    label: str  # postgresql://user@host:port/db, no password, no query
    host: str
    secrets: tuple[str, ...] = field(repr=False)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def _spellings(*secrets: str | None) -> tuple[str, ...]:
    """Each secret as is and percent-encoded, longest first (so that no part of one
    survives the replacement of another)."""
    found = {form for s in secrets if s for form in (s, quote(s, safe=""))}
    return tuple(sorted(found, key=len, reverse=True))


def target(url: str, password: str | None = None, ca_file: Path | None = None) -> Target:
    """Parse FORWARDER_STATE_URL (StateError, without the password, if it is malformed)."""
    try:
        raw = urlsplit(url).password
    except ValueError:
        raw = None
    secrets = _spellings(raw, unquote(raw or ""), password)
    try:
        parsed = conninfo_to_dict(url)
    except psycopg.Error as exc:
        reason = Target(url, {}, "", "", secrets).scrub(one_line(str(exc)))
        raise StateError(
            f"state store URL is malformed ({reason})",
            advice="write it as postgresql://user@host:port/database",
            settings=(SETTING,),
        ) from None
    secrets = _spellings(*secrets, str(parsed.get("password") or ""))
    host = str(parsed.get("host") or parsed.get("hostaddr") or "local socket")
    port = f":{parsed['port']}" if parsed.get("port") else ""
    user = f"{parsed['user']}@" if parsed.get("user") else ""
    label = f"postgresql://{user}{host}{port}/{parsed.get('dbname') or ''}"
    params: dict[str, Any] = {
        "autocommit": True,
        "application_name": "forwarder",
        "connect_timeout": parsed.get("connect_timeout") or 10,
        # A server gone without a word is noticed within about a minute, not never.
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "tcp_user_timeout": 60_000,
    }
    if password and not parsed.get("password"):
        params["password"] = password
    remote = any(
        h.strip() not in _LOCAL_HOSTS and not h.strip().startswith("/") for h in host.split(",")
    )
    if "sslmode" not in parsed and not os.environ.get("PGSSLMODE") and remote:
        params["sslmode"] = "verify-full"
        if "sslrootcert" not in parsed and not os.environ.get("PGSSLROOTCERT"):
            params["sslrootcert"] = str(ca_file) if ca_file else "system"
    elif ca_file and "sslrootcert" not in parsed:
        params["sslrootcert"] = str(ca_file)
    return Target(url, params, label, host, secrets)


@overload
def text(value: str) -> str: ...
@overload
def text(value: None) -> None: ...
@overload
def text(value: str | None) -> str | None: ...


def text(value: str | None) -> str | None:
    """A string PostgreSQL can store: a NUL and text that is not Unicode (undecodable bytes
    kept as surrogates) are written as backslash escapes instead of failing the write."""
    if value is None:
        return None
    if "\0" in value:
        value = value.replace("\0", "\\x00")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def one_line(text: str) -> str:
    """A libpq message on one line: `connection failed: ...` prefixes and hints dropped."""
    text = re.sub(r"^connection (failed|is bad): ", "", text.strip())
    first = text.splitlines()[0] if text else ""
    return " ".join(first.replace("FATAL:", "").split()) or "no reason given"


def failure(tgt: Target, exc: psycopg.Error, what: str) -> StateError:
    """The one line for a failed store call."""
    reason = tgt.scrub(one_line(str(exc)))
    settings = (SETTING,)
    if exc.sqlstate in _LOGIN_REFUSED or any(sign in reason for sign in _LOGIN_SIGNS):
        return StateError(
            f"login refused ({reason})",
            server=f"state store {tgt.label}",
            advice="check the user and password (in the URL, FORWARDER_STATE_PASSWORD, "
            "PGPASSWORD or ~/.pgpass)",
            settings=settings,
        )
    if isinstance(exc, psycopg.OperationalError):
        return StateError(
            f"{what}: cannot reach the server ({reason}); nothing is sent until it is back",
            server=f"state store {tgt.label}",
            advice="is PostgreSQL running and reachable from here?",
            settings=settings,
        )
    return StateError(
        f"{what} failed ({reason}); nothing is sent until it can be written",
        server=f"state store {tgt.label}",
        advice="check the database's logs, permissions and free space",
        settings=settings,
    )


class Pool:
    """Up to `size` connections, opened when needed, each used by one thread at a time."""

    def __init__(self, tgt: Target, size: int, setup: Callable[[Connection], None]) -> None:
        self.target = tgt
        self._setup = setup
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._closed = False

    def _open(self) -> Connection:
        conn = psycopg.connect(self.target.url, **self.target.params)
        try:
            self._setup(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def connection(self, fresh: bool = False) -> Iterator[tuple[Connection, bool]]:
        """A connection, and whether it had been used before (it may have gone stale)."""
        with self._slots:
            with self._lock:
                if self._closed:
                    raise StateError("the state store is closed", server="state store")
                conn = None if fresh or not self._idle else self._idle.pop()
            reused = conn is not None
            if conn is None:
                conn = self._open()
            try:
                yield conn, reused
            finally:
                with self._lock:
                    if conn.closed or conn.broken or self._closed:
                        conn.close()
                    else:
                        self._idle.append(conn)

    def run(self, what: str, body: Callable[[Connection], T]) -> T:
        """`body` in one transaction, pipelined (the statements go out together and the
        commit needs no round trip of its own). A deadlock is tried again. A pooled
        connection found broken (the server restarted since it was last used) is replaced
        once: every store call is safe to repeat, even if its first commit went through
        (results only apply to pending rows; a claim repeated wins nothing the first one
        won, and those deliveries wait for their lease)."""
        fresh = False
        attempt = 0
        while True:
            attempt += 1
            try:
                with self.connection(fresh) as (conn, reused):
                    try:
                        with conn.pipeline(), conn.transaction():
                            result = body(conn)
                        return result
                    except psycopg.OperationalError:
                        if reused and conn.broken and not fresh:
                            fresh = True
                            continue
                        raise
            except _TRANSIENT as exc:
                if attempt < TRIES:
                    continue
                raise failure(self.target, exc, what) from None
            except psycopg.Error as exc:
                raise failure(self.target, exc, what) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
