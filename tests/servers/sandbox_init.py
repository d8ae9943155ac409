"""PID 1 of a sandbox (tests/servers/sandbox.py): run as a script, standard library only.

Started by ``unshare --mount --pid --fork --mount-proc`` with the path of a JSON
spec.  It lays the overlays of the spec (each ``{"target", "lower": [...],
"upper", "work"}``, ``upper`` empty for a read-only one), binds a datagram socket
at ``/dev/log`` (``/dev`` must be one of the overlays) and appends every message
it receives to ``spec["syslog"]``, one line each, without its ``<priority>``.
It then runs ``spec["setup"]`` commands one after the other (each must exit 0),
starts ``spec["daemons"]``, and stays until SIGTERM or until a daemon exits: it
then sends SIGTERM to the daemons left, waits for them (SIGKILL after 10 s) and
exits.  Being PID 1 of its namespace, whatever it leaves behind is killed by the
kernel when it exits.  A command is ``{"argv": [...], "env": {...}}``.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

STOP_TIMEOUT = 10.0
_PRIORITY = re.compile(rb"^<\d{1,3}>")


def mount(overlay: dict[str, Any]) -> None:
    options = "lowerdir=" + ":".join(overlay["lower"])
    if overlay.get("upper"):
        options += f",upperdir={overlay['upper']},workdir={overlay['work']}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, overlay["target"]], check=True
    )


def main() -> int:
    with open(sys.argv[1]) as file:
        spec = json.load(file)
    for overlay in spec["overlays"]:
        mount(overlay)
    log_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if os.path.lexists("/dev/log"):
        os.unlink("/dev/log")
    log_socket.bind("/dev/log")
    os.chmod("/dev/log", 0o666)  # daemons log after dropping root
    log = open(spec["syslog"], "ab", buffering=0)  # noqa: SIM115 (open until exit)

    def note(text: str) -> None:
        log.write(f"sandbox: {text}\n".encode())

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    for command in spec["setup"]:
        result = subprocess.run(command["argv"], env=command["env"], capture_output=True)
        if result.returncode != 0:
            note(f"{command['argv']} exited with {result.returncode}: {result.stderr!r}")
            return 1
    daemons = [
        subprocess.Popen(command["argv"], env=command["env"], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=log)
        for command in spec["daemons"]
    ]
    while not stopping and all(d.poll() is None for d in daemons):
        ready, _, _ = select.select([log_socket], [], [], 0.2)
        if ready:
            log.write(_PRIORITY.sub(b"", log_socket.recv(65536)).rstrip(b"\n") + b"\n")
    names = [command["argv"][0] for command in spec["daemons"]]
    for name, daemon in zip(names, daemons, strict=True):
        if daemon.poll() is not None and not stopping:
            note(f"{name} exited with {daemon.returncode}")
        elif daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for name, daemon in zip(names, daemons, strict=True):
        try:
            daemon.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            note(f"{name} still running {STOP_TIMEOUT} s after SIGTERM: killed")
            daemon.kill()
            daemon.wait()
    return 0 if stopping else 1


if __name__ == "__main__":
    sys.exit(main())
