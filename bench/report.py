"""The machine description, the targets and the one table (text and JSON)."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _command_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _filesystem(path: Path) -> str | None:
    """The filesystem type holding `path` (from /proc/mounts, longest mount point)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    best = ("", "")
    for fields in mounts:
        point, fstype = fields[1], fields[2]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best[0]):
            best = (point, fstype)
    return f"{best[1]} ({best[0]})" if best[0] else None


def source_digest(root: Path) -> str:
    """sha256 over forwarder/**/*.py (names and contents): which code was measured."""
    digest = hashlib.sha256()
    for path in sorted((root / "forwarder").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def source(root: Path) -> dict[str, Any]:
    """The commit and the uncommitted changes of forwarder/ at the start of the run."""
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--", "forwarder"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return {
        "commit": _command_output(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"]),
        "uncommitted": sorted(line[3:] for line in status.splitlines() if line.strip()),
        "digest_start": source_digest(root),
    }


def machine(workdir: Path) -> dict[str, Any]:
    fetchmail = _command_output(["fetchmail", "--version"])
    forwarder_version: str | None
    try:
        from forwarder import __version__ as forwarder_version
    except ImportError:  # pragma: no cover
        forwarder_version = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_mb": _mem_total_mb(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "sqlite": sqlite3.sqlite_version,
        "dovecot": _command_output(["dovecot", "--version"]),
        "postfix": _command_output(["postconf", "-dh", "mail_version"]),
        "fetchmail": fetchmail.removeprefix("This is fetchmail release ") if fetchmail else None,
        "forwarder": forwarder_version,
        "state_db_filesystem": _filesystem(workdir),
        "loadavg_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Row:
    section: str
    figure: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None  # None: no target for this figure
    note: str = ""

    def shown(self) -> str:
        if self.value is None:
            return "n/a"
        value = self.value
        if abs(value) >= 100 or value == int(value):
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:,.1f}"
        else:
            text = f"{value:,.2f}"
        return f"{text} {self.unit}".strip()

    def verdict(self) -> str:
        return "" if self.met is None else ("yes" if self.met else "MISSED")

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "figure": self.figure,
            "value": self.value,
            "unit": self.unit,
            "target": self.target or None,
            "met": self.met,
            "note": self.note or None,
        }


def target_row(
    section: str,
    figure: str,
    value: float | None,
    unit: str,
    target: str,
    check: Callable[[float], bool],
    note: str = "",
) -> Row:
    met = None if value is None else check(value)
    return Row(section, figure, value, unit, target, met, note)


def render(rows: list[Row]) -> str:
    """A Markdown table (readable as plain text too)."""
    headers = ("", "figure", "value", "target", "met", "note")
    body = [(r.section, r.figure, r.shown(), r.target, r.verdict(), r.note) for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in body)) for i, h in enumerate(headers)]

    def fmt(line: tuple[str, ...]) -> str:
        cells = [
            line[i].rjust(widths[i]) if i == 2 else line[i].ljust(widths[i])
            for i in range(len(headers))
        ]
        return "| " + " | ".join(cells) + " |"

    out = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    previous = None
    for line in body:
        shown = line if line[0] != previous else ("", *line[1:])
        previous = line[0]
        out.append(fmt(shown))
    return "\n".join(out)
