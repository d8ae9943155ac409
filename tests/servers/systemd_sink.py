"""An SMTP sink run *inside* a systemd test container (tests/servers/systemd_mail.py).

Started by its unit (Type=notify) as ``python3 systemd_sink.py HOST PORT DIRECTORY``,
with the container's system Python and Debian's python3-aiosmtpd (nothing of the
forwarder's venv).
Every accepted transaction is written to ``DIRECTORY/<n>.json`` (written to a
temporary name, then renamed: a reader never sees half a file) with the envelope
and the DATA bytes exactly as received, base64-encoded. Tells systemd READY=1
once it listens, so ``systemctl start`` returns when it accepts connections.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counter = itertools.count(1)
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "data": base64.b64encode(envelope.original_content).decode(),
        }
        with self.lock:
            n = next(self.counter)
        temporary = self.directory / f".{n:06d}.tmp"
        temporary.write_text(json.dumps(record))
        temporary.rename(self.directory / f"{n:06d}.json")
        return "250 OK"


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def main() -> None:
    host, port, directory = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    directory.mkdir(parents=True, exist_ok=True)
    controller = Controller(
        Recorder(directory), hostname=host, port=port, decode_data=False, enable_SMTPUTF8=True
    )
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    notify("READY=1")
    stop.wait()
    notify("STOPPING=1")
    controller.stop()


if __name__ == "__main__":
    main()
