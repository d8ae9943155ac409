"""A private PostgreSQL cluster on a free loopback port, and its fixtures.

:class:`PostgresCluster` runs ``initdb`` and ``pg_ctl`` from Debian's
``postgresql`` package (the newest ``/usr/lib/postgresql/<version>/bin``) in a
temporary directory, as the ``postgres`` system user when run as root.  The
system's own cluster is neither used nor touched.  The cluster listens on
127.0.0.1 (password logins, ``scram-sha-256``) and on a Unix socket in its
directory (``trust``, used by :meth:`PostgresCluster.sql` as the superuser).

It runs with ``fsync = off`` unless ``fsync=True`` (the benchmark): a committed
transaction survives a crash of the server (``stop(mode="immediate")``), not one
of the machine.  Commits are otherwise as in production (``synchronous_commit``
is left on).

Fixtures: ``postgres_cluster`` (one per session) and ``postgres_db`` (a fresh
database per test, owned by a login role with a password, and its URL).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql as pgsql

from tests.servers.common import LOOPBACK, Server, free_port, log_tail

__all__ = [
    "PostgresCluster",
    "PostgresDatabase",
    "postgres_bin_dir",
    "postgres_cluster",
    "postgres_db",
]

POSTGRES_LIB = Path("/usr/lib/postgresql")
StopMode = Literal["smart", "fast", "immediate"]


def postgres_bin_dir(root: Path = POSTGRES_LIB) -> Path:
    """The ``bin`` directory of the newest PostgreSQL that apt installed under ``root``
    (``<root>/<version>/bin`` holding ``initdb`` and ``pg_ctl``)."""
    found: dict[tuple[int, ...], Path] = {}
    for directory in root.glob("*"):
        bin_dir = directory / "bin"
        if re.fullmatch(r"\d+(\.\d+)?", directory.name) and all(
            (bin_dir / tool).is_file() for tool in ("initdb", "pg_ctl")
        ):
            found[tuple(int(part) for part in directory.name.split("."))] = bin_dir
    if not found:
        raise RuntimeError(
            f"no PostgreSQL server under {root}: install the Debian package postgresql "
            "(bash .ci/system-deps does it)"
        )
    return found[max(found)]


def _clean_environment() -> dict[str, str]:
    """This process's environment without PG* variables, which libpq and pg_ctl read."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


