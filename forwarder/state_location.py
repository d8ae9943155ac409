"""Where the state file lives when FORWARDER_STATE_DB is not set: never the working
directory, so a manual `forwarder once` finds the service's state wherever it is run.

1. `$STATE_DIRECTORY/state.db`: systemd's `StateDirectory=` (its first entry);
2. `/var/lib/forwarder/state.db` for root;
3. `${XDG_STATE_HOME:-~/.local/state}/forwarder/state.db` for any other user.

The default's directory is created (mode 0700) when the store is opened for writing;
an explicit FORWARDER_STATE_DB must name a file in a directory that exists.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from forwarder.errors import StateError

FILE_NAME = "state.db"
ROOT_DIRECTORY = Path("/var/lib/forwarder")


def default_state_db(environ: Mapping[str, str], euid: int, home: Path) -> tuple[Path, str]:
    """The default state file and why (for `forwarder config`)."""
    state_directory = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return Path(state_directory) / FILE_NAME, "$STATE_DIRECTORY (systemd StateDirectory=)"
    if euid == 0:
        return ROOT_DIRECTORY / FILE_NAME, "for root"
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "forwarder" / FILE_NAME, "$XDG_STATE_HOME/forwarder"
    return home / ".local" / "state" / "forwarder" / FILE_NAME, "~/.local/state/forwarder"


def current_default() -> tuple[Path, str]:
    return default_state_db(os.environ, os.geteuid(), Path.home())


def create_default_directory(path: Path) -> None:
    """Create the default state file's directory (0700), its parents as needed."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(
            f"cannot create the state directory {path.parent} ({exc.strerror or exc})",
            settings=("FORWARDER_STATE_DB",),
            advice="set it to a file in a directory this user can write",
        ) from None
