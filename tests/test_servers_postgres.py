"""The private PostgreSQL cluster (tests/servers/postgres.py) behaves as the suite expects."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.servers import PostgresCluster, PostgresDatabase, postgres_bin_dir


def one(url: str, query: str) -> object:
    with psycopg.connect(url, connect_timeout=10) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_url_logs_in_as_the_database_owner(postgres_db: PostgresDatabase) -> None:
    with psycopg.connect(postgres_db.url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
        row = conn.execute("SELECT current_user, current_database(), inet_server_port()").fetchone()

    assert row == (postgres_db.user, postgres_db.name, postgres_db.port)
    assert postgres_db.sql("SELECT x FROM t") == [(1,)]


def test_wrong_password_is_refused(postgres_db: PostgresDatabase) -> None:
    wrong = postgres_db.cluster.url(postgres_db.name, password="not-the-password")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=10)


def test_password_is_stored_as_a_scram_verifier(postgres_db: PostgresDatabase) -> None:
    [(stored,)] = postgres_db.sql(
        "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (postgres_db.user,)
    )

    assert stored.startswith("SCRAM-SHA-256$")


def test_url_without_password_takes_pgpassword(
    postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = postgres_db.url_without_password()
    assert postgres_db.password not in url
    monkeypatch.setenv("PGPASSWORD", postgres_db.password)

    assert one(url, "SELECT current_user") == postgres_db.user


def test_url_without_password_takes_pgpass_file(
    postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(
        f"{postgres_db.host}:{postgres_db.port}:{postgres_db.name}:"
        f"{postgres_db.user}:{postgres_db.password}\n"
    )
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))

    assert one(postgres_db.url_without_password(), "SELECT current_user") == postgres_db.user


def test_new_database_is_empty_and_separate(postgres_db: PostgresDatabase) -> None:
    postgres_db.sql("CREATE TABLE t (x int)")

    other = postgres_db.cluster.create_database()
    try:
        assert other.name != postgres_db.name
        assert other.url != postgres_db.url
        assert other.sql("SELECT to_regclass('t')") == [(None,)]
    finally:
        postgres_db.cluster.drop_database(other.name)


def test_drop_database_closes_its_connections(postgres_cluster: PostgresCluster) -> None:
    database = postgres_cluster.create_database()
    with psycopg.connect(database.url) as conn:
        postgres_cluster.drop_database(database.name)

        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert (
        postgres_cluster.sql("SELECT datname FROM pg_database WHERE datname = %s", (database.name,))
        == []
    )


def test_terminate_connections_breaks_a_client(postgres_db: PostgresDatabase) -> None:
    with psycopg.connect(postgres_db.url) as conn:
        conn.execute("SELECT 1")

        assert postgres_db.cluster.terminate_connections(postgres_db.name) == 1

        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert one(postgres_db.url, "SELECT 1") == 1


def test_stop_refuses_logins_and_start_keeps_port_and_data(
    postgres_db: PostgresDatabase,
) -> None:
    with psycopg.connect(postgres_db.url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    cluster, port = postgres_db.cluster, postgres_db.port

    cluster.stop()

    assert not cluster.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres_db.url, connect_timeout=10)
    cluster.start()
    assert cluster.running and cluster.port == port
    assert one(postgres_db.url, "SELECT x FROM t") == 1


def test_crash_keeps_committed_rows(postgres_db: PostgresDatabase) -> None:
    with psycopg.connect(postgres_db.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")

    postgres_db.cluster.stop(mode="immediate")
    postgres_db.cluster.start()

    assert one(postgres_db.url, "SELECT x FROM t") == 1


def test_bin_dir_is_the_newest_installed_version(tmp_path: Path) -> None:
    for version in ("9.6", "13", "15", "16"):
        bin_dir = tmp_path / version / "bin"
        bin_dir.mkdir(parents=True)
        tools = ("initdb", "pg_ctl") if version != "16" else ("pg_ctl",)  # 16: client only
        for tool in tools:
            (bin_dir / tool).touch()

    assert postgres_bin_dir(tmp_path) == tmp_path / "15" / "bin"


def test_no_server_installed_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="install the Debian package postgresql"):
        postgres_bin_dir(tmp_path)