@dataclass(frozen=True)
class PostgresDatabase:
    """One database of a :class:`PostgresCluster`, owned by the cluster's login role."""

    cluster: PostgresCluster
    name: str

    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def user(self) -> str:
        return self.cluster.user

    @property
    def password(self) -> str:
        return self.cluster.password

    @property
    def url(self) -> str:
        """``postgresql://user:password@127.0.0.1:port/name``."""
        return self.cluster.url(self.name)

    def url_without_password(self) -> str:
        """``postgresql://user@127.0.0.1:port/name``, for PGPASSWORD or a .pgpass file."""
        return self.cluster.url(self.name, password=None)

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run ``query`` in this database as the superuser; its rows, if any."""
        return self.cluster.sql(query, params, dbname=self.name)


class PostgresCluster(Server):
    """A private PostgreSQL cluster (``initdb`` + ``pg_ctl``) in a temporary directory.

    ``start()`` runs ``initdb`` the first time, creates the login role ``user``
    with a random ``password`` (stored as a SCRAM verifier), and keeps the port
    it picked for every later start, so that a URL stays valid across
    ``stop()``/``start()`` (outage tests).  ``stop(mode="immediate")`` is a
    crash: the server recovers from its WAL at the next start.
    """

    superuser: str = "postgres"
    user: str = "forwarder"

    def __init__(
        self, host: str = LOOPBACK, start_timeout: float = 60.0, fsync: bool = False
    ) -> None:
        self.host = host
        self.fsync = fsync
        self.start_timeout = start_timeout
        self.password = secrets.token_urlsafe(18)
        self.bin_dir = postgres_bin_dir()
        self.base_dir = Path(tempfile.mkdtemp(prefix="postgres-"))
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "server.log"
        self.port = 0
        self._names = count(1)
        self._role_created = False
        self._as_owner: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            self._as_owner = ["runuser", "-u", self.superuser, "--"]
            entry = pwd.getpwnam(self.superuser)
            self._owner = (entry.pw_uid, entry.pw_gid)
        for directory in (self.base_dir, self.socket_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
            if self._owner is not None:
                os.chown(directory, *self._owner)

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """Whether the postmaster named in ``postmaster.pid`` is alive."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return True

    def start(self) -> None:
        """Start the server and wait until it accepts connections (``pg_ctl -w``).

        The first start runs ``initdb``, picks a free port (retrying if it was
        taken meanwhile) and creates the login role.
        """
        if self.running:
            raise RuntimeError("PostgreSQL already running")
        if not self.data_dir.exists():
            self._initdb()
        new_port = self.port == 0
        for attempt in range(3):
            if new_port:
                self.port = free_port(self.host)
            try:
                self._pg_ctl("start", "-l", str(self.log_path), "-o", self._server_options())
                break
            except RuntimeError as error:
                if not new_port or "Address already in use" not in str(error) or attempt == 2:
                    raise
        if not self._role_created:
            self.sql(
                pgsql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    pgsql.Identifier(self.user), pgsql.Literal(self.password)
                )
            )
            self._role_created = True

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server and wait until it is gone; ``immediate`` is a crash."""
        if self.running:
            self._pg_ctl("stop", "-m", mode)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail([self.log_path], lines)

    # ---------------------------------------------------------------- SQL

    def url(self, dbname: str, password: str | Literal[True] | None = True) -> str:
        """A libpq URL for ``user`` on ``dbname``: with the role's password by
        default, another ``password``, or none (``password=None``)."""
        secret = self.password if password is True else password
        credentials = quote(self.user, safe="")
        if secret is not None:
            credentials += ":" + quote(secret, safe="")
        return f"postgresql://{credentials}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection over the Unix socket, in autocommit mode."""
        return psycopg.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=self.superuser,
            dbname=dbname,
            autocommit=True,
            connect_timeout=10,
        )

    def sql(
        self, query: str | pgsql.Composable, params: Sequence[Any] = (), dbname: str = "postgres"
    ) -> list[tuple[Any, ...]]:
        """Run ``query`` as the superuser (autocommit); its rows, if it returns any."""
        with self.connect(dbname) as conn:
            cursor = conn.execute(query, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description is not None else []

    def create_database(self, name: str | None = None) -> PostgresDatabase:
        """A new, empty database owned by ``user`` (named ``test_<n>`` by default)."""
        if name is None:
            name = f"test_{next(self._names)}"
        self.sql(
            pgsql.SQL("CREATE DATABASE {} OWNER {}").format(
                pgsql.Identifier(name), pgsql.Identifier(self.user)
            )
        )
        return PostgresDatabase(self, name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing the connections still open to it."""
        drop = pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        self.sql(drop.format(pgsql.Identifier(name)))

    def terminate_connections(self, dbname: str) -> int:
        """Close every client connection to ``dbname`` from the server side; how many."""
        rows = self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
        return len(rows)

    # ---------------------------------------------------------------- internals

    def _server_options(self) -> str:
        fsync = "on" if self.fsync else "off"
        return (
            f"-c listen_addresses={self.host} -p {self.port}"
            f" -c unix_socket_directories={self.socket_dir} -c fsync={fsync}"
        )

    def _initdb(self) -> None:
        self._run_as_owner(
            "initdb",
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--no-instructions",
            ],
        )

    def _pg_ctl(self, action: str, *args: str) -> None:
        timeout = str(int(self.start_timeout))
        pg_ctl = str(self.bin_dir / "pg_ctl")
        self._run_as_owner(
            f"pg_ctl {action}",
            [pg_ctl, action, "-D", str(self.data_dir), "-w", "-t", timeout, *args],
        )

    def _run_as_owner(self, what: str, command: list[str]) -> None:
        result = subprocess.run(
            [*self._as_owner, *command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=_clean_environment(),
            cwd=self.base_dir,
        )
        if result.returncode != 0:
            output = re.sub(r"\n+", "\n", result.stdout + result.stderr).strip()
            raise RuntimeError(
                f"PostgreSQL {what} failed (exit status {result.returncode}) in {self.base_dir}:"
                f"\n{output}\n{self.log_tail()}"
            )


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for the whole session."""
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def postgres_db(postgres_cluster: PostgresCluster) -> Iterator[PostgresDatabase]:
    """A fresh database of the session's cluster (started again if a test left it
    stopped), dropped after the test."""
    if not postgres_cluster.running:
        postgres_cluster.start()
    database = postgres_cluster.create_database()
    yield database
    if postgres_cluster.running:
        postgres_cluster.drop_database(database.name)
