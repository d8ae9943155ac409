"""Command line: parse, load the configuration, call. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from forwarder import __version__
from forwarder.command_options import OPTIONS
from forwarder.config import load_settings
from forwarder.errors import ConfigError
from forwarder.logs import configure_logging, print_error
from forwarder.redact import secret_values

# name -> (module:function, help). Imported on use: `once` never loads the scheduler.
COMMANDS = {
    "once": ("forwarder.service:run_once", "run one poll cycle, then exit"),
    "run": (
        "forwarder.daemon:run_daemon",
        "poll every FORWARDER_POLL_INTERVAL seconds until SIGTERM/SIGINT",
    ),
    "check": (
        "forwarder.service:check",
        "validate the configuration, log in to IMAP and SMTP, print the lists",
    ),
    "status": (
        "forwarder.status:show_status",
        "print the last cycle, deferred and failed deliveries (read-only)",
    ),
    "explain": (
        "forwarder.dry_run:explain",
        "route one message file against the lists: who would receive it and why",
    ),
    "baseline": (
        "forwarder.baseline:baseline",
        "mark every message now in the folder as handled, without sending (first run)",
    ),
    "retry": (
        "forwarder.requeue:retry",
        "put failed or deferred deliveries back in play for the next cycle",
    ),
    "history": (
        "forwarder.history:history",
        "what the state store knows of a message, a member or a list (read-only)",
    ),
}


def _command(name: str) -> Callable[..., Coroutine[Any, Any, int]]:
    module, _, function = COMMANDS[name][0].partition(":")
    command: Callable[..., Coroutine[Any, Any, int]] = getattr(
        importlib.import_module(module), function
    )
    return command


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
                "--json", dest="as_json", action="store_true", help="one JSON object, for scripts"
            )
        if name in OPTIONS:
            OPTIONS[name](subparser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print_error(f"forwarder: configuration error: {exc}")
        return exc.exit_status
    configure_logging(settings.log_format, settings.log_level, secrets=secret_values(settings))
    command = _command(args.command)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    return asyncio.run(command(settings, **options))


if __name__ == "__main__":
    sys.exit(main())
