"""The threads that run the blocking calls of `forwarder run` (imapclient, the state store).

The event loop's default executor (`asyncio.to_thread` and `run_in_executor(None)` use it),
replacing the standard `ThreadPoolExecutor` for three reasons:

* **daemon threads**: a call blocked on a server that went silent (a login, a DNS lookup)
  never holds up the exit; the standard pool joins every thread at interpreter exit, so
  one blocked IMAP read kept a stopping process alive for the full IMAP timeout;
* **bounded and elastic**: at most `max_workers` threads, started on demand and ended
  after `idle_exit` seconds without work, so that the burst of a thousand mailboxes
  logging in at start does not keep a thousand threads;
* **progress**: each call notes, when it completes, the progress of the mailbox worker
  that submitted it (the callable in `PROGRESS`, a context variable read at submit time:
  `asyncio.to_thread` submits from the calling task). The daemon's watchdog stops
  pinging systemd when a cycle has completed no call for too long.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")
PROGRESS: ContextVar[Callable[[], None] | None] = ContextVar("forwarder_progress", default=None)

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]
_Work = tuple[_Item, Callable[[], None] | None]


class DaemonThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor by type (asyncio's default executor must be one), with its own
    threads: `submit` and `shutdown` are replaced, nothing of the base class is used."""

    def __init__(
        self, max_workers: int, *, idle_exit: float = 30.0, name: str = "forwarder"
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        super().__init__(max_workers=1, thread_name_prefix=name)
        self.max_workers = max_workers
        self.idle_exit = idle_exit
        self.name = name
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work
        self._shutdown = False
        self._count = 0

    @property
    def threads(self) -> int:
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        note = PROGRESS.get()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._queue.put(((future, fn, args, kwargs), note))
            if self._idle > 0:
                self._idle -= 1  # that thread is taken
            elif len(self._threads) < self.max_workers:
                self._count += 1
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{self._count}", daemon=True
                )
                self._threads.add(thread)
                thread.start()
        return future

    def _work(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                work = self._queue.get(timeout=self.idle_exit)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counted on this thread: it may go
                        self._idle -= 1
                        self._threads.discard(me)
                        return
                continue  # a submit took this thread just now: its work is coming
            if work is None:  # shutdown
                with self._lock:
                    self._threads.discard(me)
                return
            (future, fn, args, kwargs), note = work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                finally:
                    if note is not None:
                        note()
            del work, future, fn, args, kwargs  # nothing kept alive while idle
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; threads end once the queue is drained. `wait` waits one second at
        most: a thread blocked on a dead server is a daemon thread and is left behind
        (the process exits without it)."""
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    work = self._queue.get_nowait()
                except queue.Empty:
                    break
                if work is not None:
                    work[0][0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            deadline = time.monotonic() + 1.0
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
