"""Structured logs: structlog, JSON lines on stdout unless on a terminal.

The standard library's logging (apscheduler, aiosmtplib, asyncio, warnings) goes
through the same processors, so every line has the same shape. Everything the
process writes for a person passes one boundary here:

* secrets (`redact.py`) are masked in the rendered line, where they can only
  appear as one of the spellings redact.py matches (JSON escapes included); the
  console format also masks each key and value before rendering;
* in the console format, control characters (C0, DEL, C1, Unicode line
  separators and bidi overrides) are written as escapes (`\\x1b`, `\\n`,
  `\\u202e`): no terminal escape sequence from a message reaches the terminal.
  JSON escapes them itself (every line is printable ASCII);
* under systemd, when stdout is the journal's stream (`JOURNAL_STREAM` names
  its device and inode), each line starts with its syslog priority `<N>`,
  which journald strips and records as PRIORITY;
* the one-line messages on stderr (`print_error`) and uncaught exceptions get
  the same treatment.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from contextlib import suppress
from types import TracebackType
from typing import Any, Literal, TextIO

import structlog
from pydantic import SecretBytes, SecretStr
from structlog.tracebacks import ExceptionDictTransformer

from forwarder.redact import register_secret, scrub, scrub_bytes

LogFormat = Literal["json", "console"]
ERROR_PRIORITY = 3
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, ERROR_PRIORITY), (logging.WARNING, 4))
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # the console renderer's own colours
_META = frozenset({"_record", "_from_structlog"})  # structlog's own keys: left alone
_MULTILINE = frozenset({"exception", "stack"})  # tracebacks keep their line breaks

log = structlog.get_logger("forwarder")


def default_format() -> LogFormat:
    return "console" if sys.stdout.isatty() else "json"


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with every control character but those in `keep` written as an escape."""
    return _CONTROLS.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


def printable_json(value: object) -> str:
    """JSON with non-ASCII text kept readable, but every control character escaped.

    json.dumps(ensure_ascii=False) escapes C0 only: DEL, C1 (CSI is 0x9b) and the
    line separators and bidi overrides become \\uXXXX (they can only be in strings).
    """
    text = json.dumps(value, ensure_ascii=False)
    return _CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: error 3, warning 4, info 6, debug 7."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 6 if levelno >= logging.INFO else 7


def journal_stream(stream: TextIO) -> bool:
    """True when `stream` is connected to the journal (sd-daemon's JOURNAL_STREAM check)."""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


class _CleanValues:
    """Console format: masks secrets and escapes control characters in every key and value.

    Before rendering, so that a line break in a value cannot pass for one of the
    renderer's own (a traceback's), nor a secret be cut by an escape.
    """

    def __call__(self, logger: Any, name: str, event_dict: Mapping[str, Any]) -> dict[str, Any]:
        return {
            self._text(key): value if key in _META else self._value(value, key in _MULTILINE)
            for key, value in event_dict.items()
        }

    def _text(self, text: str, multiline: bool = False) -> str:
        return escape_controls(scrub(text), "\n" if multiline else "")

    def _value(self, value: Any, multiline: bool = False) -> Any:
        if isinstance(value, str):
            return self._text(value, multiline)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {self._value(k): self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._value(item) for item in value)
        if isinstance(value, bytes | bytearray):
            return scrub_bytes(bytes(value))  # its repr (escaped) if it held a secret
        text = repr(value)  # what either renderer would write
        cleaned = self._text(text)
        return value if cleaned == text else cleaned


class _BoundaryFormatter(structlog.stdlib.ProcessorFormatter):
    """The last step before a line is written: mask, escape, add the priority."""

    def __init__(self, *, console: bool, journal: bool, colours: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.console = console  # JSON lines are printable ASCII already
        self.journal = journal
        self.colours = colours

    def format(self, record: logging.LogRecord) -> str:
        return self._boundary(super().format(record), record.levelno)

    def finish(self, logger: Any, method_name: str, rendered: Any) -> str:
        """Last processor of the forwarder's own events: the same boundary as `format`."""
        return self._boundary(str(rendered), _LEVELS.get(method_name, logging.INFO))

    def _boundary(self, text: str, levelno: int) -> str:
        text = scrub(text)  # with the forms the renderer made (\u00e9 ...)
        if self.console:
            text = _CONTROLS.sub(self._escape_rendered, text)
        if self.journal:
            prefix = f"<{syslog_priority(levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text

    def _escape_rendered(self, match: re.Match[str]) -> str:
        char = match.group()
        if char == "\n":
            return char
        if char == "\x1b" and self.colours:
            tail = match.string[match.start() :]
            if _COLOUR.match(tail):  # values were escaped already: this is the renderer's
                return char
        return _escape(match)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "msg": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "err": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}


