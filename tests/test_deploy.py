"""deploy/forwarder.service: valid for systemd, sandboxed, consistent with the program.

`systemd-analyze` (Debian package systemd, installed by `bash .ci/system-deps systemd`)
works on unit files without a running systemd: `security --offline=true` scores the
sandbox, `verify` parses the unit and checks that ExecStart= is executable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from forwarder.config_sources import CREDENTIAL_FILES
from forwarder.errors import EXIT_AUTH, EXIT_CONFIG
from tests.servers.systemd import required_tool

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "forwarder.service"
EXEC_START = "ExecStart=/opt/forwarder/bin/forwarder run"
MAX_EXPOSURE = 1.5  # systemd-analyze security: 0 = fully sandboxed, 10 = not at all


@pytest.fixture
def analyze() -> str:
    return required_tool("systemd-analyze", "systemd", "the unit checks")


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order; keys may repeat."""
    found: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"continuation lines are not expected: {raw!r}"
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {raw!r}"
        found.append((section, key.strip(), value.strip()))
    return found


def service(key: str) -> list[str]:
    return [v for s, k, v in directives(UNIT.read_text()) if s == "Service" and k == key]


def test_exposure_is_at_most_1_5(analyze: str) -> None:
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=15", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(
        r"Overall exposure level for forwarder\.service: (\d+(?:\.\d+)?)", result.stdout
    )
    assert match, f"no exposure level in the output:\n{result.stdout}\n{result.stderr}"
    exposure = float(match[1])
    assert exposure <= MAX_EXPOSURE, result.stdout
    assert result.returncode == 0, result.stderr  # --threshold=15 is 1.5


def test_unit_verifies_without_warnings(analyze: str, tmp_path: Path) -> None:
    # The installed path does not exist here: point ExecStart at this venv's script.
    script = Path(sys.executable).parent / "forwarder"
    assert script.is_file(), f"{script} missing: install the package (pip install -e .)"
    text = UNIT.read_text()
    assert EXEC_START in text
    unit = tmp_path / "forwarder.service"
    unit.write_text(text.replace(EXEC_START, f"ExecStart={script} run"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and unparsable values are only warnings: any line about the unit fails.
    assert "forwarder.service" not in result.stderr, result.stderr


def test_verify_would_catch_a_mistake(analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    script = Path(sys.executable).parent / "forwarder"
    text = UNIT.read_text().replace(EXEC_START, f"ExecStart={script} run")
    assert "ProtectSystem=strict" in text
    unit = tmp_path / "forwarder.service"
    unit.write_text(text.replace("ProtectSystem=strict", "ProtectSytem=strict"))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert "ProtectSytem" in result.stderr


def test_the_service_notifies_and_is_watched() -> None:
    assert service("Type") == ["notify"]
    assert service("NotifyAccess") == ["main"]
    [watchdog] = service("WatchdogSec")
    assert 30 <= int(watchdog) <= 600
    assert service("TimeoutStopSec") == ["15"]


def test_it_runs_the_daemon_with_the_environment_file() -> None:
    assert service("ExecStart") == [EXEC_START.partition("=")[2]]
    assert service("EnvironmentFile") == ["/etc/forwarder/forwarder.env"]


def test_the_state_store_is_the_default_one_in_the_state_directory() -> None:
    # $STATE_DIRECTORY/state.db (forwarder/state_location.py); set here, FORWARDER_STATE_DB
    # would have to be emptied for a FORWARDER_STATE_URL of the environment file
    assert service("StateDirectory") == ["forwarder"]
    assert service("DynamicUser") == ["yes"]
    assert not any("FORWARDER_STATE" in value for value in service("Environment"))


def test_passwords_are_credentials_the_program_reads() -> None:
    loaded = dict(value.split(":", 1) for value in service("LoadCredential"))
    # state_password only serves a PostgreSQL store: the unit ships for SQLite.
    assert {"imap_password", "smtp_password"} <= set(loaded) <= set(CREDENTIAL_FILES.values())
    for name, source in loaded.items():
        assert source == f"/etc/forwarder/{name}"


def test_restarts_on_failure_but_not_on_errors_that_waiting_does_not_fix() -> None:
    assert service("Restart") == ["on-failure"]
    [delay] = service("RestartSec")
    assert int(delay) >= 5
    [prevent] = service("RestartPreventExitStatus")
    assert {int(status) for status in prevent.split()} == {EXIT_CONFIG, EXIT_AUTH}


def test_mail_servers_can_be_anywhere() -> None:
    for key in ("IPAddressDeny", "IPAddressAllow", "PrivateNetwork"):
        assert service(key) == [], key
    [families] = service("RestrictAddressFamilies")
    assert set(families.split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}  # AF_UNIX: sd_notify
