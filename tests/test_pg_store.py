"""The PostgreSQL state store beyond the contract: its schema, its logins, lost servers,
and the settings that select it. Against the private cluster (tests/servers/postgres.py)."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest

from forwarder import pg_schema
from forwarder.errors import EXIT_OK, ConfigError, StateError
from forwarder.factory import open_store, store_label
from forwarder.pg_connect import target
from forwarder.pg_store import PgStateStore
from forwarder.sqlite_store import SqliteStateStore
from forwarder.state import ClaimRequest, CycleRecord, Delivery, MessageResult, Status
from forwarder.status import show_status
from tests.conftest import MakeSettings
from tests.servers import PostgresDatabase

T0 = 1_700_000_000.0


def texts_of(error: BaseException) -> str:
    return f"{error}\n{error!r}\n{error.args!r}"


# Schema ---------------------------------------------------------------------------------


def test_the_schema_is_created_in_its_own_namespace_with_its_version(
    postgres_db: PostgresDatabase,
) -> None:
    PgStateStore(postgres_db.url).close()
    assert postgres_db.sql("SELECT value FROM forwarder.meta WHERE key = 'schema'") == [
        (str(pg_schema.VERSION),)
    ]
    assert postgres_db.sql("SELECT to_regclass('public.deliveries')") == [(None,)]


def test_instances_starting_together_on_an_empty_database_all_open_it(
    postgres_db: PostgresDatabase,
) -> None:
    start = threading.Barrier(4)
    outcomes: list[BaseException | None] = []

    def open_one() -> None:
        start.wait()
        try:
            PgStateStore(postgres_db.url).close()
            outcomes.append(None)
        except BaseException as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == [None] * 4


def test_a_schema_newer_than_the_forwarder_is_refused(postgres_db: PostgresDatabase) -> None:
    PgStateStore(postgres_db.url).close()
    postgres_db.sql("UPDATE forwarder.meta SET value = %s", (str(pg_schema.VERSION + 1),))
    with pytest.raises(StateError, match=r"is newer than this forwarder.s .*; upgrade"):
        PgStateStore(postgres_db.url)


def test_the_status_store_creates_nothing_in_an_empty_database(
    postgres_db: PostgresDatabase,
) -> None:
    with pytest.raises(StateError, match="holds no forwarder state yet; start the service"):
        PgStateStore(postgres_db.url, readonly=True)
    assert postgres_db.sql("SELECT to_regnamespace('forwarder')") == [(None,)]


def test_the_status_store_cannot_write(postgres_db: PostgresDatabase) -> None:
    PgStateStore(postgres_db.url).close()
    store = PgStateStore(postgres_db.url, readonly=True)
    try:
        with pytest.raises(StateError, match="read-only transaction"):
            store.record_cycle("acme", CycleRecord(T0, T0 + 1, "ok"))
        assert store.report(None, 10).cycles == 0
    finally:
        store.close()


def test_text_postgresql_cannot_hold_is_stored_escaped(postgres_db: PostgresDatabase) -> None:
    store = PgStateStore(postgres_db.url)
    odd_id = "odd\x00id\udce9@remote.example"  # a NUL, and a byte that was not UTF-8
    try:
        request = ClaimRequest("k", odd_id, None, ("l@x.org",), (("a@x.org", "a@x.org"),))
        store.claim("acme", [request], "one", T0, 60)
        reply = "4.2.0 busy\x00now"
        delivery = Delivery("a@x.org", "a@x.org", Status.DEFERRED, 451, reply, T0 + 60)
        store.record_results("acme", [MessageResult("k", odd_id, ("l@x.org",), (delivery,))], T0)
        [row] = store.report("acme", 10).deferred
    finally:
        store.close()
    assert (row.message_id, row.reply) == ("odd\\x00id\\udce9@remote.example", "4.2.0 busy\\x00now")


# Logins and lost servers ----------------------------------------------------------------


def test_the_password_can_come_from_pgpassword(
    postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", postgres_db.password)
    PgStateStore(postgres_db.url_without_password()).close()


def test_the_password_can_come_from_a_pgpass_file(
    postgres_db: PostgresDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pgpass = tmp_path / "pgpass"
    db = postgres_db
    pgpass.write_text(f"{db.host}:{db.port}:{db.name}:{db.user}:{db.password}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    PgStateStore(db.url_without_password()).close()


def test_the_password_can_come_from_the_state_password_credential(
    postgres_db: PostgresDatabase,
    make_settings: MakeSettings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "state_password").write_text(postgres_db.password + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    settings = make_settings(state_db="", state_url=postgres_db.url_without_password())
    store = open_store(settings)
    try:
        assert isinstance(store, PgStateStore)
    finally:
        store.close()


def test_a_refused_login_names_the_server_and_never_the_password(
    postgres_db: PostgresDatabase,
) -> None:
    wrong = "Wr0ng-canary-pw"
    with pytest.raises(StateError) as refused:
        PgStateStore(postgres_db.cluster.url(postgres_db.name, password=wrong))
    text = texts_of(refused.value)
    assert wrong not in text and postgres_db.password not in text
    assert str(refused.value).startswith(
        f"state store postgresql://{postgres_db.user}@{postgres_db.host}:{postgres_db.port}/"
    )
    assert "login refused" in str(refused.value)
    assert "FORWARDER_STATE_URL" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_connection_closed_by_the_server_is_replaced_at_the_next_call(
    postgres_db: PostgresDatabase,
) -> None:
    store = PgStateStore(postgres_db.url)
    try:
        store.record_cycle("acme", CycleRecord(T0, T0 + 1, "ok"))
        assert postgres_db.cluster.terminate_connections(postgres_db.name) >= 1
        store.record_cycle("acme", CycleRecord(T0 + 2, T0 + 3, "ok"))
        assert store.report("acme", 10).cycles == 2
    finally:
        store.close()


def test_a_stopped_server_is_one_line_naming_it_and_the_next_call_reconnects(
    postgres_db: PostgresDatabase,
) -> None:
    store = PgStateStore(postgres_db.url)
    try:
        store.record_cycle("acme", CycleRecord(T0, T0 + 1, "ok"))
        postgres_db.cluster.stop()
        with pytest.raises(StateError) as lost:
            store.record_cycle("acme", CycleRecord(T0 + 2, T0 + 3, "ok"))
        postgres_db.cluster.start()
        store.record_cycle("acme", CycleRecord(T0 + 4, T0 + 5, "ok"))
        assert store.report("acme", 10).cycles == 2
    finally:
        store.close()
    line = str(lost.value)
    assert f"{postgres_db.host}:{postgres_db.port}" in line
    assert "cannot reach the server" in line and "FORWARDER_STATE_URL" in line
    assert "\n" not in line and postgres_db.password not in texts_of(lost.value)


def test_a_malformed_url_is_refused_without_its_password() -> None:
    with pytest.raises(StateError, match="URL is malformed") as malformed:
        target("postgresql://user:sec ret-canary@db.example/forwarder")
    assert "sec ret-canary" not in texts_of(malformed.value)


def test_tls_is_verified_for_a_remote_server_by_default(tmp_path: Path) -> None:
    remote = target("postgresql://u@db.example:5432/forwarder")
    with_ca = target("postgresql://u@db.example/forwarder", ca_file=tmp_path / "ca.pem")
    assert (remote.params["sslmode"], remote.params["sslrootcert"]) == ("verify-full", "system")
    assert with_ca.params["sslrootcert"] == str(tmp_path / "ca.pem")


def test_the_url_chooses_tls_and_loopback_keeps_libpqs_default() -> None:
    assert "sslmode" not in target("postgresql://u@db.example/f?sslmode=disable").params
    assert "sslmode" not in target("postgresql://u@127.0.0.1:5432/f").params
    assert "sslmode" not in target("postgresql:///f?host=/run/postgresql").params


# Settings and the factory ---------------------------------------------------------------


def test_the_state_url_selects_postgresql(
    postgres_db: PostgresDatabase, make_settings: MakeSettings
) -> None:
    settings = make_settings(state_db="", state_url=postgres_db.url)
    store = open_store(settings)
    try:
        assert isinstance(store, PgStateStore)
        assert postgres_db.password not in repr(store) + repr(settings)
    finally:
        store.close()
    assert store_label(settings) == (
        f"postgresql://{postgres_db.user}@{postgres_db.host}:{postgres_db.port}/{postgres_db.name}"
    )


def test_without_a_state_url_the_store_is_the_sqlite_file(make_settings: MakeSettings) -> None:
    store = open_store(make_settings())
    try:
        assert isinstance(store, SqliteStateStore)
    finally:
        store.close()


def test_state_db_and_state_url_together_are_refused(make_settings: MakeSettings) -> None:
    with pytest.raises(ConfigError, match="FORWARDER_STATE_DB and FORWARDER_STATE_URL"):
        make_settings(state_url="postgresql://u@db.example/f")


def test_a_state_url_that_is_not_postgresql_is_refused(make_settings: MakeSettings) -> None:
    with pytest.raises(ConfigError, match="FORWARDER_STATE_URL: must be a postgresql://"):
        make_settings(state_db="", state_url="mysql://u:pw@db.example/f")


async def test_status_reads_postgresql_and_names_it_without_the_password(
    postgres_db: PostgresDatabase, make_settings: MakeSettings
) -> None:
    settings = make_settings(state_db="", state_url=postgres_db.url)
    store = PgStateStore(postgres_db.url)
    store.record_cycle("default", CycleRecord(T0, T0 + 1, "ok", messages=3))
    store.close()
    out = io.StringIO()
    assert await show_status(settings, out=out) == EXIT_OK
    text = out.getvalue()
    assert f"state store: {store_label(settings)}\n" in text
    assert "messages 3" in text and postgres_db.password not in text


def test_deferred_deliveries_are_counted_per_mailbox(postgres_db: PostgresDatabase) -> None:
    store = PgStateStore(postgres_db.url)
    try:
        for box, members in (("acme", ("a@x.org", "b@x.org")), ("other", ("a@x.org",))):
            pairs = tuple((m, m) for m in members)
            store.claim(box, [ClaimRequest("k", None, None, ("l@x.org",), pairs)], "one", T0, 60)
            later = tuple(Delivery(m, m, Status.DEFERRED, 451, "busy", T0 + 60) for m in members)
            store.record_results(box, [MessageResult("k", None, ("l@x.org",), later)], T0)
        assert store.deferred_counts() == {"acme": 2, "other": 1}
    finally:
        store.close()


def test_a_schema_prepared_by_the_administrator_needs_no_create_right_on_the_database(
    postgres_db: PostgresDatabase,
) -> None:
    db = postgres_db
    db.sql(f'REVOKE CREATE ON DATABASE "{db.name}" FROM "{db.user}", PUBLIC')
    db.sql(f'ALTER DATABASE "{db.name}" OWNER TO postgres')
    db.sql(f'CREATE SCHEMA forwarder AUTHORIZATION "{db.user}"')
    PgStateStore(db.url).close()
    assert db.sql("SELECT value FROM forwarder.meta") == [(str(pg_schema.VERSION),)]