class _Flusher:
    """Flushes the log stream from a thread of its own, so that lines written in a burst
    (a `delivery_sent` per member, thousands a second) go out in one system call rather
    than one each. It is woken by the first line written and flushes at once: a line
    waits at most a thread switch (milliseconds). Warnings and errors are flushed by the
    writer itself, and what is left is flushed at exit."""

    def __init__(self) -> None:
        self.handler: logging.StreamHandler[TextIO] | None = None
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None

    def use(self, handler: logging.StreamHandler[TextIO]) -> None:
        self.flush()
        self.handler = handler
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="log-flush", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def request(self) -> None:
        self._wanted.set()

    def flush(self) -> None:
        handler = self.handler
        if handler is not None:
            # A closed stream (at exit, in tests): nothing more to say.
            with handler.lock or threading.RLock(), suppress(OSError, ValueError):
                handler.stream.flush()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self.flush()


_FLUSHER = _Flusher()


class _LineWriter:
    """The structlog logger of the forwarder's own events: writes each rendered line."""

    def __init__(self, handler: logging.StreamHandler[TextIO], name: str | None) -> None:
        self.handler = handler
        self.name = name or "forwarder"  # for add_logger_name

    def _write(self, line: str) -> None:
        handler = self.handler
        with handler.lock or threading.RLock():  # the library lines' lock: whole lines
            handler.stream.write(line + "\n")

    def msg(self, line: str) -> None:
        self._write(line)
        _FLUSHER.request()

    def urgent(self, line: str) -> None:
        self._write(line)
        _FLUSHER.flush()

    debug = info = log = msg
    warning = warn = error = err = exception = critical = fatal = urgent


class _LineWriterFactory:
    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self.handler = handler
        _FLUSHER.use(handler)

    def __call__(self, *args: Any) -> _LineWriter:
        return _LineWriter(self.handler, args[0] if args else None)


def print_error(text: str, stream: TextIO | None = None) -> None:
    """One line for a person on stderr, through the same boundary as the logs."""
    stream = stream or sys.stderr
    line = escape_controls(scrub(text))
    if journal_stream(stream):
        line = f"<{ERROR_PRIORITY}>{line}"
    print(line, file=stream, flush=True)


def _uncaught(
    exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None
) -> None:
    """sys.excepthook: the traceback goes to the log (scrubbed), one line to stderr."""
    name = exc_type.__name__
    text = str(exc) if exc is not None else ""
    log.error("unexpected_error", error=text or name, error_type=name, exc_info=(exc_type, exc, tb))
    print_error(f"forwarder: unexpected error ({name}): {text or name}; traceback in the log")


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    exc = args.exc_value
    log.error(
        "unexpected_error",
        error=str(exc) or args.exc_type.__name__,
        error_type=args.exc_type.__name__,
        thread=args.thread.name if args.thread is not None else None,
        exc_info=(args.exc_type, exc, args.exc_traceback),
    )


def configure_logging(
    fmt: LogFormat | None = None,
    level: str = "info",
    secrets: Iterable[str | SecretStr | SecretBytes | None] = (),
) -> None:
    register_secret(*secrets)
    fmt = fmt or default_format()
    console = fmt == "console"
    colours = console and sys.stdout.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if console:
        # The traceback becomes a plain string value, scrubbed and escaped like the others.
        shared += [structlog.processors.format_exc_info, _CleanValues()]
        renderer = structlog.dev.ConsoleRenderer(
            colors=colours, exception_formatter=structlog.dev.plain_traceback
        )
    else:
        # No local variables in tracebacks: a frame's locals may hold a password, cut short.
        shared.append(
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        )
        renderer = structlog.processors.JSONRenderer()
    boundary = _BoundaryFormatter(
        console=console,
        journal=journal_stream(sys.stdout),
        colours=colours,
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    # The forwarder's own events skip the standard library's logging machinery (a
    # LogRecord, a handler lock, the chain run again in the formatter): rendered once,
    # through the same boundary, written with one call. Library lines take the
    # standard path below, to the same stream.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(boundary)
    structlog.configure(
        processors=[*shared, renderer, boundary.finish],
        logger_factory=_LineWriterFactory(handler),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings become log lines, not raw stderr
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    # Library chatter stays at warning unless debugging. imapclient's debug log shows
    # protocol traffic, so it stays at warning always: no secret ever reaches a log.
    for name in ("apscheduler", "aiosmtplib", "asyncio"):
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("imapclient").setLevel(logging.WARNING)
