"""docs/provider.md, a provider's deployment: each file, command and figure it gives is
the program's. The files load as shown (the shared relay inherited, an empty IMAP password
credential harmless), the SQL gives the forwarder's role what it needs on a private
PostgreSQL, promtool accepts the Prometheus configuration, the alerts and metrics it names
exist, and the Dovecot figures are the 1,000-mailbox benchmark's. Its systemd commands run
in a real systemd: tests/test_systemd.py (make test-systemd)."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql as pgsql

from bench.mailboxes import dovecot_limits, inotify_needed
from forwarder.config import load_settings
from forwarder.mailbox import Mailbox
from forwarder.pg_store import PgStateStore
from tests.daemon_process import Daemon
from tests.servers import free_port
from tests.servers.postgres import PostgresCluster
from tests.test_alert_rules import promtool, rules  # noqa: F401 (promtool: a fixture)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "provider.md"
PASSWORD = "choose-a-password"  # the doc's


def blocks(language: str) -> list[str]:
    """The doc's fenced blocks written in ``language`` ("" for none), in order."""
    found: list[str] = []
    fence: str | None = None  # the language of the block we are in
    lines: list[str] = []
    for line in DOC.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            if fence is None:
                fence, lines = line[3:].strip(), []
            else:
                if fence == language:
                    found.append("".join(lines))
                fence = None
        elif fence is not None:
            lines.append(line)
    return found


def block(language: str, anchor: str) -> str:
    [found] = [b for b in blocks(language) if anchor in b]
    return found


