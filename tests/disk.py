"""A real file system that fills up: a small tmpfs mounted for one test.

:class:`SmallDisk` mounts a tmpfs of a few MiB on a fresh directory (the tests
run as root), puts the state file there, and from any thread can ``fill()`` it
to the last byte with a filler file (every write that needs a new block then
fails with ENOSPC, as on a full disk) and ``free()`` it again. The ``small_disk``
fixture unmounts it after the test, whatever the test left running on it.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["SmallDisk", "small_disk"]


class SmallDisk:
    """A tmpfs of `size` bytes mounted on `path`."""

    def __init__(self, path: Path, size: int = 4 * 1024 * 1024) -> None:
        self.path = path
        self.size = size
        self.filler = path / "filler"
        self.mounted = False

    def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.path)],
            check=True,
            capture_output=True,
        )
        self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            # lazy: a process killed by the test may still hold a file open for a moment
            subprocess.run(["umount", "--lazy", str(self.path)], check=True, capture_output=True)
            self.mounted = False

    @property
    def available(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self) -> int:
        """Write the filler until not one more byte fits; return the bytes it took."""
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for chunk in (1024 * 1024, 4096, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        written += os.write(fd, block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    """A mounted 4 MiB tmpfs (root only), unmounted after the test; another size with
    `@pytest.mark.parametrize("small_disk", [bytes], indirect=True)`."""
    disk = SmallDisk(tmp_path / "small-disk", getattr(request, "param", 4 * 1024 * 1024))
    disk.mount()
    try:
        yield disk
    finally:
        disk.unmount()
