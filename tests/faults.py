"""Network faults between the forwarder and a real server: a TCP proxy in a thread.

:class:`FaultProxy` listens on a free loopback port and relays every
connection to a target server (Dovecot, the SMTP sink), byte for byte, from
an asyncio loop running in its own thread.  From the test thread it can, at
any time:

* ``refuse_connections()`` / ``accept_connections()``: close the listening
  socket (new connections get ECONNREFUSED, open ones go on) and reopen it on
  the same port;
* ``drop_all()``: abort every open connection now;
* ``drop_after(n, side=..., after=...)``: arm a one-shot fault that aborts the
  first connection in which ``side`` ("server": what the server sends, e.g. a
  FETCH response; "client": what the client sends, e.g. the DATA section)
  has sent ``n`` more bytes after the marker ``after`` (or after the start
  of the connection).  Exactly those ``n`` bytes are passed on, then both
  ends are aborted.  The returned :class:`Fault` has a ``triggered`` event.
* ``stall_after(n, side=..., after=...)``: the same, but instead of aborting,
  the connection stays open and ``side`` goes silent: nothing more it sends
  is passed on until ``fault.release()`` (or the proxy stops); the other
  direction goes on.  A server that stops answering, a client whose data
  never arrives.

With ``record=True`` the bytes passed on are kept, all connections together:
``recorded("client")`` and ``recorded("server")``, e.g. to check that no
password went over the wire in clear.

Every call that changes the proxy returns once the change is done (no
sleeping): the listener is bound before ``start()`` returns, and
``drop_all()`` waits until the connections are gone.

The ``imap_proxy`` and ``smtp_proxy`` fixtures put a started proxy in front of
the ``mailbox`` Dovecot's IMAP port and the ``smtp_sink``; point the settings
at ``proxy.port``.  They are re-exported by ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest

from tests.servers import LOOPBACK, MailServer, SmtpSink

__all__ = ["Fault", "FaultProxy", "Side", "imap_proxy", "smtp_proxy"]

Side = Literal["client", "server"]
T = TypeVar("T")
_CHUNK = 64 * 1024


@dataclass(eq=False)
class Fault:
    """A one-shot fault armed on a :class:`FaultProxy`."""

    side: Side
    nbytes: int
    after: bytes = b""
    stall: bool = False  # go silent instead of aborting
    triggered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = 10.0) -> bool:
        return self.triggered.wait(timeout)

    def release(self) -> None:
        """A stalled side speaks again: what it sent meanwhile is passed on."""
        self.released.set()


@dataclass(eq=False)
class _Progress:
    """How far one connection is towards one fault."""

    armed: bool = False  # the marker was seen
    tail: bytes = b""  # the last bytes, in case the marker straddles two reads
    count: int = 0  # bytes passed on since the marker

    def cut(self, fault: Fault, chunk: bytes) -> int | None:
        """Where to cut ``chunk`` (bytes to pass on before dropping), or None."""
        offset = 0
        if not self.armed:
            if fault.after:
                window = self.tail + chunk
                found = window.find(fault.after)
                if found < 0:
                    self.tail = window[len(window) - len(fault.after) + 1 :]
                    return None
                offset = found + len(fault.after) - len(self.tail)
            self.armed = True
        remaining = fault.nbytes - self.count
        if len(chunk) - offset >= remaining:
            return offset + remaining
        self.count += len(chunk) - offset
        return None


@dataclass(eq=False)
class _Link:
    """One proxied connection: the client's transport and the one to the server."""

    client: asyncio.StreamWriter
    closed: asyncio.Future[None]  # done once both ends are closed and the link forgotten
    server: asyncio.StreamWriter | None = None
    progress: dict[Fault, _Progress] = field(default_factory=dict)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            if writer is not None:
                writer.transport.abort()


