"""One background thread per process for dmm's own I/O: L-RD store writes,
discovery queries, and the races of non-blocking sockets.

Jobs are plain callables run in the thread; they may :meth:`Reactor.watch`
an fd (a callback when it polls ready) or schedule a callback with
:meth:`Reactor.at`. Nothing here blocks an application thread: submitting a
job appends to a deque and writes an eventfd. The thread starts on first
use, and again in a child after ``fork()``.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import threading
import time
from typing import Callable, Optional

__all__ = ["Reactor", "get"]

log = logging.getLogger("dmm")


class Reactor:
    """A poll loop in a daemon thread (see the module docs)."""

    def __init__(self, name: str = "dmm-reactor"):
        self.name = name
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._pid = 0
        self._wake_fd = -1
        self._watched: dict[int, tuple[int, Callable[[int], bool]]] = {}
        self._timers: list[tuple[float, Callable[[], None]]] = []
        #: Run on every turn, for periodic work (the callable decides if it is due).
        self.every_turn: list[Callable[[float], None]] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Runs ``job`` in the thread, soon."""
        if self._pid != os.getpid():
            self._start()
        self._jobs.append(job)
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    def watch(self, fd: int, events: int, on_ready: Callable[[int], bool]) -> None:
        """In the thread: calls ``on_ready(revents)`` when ``fd`` polls ready
        for ``events``, until it returns True."""
        self._watched[fd] = (events, on_ready)

    def unwatch(self, fd: int) -> None:
        """In the thread: stops watching ``fd``."""
        self._watched.pop(fd, None)

    def at(self, when: float, job: Callable[[], None]) -> None:
        """In the thread: runs ``job`` at ``time.monotonic()`` ``when``."""
        self._timers.append((when, job))

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # First use, or a forked child: the parent's thread is not here.
            self._watched.clear()
            self._timers.clear()
            self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._pid = os.getpid()
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # the thread must outlive any one bad job
                log.exception("dmm: %s: a job failed", self.name)

    def _turn(self) -> None:
        while self._jobs:
            self._jobs.popleft()()
        now = time.monotonic()
        for job in self.every_turn:
            job(now)
        due = [t for t in self._timers if t[0] <= now]
        if due:
            self._timers = [t for t in self._timers if t[0] > now]
            for _when, job in due:
                job()
        wait = min((t[0] for t in self._timers), default=now + 1.0) - time.monotonic()
        poller = select.poll()
        poller.register(self._wake_fd, select.POLLIN)
        for fd, (events, _cb) in self._watched.items():
            poller.register(fd, events)
        for fd, revents in poller.poll(max(0.0, min(wait, 1.0)) * 1000):
            if fd == self._wake_fd:
                try:
                    os.eventfd_read(self._wake_fd)
                except OSError:
                    pass
                continue
            entry = self._watched.get(fd)
            if entry is not None and entry[1](revents):
                self._watched.pop(fd, None)


_reactor = Reactor()


def get() -> Reactor:
    """The process's reactor."""
    return _reactor
