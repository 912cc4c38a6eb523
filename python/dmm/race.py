"""Racing candidate stacks for one connection, as RFC 8305 races addresses.

A connect whose decision leaves several candidates (stack instances that
may reach the peer in different ways: FillP over UDP, kernel TCP, smoltcp
over a LAN) starts the first, then the next one after the connection-attempt
delay, or at once when an attempt fails hard (refused, unreachable). The
first attempt to complete wins; the others are aborted (a reset, so the
server keeps no half-open connection). What happened is learned in L-RD:
the winner speaks its protocol (with the connect time, which later shortens
the attempt delay), an attempt that was refused or never answered does not.

:class:`Race` is the engine, sans socket facade: it owns one socket per
attempt and is stepped by whoever waits (the connecting thread for a
blocking or timeout socket, the RD thread for a non-blocking one). The dmm
socket then takes the winner over under its own fd number
(:meth:`dmm.socket.socket._dmm_take_winner`).
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket as _std
import sys
import time
from typing import Any, Optional

__all__ = ["Attempt", "Race"]

_LINGER_ABORT = b"\x01\x00\x00\x00\x00\x00\x00\x00"
#: Failures that say "not here" at once: the next candidate starts now, and
#: the protocol is remembered as not spoken.
_HARD = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET, errno.EPROTO,
         errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL}
#: Of those, the ones that are about the peer's port, not the path.
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}


class Attempt:
    """One candidate's connection attempt: a non-blocking socket of its own."""

    __slots__ = ("name", "inst", "protocol", "sock", "core", "started", "finished", "error")

    def __init__(self, name: str, inst: Any):
        self.name = name
        self.inst = inst
        self.protocol = inst.protocol
        self.sock = None  # kernel attempts: a _socket.socket
        self.core = None  # user-space attempts: a core socket
        self.started = 0.0
        self.finished = 0.0
        self.error: Optional[OSError] = None

    def start(self, family: int, type_: int, options: list, bind: Optional[tuple], address: tuple) -> None:
        """Starts connecting; a failure that shows at once is kept in ``error``."""
        self.started = time.monotonic()
        try:
            if self.inst.keeps_fd:
                self._start_kernel(family, type_, options, bind, address)
            else:
                self._start_core(family, type_, bind, address)
        except OSError as exc:
            self._fail(exc)

    def _start_kernel(self, family, type_, options, bind, address):
        self.sock = s = _socket.socket(family, type_, self.inst.stream_protocol)
        s.setblocking(False)
        for level, optname, value, optlen in options:
            try:
                s.setsockopt(level, optname, value) if optlen is None else s.setsockopt(level, optname, value, optlen)
            except OSError:
                pass  # an option the other protocol lacks; the stand-in took it
        if bind is not None:
            s.bind(bind)
        err = s.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))

    def _start_core(self, family, type_, bind, address):
        self.core = core = self.inst.handover(family, type_, 0, bind).core
        core.settimeout(0.0)
        try:
            core.connect(address)
        except BlockingIOError:
            pass

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self.finished = time.monotonic()
        self.close(abort=True)

    def poll_spec(self) -> Optional[tuple[int, int]]:
        """The fd and events that say this attempt may have finished."""
        if self.finished:
            return None
        if self.sock is not None:
            return self.sock.fileno(), select.POLLOUT
        if self.core is not None:
            return self.core.write_poll_fd(), select.POLLIN
        return None

    def check(self) -> bool:
        """Whether it finished (won, or failed with ``error``)."""
        if self.finished:
            return True
        try:
            if self.sock is not None:
                if not select.select([], [self.sock], [], 0)[1]:
                    return False
                err = self.sock.getsockopt(_std.SOL_SOCKET, _std.SO_ERROR)
            else:
                _readable, writable, error = self.core.readiness()
                if not (writable or error):
                    return False
                err = int.from_bytes(self.core.getsockopt(_std.SOL_SOCKET, _std.SO_ERROR, 4), sys.byteorder)
                if err == 0:
                    self.core.getpeername()  # raises if it is not connected after all
        except OSError as exc:
            self._fail(exc)
            return True
        if err:
            self._fail(OSError(err, os.strerror(err)))
            return True
        self.finished = time.monotonic()
        return True

    @property
    def hard_failure(self) -> bool:
        """Failed in a way that says "not here" (refused, unreachable)."""
        return self.error is not None and self.error.errno in _HARD

    def close(self, abort: bool = False) -> None:
        """Closes the attempt's socket; ``abort`` resets a connection that
        may have completed, so the server is left with nothing half-open."""
        for obj in (self.sock, self.core):
            if obj is None:
                continue
            try:
                if abort:
                    obj.setsockopt(_std.SOL_SOCKET, _std.SO_LINGER, _LINGER_ABORT)
            except OSError:
                pass
            try:
                obj.close()
            except OSError:
                pass
        self.sock = self.core = None