class FaultProxy:
    """A TCP proxy on a free loopback port in front of ``target_host:target_port``."""

    host: str = LOOPBACK

    def __init__(self, target_host: str, target_port: int, *, record: bool = False) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.record = record
        self._recorded: dict[Side, bytearray] = {"client": bytearray(), "server": bytearray()}
        self.port = 0
        self.accepted = 0  # connections accepted since start()
        self._faults: list[Fault] = []
        self._stalls: list[Fault] = []  # released when the proxy drops its connections
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- control

    def start(self, timeout: float = 5.0) -> None:
        """Start the loop thread and listen; return once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("the proxy's event loop did not start")
        self.accept_connections(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, then stop the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self.refuse_connections(timeout)
            self.drop_all(timeout)
        finally:
            self._loop = self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)

    def accept_connections(self, timeout: float = 5.0) -> None:
        """(Re)open the listening socket, on the same port after the first time."""
        self._call(self._listen(), timeout)

    def refuse_connections(self, timeout: float = 5.0) -> None:
        """Close the listening socket: new connections are refused, open ones go on."""
        self._call(self._unlisten(), timeout)

    def drop_all(self, timeout: float = 5.0) -> int:
        """Abort every open connection now; return how many there were."""
        return self._call(self._drop_all(), timeout)

    def drop_after(self, nbytes: int, *, side: Side, after: bytes = b"") -> Fault:
        """Arm a one-shot fault (see the module docstring)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        fault = Fault(side, nbytes, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def stall_after(self, nbytes: int, *, side: Side, after: bytes = b"") -> Fault:
        """Arm a one-shot stall (see the module docstring)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        fault = Fault(side, nbytes, after, stall=True)
        with self._lock:
            self._faults.append(fault)
            self._stalls.append(fault)
        return fault

    def disarm(self) -> None:
        """Forget the faults that have not triggered yet."""
        with self._lock:
            self._faults.clear()

    def recorded(self, side: Side) -> bytes:
        """What ``side`` sent through the proxy so far (with ``record=True``)."""
        with self._lock:
            return bytes(self._recorded[side])

    @property
    def open_connections(self) -> int:
        return self._call(self._count())

    # ---------------------------------------------------------------- loop side

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("FaultProxy not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _count(self) -> int:
        return len(self._links)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=_CHUNK
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def _drop_all(self) -> int:
        with self._lock:
            for fault in self._stalls:
                fault.release()
        links = list(self._links)
        for link in links:
            link.abort()
        await asyncio.gather(*(link.closed for link in links))
        return len(links)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, asyncio.get_running_loop().create_future())
        self._links.add(link)
        self.accepted += 1
        try:
            await self._relay(link, reader, writer)
        finally:
            link.abort()
            self._links.discard(link)
            link.closed.set_result(None)

    async def _relay(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Connect to the target and copy both ways until either end closes."""
        try:
            up_reader, link.server = await asyncio.open_connection(
                self.target_host, self.target_port, limit=_CHUNK
            )
        except OSError:
            return  # the target is down: the client sees the connection closed
        await asyncio.gather(
            self._pump(link, reader, link.server, "client"),
            self._pump(link, up_reader, writer, "server"),
        )

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        side: Side,
    ) -> None:
        """Copy what ``side`` sends to the other end, applying the armed faults."""
        try:
            while chunk := await reader.read(_CHUNK):
                hit = self._check_faults(link, side, chunk)
                if hit is None:
                    self._write(writer, side, chunk)
                    await writer.drain()
                    continue
                fault, cut = hit
                self._write(writer, side, chunk[:cut])
                await writer.drain()
                if fault.stall:
                    fault.triggered.set()
                    await asyncio.to_thread(fault.released.wait)
                    self._write(writer, side, chunk[cut:])
                    await writer.drain()
                    continue
                link.abort()
                fault.triggered.set()
                return
            if writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()  # pass the half-close on
        except (ConnectionError, OSError):
            link.abort()

    def _write(self, writer: asyncio.StreamWriter, side: Side, data: bytes) -> None:
        if self.record:
            with self._lock:
                self._recorded[side] += data
        writer.write(data)

    def _check_faults(self, link: _Link, side: Side, chunk: bytes) -> tuple[Fault, int] | None:
        with self._lock:
            faults = [f for f in self._faults if f.side == side]
        for fault in faults:
            cut = link.progress.setdefault(fault, _Progress()).cut(fault, chunk)
            if cut is None:
                continue
            with self._lock:
                if fault not in self._faults:  # another connection got there first
                    continue
                self._faults.remove(fault)
            return fault, cut
        return None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def imap_proxy(mailbox: MailServer) -> Iterator[FaultProxy]:
    """A started FaultProxy in front of the ``mailbox`` Dovecot's IMAP port."""
    with FaultProxy(mailbox.host, mailbox.imap_port) as proxy:
        yield proxy


@pytest.fixture
def smtp_proxy(smtp_sink: SmtpSink) -> Iterator[FaultProxy]:
    """A started FaultProxy in front of ``smtp_sink``."""
    with FaultProxy(smtp_sink.host, smtp_sink.port) as proxy:
        yield proxy
