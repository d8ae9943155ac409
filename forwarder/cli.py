"""Command line: parse, load the configuration, call. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from forwarder import __version__
from forwarder.config import load_settings
from forwarder.daemon import run_daemon
from forwarder.errors import ConfigError
from forwarder.logs import configure_logging
from forwarder.service import check, run_once
from forwarder.status import show_status

COMMANDS = {
    "once": (run_once, "run one poll cycle, then exit"),
    "run": (run_daemon, "poll every FORWARDER_POLL_INTERVAL seconds until SIGTERM/SIGINT"),
    "check": (check, "validate the configuration, log in to IMAP and SMTP, print the lists"),
    "status": (show_status, "print the last cycle, deferred and failed deliveries (read-only)"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Distribution lists on top of a catch-all mailbox. Configured through "
        "FORWARDER_* environment variables (or a .env file).",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if name == "status":
            subparser.add_argument(
                "--json", action="store_true", help="one JSON object, for scripts"
            )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"forwarder: configuration error: {exc}", file=sys.stderr)
        return exc.exit_status
    configure_logging(settings.log_format, settings.log_level)
    if args.command == "status":
        return asyncio.run(show_status(settings, as_json=args.json))
    command = COMMANDS[args.command][0]
    return asyncio.run(command(settings))


if __name__ == "__main__":
    sys.exit(main())
