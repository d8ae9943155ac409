"""The forwarder installed in a systemd container exactly as deploy/README.md says.

Once per session, in a container (:mod:`tests.servers.systemd`) running a private
Dovecot and an SMTP sink (:mod:`tests.servers.systemd_mail`), the ``sh`` blocks of
the numbered sections of deploy/README.md run in order, as one script: install,
configure, check, run once, enable the service. Only three things stand in for
the administrator and the network; nothing else is changed:

* ``/path/to/checkout`` is a copy of this checkout (bound at :data:`CHECKOUT`);
* ``editor FILE`` writes what an administrator would type (:data:`EDITS`); the
  install fails when the doc opens a file that has no prepared content;
* pip finds the dependencies in wheels downloaded outside (the container has no
  network): ``PIP_NO_INDEX`` and ``PIP_FIND_LINKS`` in the script's environment.

What that container wrote is kept as a read-only layer; the ``system`` fixture
boots a fresh container on it for each test (about a second), in which the
enabled service starts at boot. Registered in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.systemd import Bind, Container
from tests.servers.systemd_mail import (
    CATCHALL,
    CATCHALL_PASSWORD,
    IMAP_PORT,
    SMTP_PORT,
    install_mail_servers,
)
from tests.servers.systemd_rootfs import container_python, copy_checkout, download_wheels

__all__ = ["deployment", "doc_commands", "system"]

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "deploy" / "README.md"
CHECKOUT = "/srv/checkout"
WHEELS = "/srv/wheels"
UNIT = "forwarder"
LISTS_FILE = "/etc/forwarder/lists.json"
ADMIN_FUNCTION = "/root/forwarder_admin.sh"  # the doc's forwarder_admin, saved by the install

LISTS = {
    "contact@example.org": ["alice@example.org", "bob@example.org"],
    "compta@example.org": ["bob@example.org", "carol@example.org"],
}
# What the administrator types into each file the doc opens with `editor`.
EDITS = {
    "forwarder.env": f"""\
FORWARDER_IMAP_HOST=127.0.0.1
FORWARDER_IMAP_PORT={IMAP_PORT}
FORWARDER_IMAP_SECURITY=none
FORWARDER_IMAP_USERNAME={CATCHALL}
FORWARDER_SMTP_HOST=127.0.0.1
FORWARDER_SMTP_PORT={SMTP_PORT}
FORWARDER_SMTP_SECURITY=none
FORWARDER_LISTS_FILE={LISTS_FILE}
FORWARDER_ENVELOPE_SENDER=lists-admin@example.org
FORWARDER_LOG_FORMAT=json
""",
    "imap_password": f"{CATCHALL_PASSWORD}\n",
    "smtp_password": "",  # the sink takes no login
    "lists.json": json.dumps(LISTS, indent=2) + "\n",
}
FAKE_EDITOR = """\
#!/bin/sh
# Stands in for the administrator: writes the prepared content of each file given.
set -e
for file; do
  prepared="/root/edits/$(basename "$file")"
  [ -f "$prepared" ] || { echo "editor: nothing prepared for $file" >&2; exit 1; }
  cat "$prepared" > "$file"
done
"""
SCRIPT_HEAD = f"""\
set -euxo pipefail
# No network in the container: the wheels downloaded outside stand in for PyPI.
export PIP_NO_INDEX=1 PIP_FIND_LINKS={WHEELS} PIP_DISABLE_PIP_VERSION_CHECK=1
"""
SCRIPT_TAIL = f"declare -f forwarder_admin > {ADMIN_FUNCTION}\n"


def doc_commands(markdown: str) -> str:
    """The ``sh`` blocks of the numbered sections (``## 1. ...``), in order."""
    blocks: list[str] = []
    numbered = False
    for part in re.split(r"^(## .*)$", markdown, flags=re.MULTILINE):
        if part.startswith("## "):
            numbered = re.match(r"## \d+\.", part) is not None
        elif numbered:
            blocks += re.findall(r"^```sh\n(.*?)^```$", part, flags=re.MULTILINE | re.DOTALL)
    return "".join(blocks).replace("/path/to/checkout", CHECKOUT)


@pytest.fixture(scope="session")
def deployment(
    systemd_rootfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Path]]:
    """The layers (topmost first) of a system where the doc's commands ran."""
    staging = tmp_path_factory.mktemp("deployment")
    copy_checkout(ROOT, staging / "checkout")
    download_wheels(ROOT, container_python(systemd_rootfs), staging / "wheels")
    checkout = Bind(staging / "checkout", CHECKOUT, read_only=False)  # pip builds in it
    container = Container([systemd_rootfs], [checkout, Bind(staging / "wheels", WHEELS)])
    try:
        container.start()
        install_mail_servers(container)
        for name, text in EDITS.items():
            container.write(f"/root/edits/{name}", text, 0o600)
        container.write("/usr/local/bin/editor", FAKE_EDITOR, 0o755)
        script = SCRIPT_HEAD + doc_commands(README.read_text()) + SCRIPT_TAIL
        container.write("/root/install.sh", script)
        result = container.run("bash", "/root/install.sh", check=False, timeout=600)
        if result.returncode != 0:
            pytest.fail(
                f"the deploy/README.md commands failed\n--- install.sh\n{script}\n"
                f"--- output\n{result.stdout}\n{result.stderr}\n{container.diagnosis(UNIT)}"
            )
        container.stop()
        yield [container.upper, systemd_rootfs]
    finally:
        container.close()


@pytest.fixture
def system(deployment: list[Path]) -> Iterator[Container]:
    """A fresh container booted on the installed system: the service started at boot."""
    with Container(deployment) as container:
        yield container