def section(heading: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


# --------------------------------------------------------------------------- links


def test_the_readmes_link_to_the_guide() -> None:
    assert "](docs/provider.md)" in (ROOT / "README.md").read_text()
    assert "](../docs/provider.md)" in (ROOT / "deploy" / "README.md").read_text()


def test_every_test_file_the_guide_names_exists() -> None:
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", DOC.read_text()))
    assert named and all((ROOT / path).exists() for path in named), named


# --------------------------------------------------------------------------- the files


@pytest.fixture
def provider_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The doc's forwarder.env in the environment, its mailboxes file, lists file and
    password files written, and the unit's credentials (an empty imap_password)."""
    env = block("sh", "/etc/forwarder/forwarder.env")
    for line in env.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            monkeypatch.setenv(name, value)
    toml = block("toml", "[[mailbox]]")
    (tmp_path / "mailboxes.toml").write_text(toml)
    monkeypatch.setenv("FORWARDER_MAILBOXES_FILE", str(tmp_path / "mailboxes.toml"))
    lists = block("", "/etc/forwarder/lists/acme")
    for directory, name, text in (
        ("lists", "acme", lists),
        ("passwords", "acme", "acme-imap-secret\n"),
        ("passwords", "globex", "globex-imap-secret\n"),
    ):
        (tmp_path / directory).mkdir(exist_ok=True)
        (tmp_path / directory / name).write_text(text)
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "imap_password").write_text("")  # left empty, as the doc says
    (credentials / "smtp_password").write_text("relay-secret\n")
    (credentials / "state_password").write_text("db-secret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    return tmp_path


def test_the_mailboxes_share_the_relay_of_the_environment_and_keep_their_own(
    provider_files: Path,
) -> None:
    settings = load_settings(_env_file=None)
    boxes: dict[str, Mailbox] = {m.name: m for m in settings.mailboxes()}
    assert list(boxes) == ["acme", "globex"]
    for box in boxes.values():
        assert (box.smtp.host, box.smtp.username) == ("relay.example.net", "lists@example.net")
        assert box.smtp.password is not None
        assert box.smtp.password.get_secret_value() == "relay-secret"
    acme, globex = boxes["acme"], boxes["globex"]
    assert (acme.imap.host, acme.imap.username) == ("imap.example.net", "catchall@acme.example")
    assert acme.imap.password.get_secret_value() == "acme-imap-secret"
    assert globex.imap.host == "mail.globex.example"
    assert globex.imap.password.get_secret_value() == "globex-imap-secret"
    assert acme.lists == {
        "contact@acme.example": ("alice@acme.example", "bob@acme.example"),
        "compta@acme.example": ("bob@acme.example", "carol@acme.example"),
    }
    assert globex.lists == {
        "contact@globex.example": ("alice@globex.example", "bob@globex.example")
    }
    assert acme.envelope_sender == "lists-admin@acme.example"
    assert globex.envelope_sender == "postmaster@globex.example"
    assert settings.state_url is not None and settings.state_password is not None
    assert settings.state_password.get_secret_value() == "db-secret"
    assert settings.metrics_address == "192.0.2.11:9464"


# --------------------------------------------------------------------------- PostgreSQL


class DoclessCluster(PostgresCluster):
    user = "tests"  # the doc creates the role `forwarder` itself


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[PostgresCluster]:
    """A private cluster without the role the doc creates."""
    cluster = DoclessCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def run_sql(cluster: PostgresCluster, text: str, dbname: str = "postgres") -> None:
    """The doc's statements one by one, as psql would (CREATE DATABASE takes no transaction)."""
    for statement in text.split(";"):
        if statement.strip():
            cluster.sql(statement, dbname=dbname)


def tables(cluster: PostgresCluster, dbname: str) -> set[str]:
    rows = cluster.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'forwarder'", (), dbname)
    return {f"forwarder.{name}" for (name,) in rows}


def named_tables() -> set[str]:
    return set(re.findall(r"`(forwarder\.\w+)`", section("2. PostgreSQL")))


def test_a_database_of_its_own_is_all_the_forwarder_needs(bare_cluster: PostgresCluster) -> None:
    run_sql(bare_cluster, block("sql", "CREATE DATABASE"))
    try:
        url = f"postgresql://forwarder:{PASSWORD}@{bare_cluster.host}:{bare_cluster.port}/forwarder"
        PgStateStore(url).close()
        assert tables(bare_cluster, "forwarder") == named_tables()
    finally:
        bare_cluster.drop_database("forwarder")
        bare_cluster.sql("DROP ROLE forwarder")


def test_a_schema_in_a_database_of_yours_is_all_the_forwarder_needs(
    bare_cluster: PostgresCluster,
) -> None:
    bare_cluster.sql("CREATE DATABASE mail")  # owned by the superuser; nobody may connect
    bare_cluster.sql("REVOKE ALL ON DATABASE mail FROM PUBLIC")
    statements = block("sql", "CREATE SCHEMA")
    role, schema_and_grant = statements.split(";", 1)
    run_sql(bare_cluster, role)
    run_sql(bare_cluster, schema_and_grant, dbname="mail")
    try:
        url = f"postgresql://forwarder:{PASSWORD}@{bare_cluster.host}:{bare_cluster.port}/mail"
        PgStateStore(url).close()
        assert tables(bare_cluster, "mail") == named_tables()
        [(may_create,)] = bare_cluster.sql(
            "SELECT has_database_privilege('forwarder', 'mail', 'CREATE')"
        )
        assert may_create is False
    finally:
        bare_cluster.drop_database("mail")
        bare_cluster.sql(pgsql.SQL("DROP ROLE {}").format(pgsql.Identifier("forwarder")))


# --------------------------------------------------------------------------- Dovecot


def test_the_dovecot_settings_are_the_benchmarks_for_1000_catch_alls() -> None:
    before, imap_service = dovecot_limits(1000)
    conf = block("", "default_process_limit")
    assert conf.split("\n", 1)[1] == before + imap_service  # after its comment line
    sysctl = block("", "fs.inotify.max_user_instances")
    assert f"fs.inotify.max_user_instances = {inotify_needed(1000)}\n" in sysctl


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_accepts_the_configuration_with_the_rules_file(
    promtool: str,  # noqa: F811 (the fixture)
    tmp_path: Path,
) -> None:
    config = block("yaml", "scrape_configs")
    rules_path = "/etc/prometheus/forwarder-alerts.yml"
    assert rules_path in config
    path = tmp_path / "prometheus.yml"
    path.write_text(config.replace(rules_path, str(ROOT / "deploy" / "forwarder-alerts.yml")))
    result = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_the_guide_lists_are_the_rules_files() -> None:
    listed = re.findall(r"^\| `(\w+)` \|", section("Alerts"), flags=re.MULTILINE)
    assert listed == [rule["alert"] for rule in rules()]


def declared_metrics(port: int) -> set[str]:
    """Every sample name /metrics declares (its # TYPE lines), with or without samples yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    suffixes = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE):
        names |= {name + suffix for suffix in suffixes.get(kind, ("",))}
    return names


def test_every_metric_the_guide_names_is_served_by_a_running_forwarder(
    daemon_env: dict[str, str], start_daemon: type[Daemon]
) -> None:
    port = free_port("127.0.0.1")
    daemon = start_daemon({**daemon_env, "FORWARDER_METRICS_ADDRESS": f"127.0.0.1:{port}"})
    daemon.wait_for_event("ready")
    served = declared_metrics(port)
    status, _, stderr = daemon.stop()
    assert status == 0, stderr
    named = set(re.findall(r"`(forwarder_\w+)`", section("5. Metrics")))
    assert len(named) >= 5 and named <= served, sorted(named - served)