class Race:
    """Candidates raced for one connect (see the module docs).

    ``delay`` is the connection-attempt delay; ``sequential`` starts the next
    candidate only when the previous one failed (racing off for the route);
    candidates from index ``last_resort`` on start only when every earlier
    one failed.
    """

    def __init__(self, candidates: list[tuple[str, Any]], family: int, type_: int, address: tuple,
                 options: list, bind: Optional[tuple], delay: float, sequential: bool = False,
                 last_resort: Optional[int] = None):
        self.attempts = [Attempt(name, inst) for name, inst in candidates]
        self.family = family
        self.type = type_
        self.address = address
        self.options = options
        self.bind = bind
        self.delay = delay
        self.sequential = sequential
        self.last_resort = len(self.attempts) if last_resort is None else last_resort
        self.next = 0  # index of the next attempt to start
        self.next_at = 0.0
        self.winner: Optional[Attempt] = None
        self.started_at = 0.0

    def first_failed(self, exc: OSError) -> bool:
        """The first candidate was tried outside the race (on the socket
        itself) and failed with ``exc``: records it, and says whether the
        rest should now race (a hard failure, and there are others)."""
        if exc.errno not in _HARD or len(self.attempts) < 2:
            return False
        first = self.attempts[0]
        first.started = first.finished = time.monotonic()
        first.error = exc
        self.next = 1
        self.last_resort = max(self.last_resort, 1)
        return True

    @property
    def done(self) -> bool:
        """Decided: a winner, or every candidate failed."""
        return self.winner is not None or (self.next >= len(self.attempts) and all(a.finished for a in self.attempts))

    def error(self) -> OSError:
        """The error to report when every candidate failed: the first one
        that is not a plain refusal (it says more), else the first."""
        errors = [a.error for a in self.attempts if a.error is not None]
        for e in errors:
            if e.errno not in _REFUSED:
                return e
        return errors[0] if errors else OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))

    def step(self, now: float) -> None:
        """Starts what is due and collects what finished."""
        if self.started_at == 0.0:
            self.started_at = now
        for a in self.attempts[:self.next]:
            if a.finished or not a.check():
                continue
            if a.error is None:
                self.winner = a
                self._cancel_others(a)
                return
        while self.next < len(self.attempts) and self._may_start(now):
            a = self.attempts[self.next]
            self.next += 1
            a.start(self.family, self.type, self.options, self.bind, self.address)
            self.next_at = now + self.delay
            if a.finished and a.error is None:  # connected at once (loopback)
                self.winner = a
                self._cancel_others(a)
                return

    def _may_start(self, now: float) -> bool:
        running = [a for a in self.attempts[:self.next] if not a.finished]
        if not running:
            return True  # nothing left in flight: a failure starts the next at once
        return not self.sequential and self.next < self.last_resort and now >= self.next_at

    def _cancel_others(self, winner: Attempt) -> None:
        for a in self.attempts:
            if a is not winner and not a.finished:
                a.close(abort=True)

    def wait(self, now: float) -> Optional[float]:
        """Seconds until the race needs a step with nothing polled ready
        (the next attempt's start), or ``None``."""
        if self.next < self.last_resort and not self.sequential:
            return max(0.0, self.next_at - now)
        return None

    def poll_specs(self) -> list[tuple[int, int]]:
        """The fds and events of the attempts in flight."""
        return [spec for a in self.attempts[:self.next] if (spec := a.poll_spec()) is not None]

    def cancel(self) -> None:
        """Aborts every attempt (the connect gave up: timeout, signal, close)."""
        for a in self.attempts:
            a.close(abort=True)

    def run(self, deadline: Optional[float]) -> Attempt:
        """Steps the race in this thread until it is decided: the winner, or
        the error of :meth:`error`; ``TimeoutError`` at ``deadline``."""
        try:
            while True:
                now = time.monotonic()
                self.step(now)
                if self.winner is not None:
                    return self.winner
                if self.done:
                    raise self.error()
                wait = self.wait(now)
                if deadline is not None:
                    left = deadline - now
                    if left <= 0:
                        raise TimeoutError("timed out")
                    wait = left if wait is None else min(wait, left)
                poller = select.poll()
                for fd, events in self.poll_specs():
                    poller.register(fd, events)
                poller.poll(None if wait is None else max(1, int(wait * 1000 + 0.999)))
        except BaseException:
            self.cancel()
            raise
