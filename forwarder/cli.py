"""Command line: parse, load the configuration, call. Nothing else lives here.

Each command is one `Command` in `COMMANDS`: the function to call (imported on use,
so `once` never loads the scheduler), its help, and the configuration it needs:
`full` (every mailbox, passwords and lists included) or `process` (only the
process-wide settings, for commands that never talk to the mail servers: they run
without passwords). Its options are added by `command_options.OPTIONS[name]`; the
function is called as `function(settings, **options)`, one keyword per option's
`dest`. A `--mailbox NAME` is checked against the configured mailboxes first.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from forwarder import __version__
from forwarder.command_options import OPTIONS
from forwarder.config import ProcessSettings, load_process_settings, load_settings
from forwarder.errors import ConfigError
from forwarder.logs import configure_logging, print_error
from forwarder.redact import secret_values


@dataclass(frozen=True)
class Command:
    target: str  # "module:function"
    help: str
    needs: Literal["full", "process"] = "full"


COMMANDS: dict[str, Command] = {
    "once": Command("forwarder.service:run_once", "run one poll cycle, then exit"),
    "run": Command(
        "forwarder.daemon:run_daemon", "poll every FORWARDER_POLL_INTERVAL until SIGTERM/SIGINT"
    ),
    "check": Command(
        "forwarder.service:check",
        "validate the configuration, log in to IMAP and SMTP, print the lists",
    ),
    "status": Command(
        "forwarder.status:show_status",
        "print the last cycle, deferred and failed deliveries (read-only)",
        needs="process",
    ),
    "explain": Command(
        "forwarder.dry_run:explain",
        "route one message file against the lists: who would receive it and why",
    ),
    "baseline": Command(
        "forwarder.baseline:baseline",
        "mark every message now in the folder as handled, without sending (first run)",
    ),
    "retry": Command(
        "forwarder.requeue:retry",
        "put failed or deferred deliveries back in play for the next cycle",
    ),
    "history": Command(
        "forwarder.history:history",
        "what the state store knows of a message, a member or a list (read-only)",
        needs="process",
    ),
    "config": Command(
        "forwarder.config_show:show_config",
        "print the effective settings and where each comes from, secrets masked",
        needs="process",
    ),
}


def _function(command: Command) -> Callable[..., Coroutine[Any, Any, int]]:
    module, _, name = command.target.partition(":")
    function: Callable[..., Coroutine[Any, Any, int]] = getattr(
        importlib.import_module(module), name
    )
    return function


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Distribution lists on top of a catch-all mailbox. Configured through "
        "FORWARDER_* environment variables (or a .env file).",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        subparser = sub.add_parser(name, help=command.help, description=command.help)
        if name in OPTIONS:
            OPTIONS[name](subparser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "command"}
    command = COMMANDS[args.command]
    try:
        settings: ProcessSettings = (
            load_settings() if command.needs == "full" else load_process_settings()
        )
        settings.check_mailbox_name(options.get("mailbox"))
    except ConfigError as exc:
        print_error(f"forwarder: configuration error: {exc}")
        return exc.exit_status
    configure_logging(
        settings.log_format, settings.log_level, secrets=secret_values(settings.secrets())
    )
    return asyncio.run(_function(command)(settings, **options))


if __name__ == "__main__":
    sys.exit(main())
