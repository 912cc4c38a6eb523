"""A non-blocking socket whose candidates race in the background.

A blocking or timeout socket races in its own ``connect()``
(:meth:`dmm.race.Race.run`). A non-blocking one cannot: ``connect_ex``
must return ``EINPROGRESS`` at once and the fd must poll writable when the
connection is decided, as a kernel socket's does. So :mod:`dmm.socket`
puts a placeholder under the socket's fd number, an eventfd kept *not*
writable (its counter one below the maximum), hands the race to the
reactor thread (:class:`Background`), and mixes :class:`RacingMethods`
into the socket's class. When the race is decided the reactor drains the
eventfd, so the fd polls writable; the application's next call
(``getsockopt(SO_ERROR)`` as asyncio and selectors loops make, or any
other) takes the winner over under the same fd number.

The placeholder stays the fd's open file until then, so an event loop that
registered the fd keeps its registration valid until it has seen the event.
"""

from __future__ import annotations

import _socket
import errno as _errno
import os as _os
import socket as _std
import sys as _sys
import time as _time
from typing import Any

from . import reactor as _reactor
from . import runtime as _runtime
from ._userspace import with_mixin as _with_mixin

_StdSocket = _std.socket
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__

__all__ = ["Background", "RaceTakeover", "RacingMethods", "placeholder"]

#: The eventfd counter that makes it not writable (the maximum is one more).
_FULL = 0xFFFFFFFFFFFFFFFE


def placeholder() -> int:
    """A new eventfd that polls readable and not writable."""
    fd = _os.eventfd(0, _os.EFD_CLOEXEC | _os.EFD_NONBLOCK)
    _os.eventfd_write(fd, _FULL)
    return fd


class Background:
    """A race stepped by the reactor thread; ``decided`` once it is over."""

    def __init__(self, race: Any, negotiator: Any, family: int, signal_fd: int, cls: type):
        self.race = race
        self.negotiator = negotiator
        self.family = family
        self.signal_fd = signal_fd
        #: The socket's class before :class:`RacingMethods` was mixed in.
        self.cls = cls
        #: Options the application set while the race ran (replayed on the winner).
        self.late_options: list = []
        self.decided = False
        self._fds: set[int] = set()
        self._timer = 0
        self._reactor = _reactor.get()

    def start(self) -> None:
        self._reactor.submit(self._step)

    def _step(self) -> None:
        if self.decided:
            return
        now = _time.monotonic()
        self.race.step(now)
        if self.race.done:
            self._finish()
            return
        specs = self.race.poll_specs()
        live = {fd for fd, _events in specs}
        for fd in self._fds - live:
            self._reactor.unwatch(fd)
        for fd, events in specs:
            self._reactor.watch(fd, events, self._ready)
        self._fds = live
        wait = self.race.wait(now)
        if wait is not None:
            self._timer += 1
            timer = self._timer
            self._reactor.at(now + wait, lambda: timer == self._timer and self._step())

    def _ready(self, _revents: int) -> bool:
        self._step()
        return False  # _step keeps the set of watched fds current

    def _finish(self) -> None:
        for fd in self._fds:
            self._reactor.unwatch(fd)
        self._fds = set()
        self.decided = True
        try:
            self.negotiator.settle(self.race, self.family)
        finally:
            try:
                _os.eventfd_read(self.signal_fd)  # now the fd polls writable
            except OSError:
                pass

    def cancel(self) -> None:
        """The socket closed mid-race: abort every attempt (in the thread)."""

        def cancel() -> None:
            for fd in self._fds:
                self._reactor.unwatch(fd)
            self._fds = set()
            self.decided = True
            self.race.cancel()

        self._reactor.submit(cancel)


def _pending(name: str, code: int):
    def method(self, *args, **kwargs):
        if self._dmm_core.decided:
            self._dmm_finish_race()
            return getattr(self, name)(*args, **kwargs)
        raise OSError(code, _os.strerror(code))

    method.__name__ = name
    method.__doc__ = f"While the race runs: OSError({_errno.errorcode[code]}), as a connecting kernel socket."
    return method


