"""What a systemd test container is made of: a cached Debian root file system, and the
wheels and checkout that stand in for the network inside it.

The root file system is built once with ``mmdebstrap --variant=minbase`` (about
35 s) and cached under ``$XDG_CACHE_HOME/forwarder-tests`` (default
``~/.cache``), keyed by its suite and package list: changing
:data:`ROOTFS_PACKAGES` builds a new one and removes the old. On a fresh machine
(CI) it is simply built. Concurrent test sessions build it once (a file lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ROOTFS_PACKAGES",
    "ROOTFS_SUITE",
    "cache_dir",
    "cached_rootfs",
    "container_python",
    "copy_checkout",
    "download_wheels",
    "rootfs_key",
]

ROOTFS_SUITE = "bookworm"
ROOTFS_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "procps",
    "python3-venv",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "python3-aiosmtpd",
)
ROOTFS_BUILD_TIMEOUT = 900.0


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "forwarder-tests"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``, held for the ``with`` block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def rootfs_key() -> str:
    recipe = [ROOTFS_SUITE, "minbase", sorted(ROOTFS_PACKAGES), platform.machine()]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def cached_rootfs(cache: Path) -> Path:
    """The root file system for :data:`ROOTFS_PACKAGES`: from the cache, or built now.

    Built into a ``.partial`` directory and renamed when complete, so that an
    interrupted build is never used; older keys are removed (about 330 MB each).
    """
    final = cache / f"rootfs-{rootfs_key()}"
    with _locked(cache / "rootfs.lock"):
        if final.is_dir():
            return final
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        command = [
            "mmdebstrap",
            "--variant=minbase",
            f"--include={','.join(ROOTFS_PACKAGES)}",
            ROOTFS_SUITE,
            str(partial),
        ]
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=ROOTFS_BUILD_TIMEOUT,
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}"
            )
        partial.rename(final)
        for stale in cache.glob("rootfs-*"):
            if stale.is_dir() and stale != final:
                shutil.rmtree(stale, ignore_errors=True)
    return final


def container_python(rootfs: Path) -> str:
    """The ``X.Y`` version of the root file system's python3."""
    return os.readlink(rootfs / "usr/bin/python3").removeprefix("python")  # "python3.11"


def download_wheels(project: Path, python_version: str, dest: Path) -> None:
    """Wheels of the project's dependencies and build requirements, for ``python_version``.

    The container has no network: there, ``pip install`` takes them from ``dest``
    (``--no-index --find-links``) as it would from PyPI. Downloaded with the test
    environment's pip, from the package registry ``make venv`` uses (about 2 s).
    """
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    requirements = [*pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"]]
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--dest", str(dest), "--only-binary=:all:", "--python-version", python_version,
        *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{result.stderr[-3000:]}")


def copy_checkout(project: Path, dest: Path) -> None:
    """The checkout as an administrator would have it: sources, no caches or venv."""
    junk = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "build", "dist",
        "*.db", "*.db-*",
    )  # fmt: skip
    shutil.copytree(project, dest, ignore=junk, symlinks=True)