class RacingMethods:
    """The methods of a non-blocking socket while its race runs
    (``_dmm_core`` is its :class:`Background`)."""

    __slots__ = ()

    def connect(self, address):
        if not self._dmm_core.decided:
            raise BlockingIOError(_errno.EALREADY, _os.strerror(_errno.EALREADY))
        err = self._dmm_finish_race()
        if err:
            raise OSError(err, _os.strerror(err))
        raise OSError(_errno.EISCONN, _os.strerror(_errno.EISCONN))

    def connect_ex(self, address):
        if not self._dmm_core.decided:
            return _errno.EALREADY
        return self._dmm_finish_race() or _errno.EISCONN

    def _dmm_get_option(self, level, optname, buflen):
        if level == _std.SOL_SOCKET and optname == _std.SO_ERROR:
            # As a kernel socket: 0 while connecting, then the outcome.
            if not self._dmm_core.decided:
                return 0 if buflen is None else bytes(buflen or 4)
            err = self._dmm_finish_race()
            return err if buflen is None else err.to_bytes(4, _sys.byteorder)[:buflen]
        if self._dmm_core.decided:
            self._dmm_finish_race()
            return self._dmm_get_option(level, optname, buflen)
        raise BlockingIOError(_errno.EAGAIN, "dmm: the connection is still being set up")

    def _dmm_set_option(self, level, optname, value, optlen):
        if self._dmm_core.decided:
            self._dmm_finish_race()
            return self._dmm_set_option(level, optname, value, optlen)
        self._dmm_core.late_options.append((level, optname, value, optlen))

    def _real_close(self, *args):
        bg = self._dmm_core
        if not bg.decided:
            bg.cancel()
        try:
            _os.close(bg.signal_fd)
        except OSError:
            pass
        super()._real_close(*args)

    send = _pending("send", _errno.EAGAIN)
    sendall = _pending("sendall", _errno.EAGAIN)
    sendto = _pending("sendto", _errno.EAGAIN)
    sendmsg = _pending("sendmsg", _errno.EAGAIN)
    recv = _pending("recv", _errno.EAGAIN)
    recv_into = _pending("recv_into", _errno.EAGAIN)
    recvfrom = _pending("recvfrom", _errno.EAGAIN)
    recvfrom_into = _pending("recvfrom_into", _errno.EAGAIN)
    recvmsg = _pending("recvmsg", _errno.EAGAIN)
    getpeername = _pending("getpeername", _errno.ENOTCONN)
    shutdown = _pending("shutdown", _errno.ENOTCONN)


class RaceTakeover:
    """The part of :class:`dmm.socket.socket` that runs a race and becomes
    its winner (a base class of it; it holds no state of its own)."""

    __slots__ = ()

    def _dmm_race(self):
        """Races the candidates in ``_dmm_core`` and takes the winner over.
        A non-blocking socket hands the race to the reactor thread and fails
        with ``EINPROGRESS``, as a kernel socket's connect does."""
        race = self._dmm_core.race()
        rt = _runtime._runtime or _runtime.get()
        timeout = self.gettimeout()
        if timeout == 0.0:
            signal_fd = placeholder()
            _os.dup2(signal_fd, self.fileno(), inheritable=self.get_inheritable())
            bg = Background(race, rt.negotiator, _raw_family(self), signal_fd, type(self))
            self._dmm_core = bg
            self.__class__ = _with_mixin(type(self), RacingMethods)
            bg.start()
            raise BlockingIOError(_errno.EINPROGRESS, _os.strerror(_errno.EINPROGRESS))
        self._dmm_core = None
        try:
            winner = race.run(None if timeout is None else _time.monotonic() + timeout)
        finally:
            rt.negotiator.settle(race, _raw_family(self))
        self._dmm_take_winner(winner)

    def _dmm_take_winner(self, attempt):
        """Becomes the winning attempt's socket, under this fd number."""
        inst = attempt.inst
        if attempt.sock is not None:
            timeout = self.gettimeout()
            _os.dup2(attempt.sock.fileno(), self.fileno(), inheritable=self.get_inheritable())
            attempt.sock.close()
            attempt.sock = None
            # Re-read family, type and protocol from the fd, keep the timeout.
            _socket.socket.__init__(self, -1, -1, -1, self.fileno())
            _StdSocket.settimeout(self, timeout)
            if inst.adopts:
                self._dmm_use_core(inst.adopt(self.fileno(), _raw_family(self), _raw_type(self)))
        else:
            core, attempt.core = attempt.core, None
            self._dmm_use_userspace(core)
        inst.count("connect")
        self._dmm_stack = attempt.name
        self._dmm_opts = None

    def _dmm_finish_race(self):
        """After a background race: takes the winner over (0), or puts a
        fresh kernel socket back under the fd and returns the errno."""
        bg = self._dmm_core
        self.__class__ = bg.cls
        self._dmm_core = None
        winner = bg.race.winner
        try:
            if winner is not None:
                self._dmm_take_winner(winner)
                for level, optname, value, optlen in bg.late_options:
                    self.setsockopt(level, optname, value) if optlen is None else self.setsockopt(level, optname, value, optlen)
                return 0
            new = _socket.socket(_raw_family(self), _raw_type(self), self.proto)
            _os.dup2(new.fileno(), self.fileno(), inheritable=self.get_inheritable())
            new.close()
            _StdSocket.setblocking(self, False)
            return bg.race.error().errno or _errno.ECONNREFUSED
        finally:
            _os.close(bg.signal_fd)

