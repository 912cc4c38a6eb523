"""One dmm socket that listens on several stacks at once.

:mod:`dmm.socket` mixes :class:`MultiListenMethods` into a listening
socket's class when its decision names several stacks; its ``_dmm_core``
is then a :class:`ListenGroup`. The socket's fd becomes an epoll fd over the
members (a kernel listening socket, and the readiness fds of user-space
listeners), so it polls readable when any member has a connection waiting,
and ``selectors``, ``socketserver`` and asyncio work on it unchanged.
"""

from __future__ import annotations

import _socket
import errno as _errno
import os as _os
import select as _select
import socket as _std
import sys as _sys
import time as _time

from ._userspace import not_supported, option_bytes, refusing

__all__ = ["AdvertisedMethods", "ListenGroup", "MultiListenMethods"]

_raw_family = _socket.socket.family.__get__


class _Wake:
    """An eventfd that lives exactly as long as its last holder: an accept()
    still waiting keeps it (and so its event in the epoll) alive."""

    __slots__ = ("fd",)

    def __init__(self):
        self.fd = _os.eventfd(0, _os.EFD_CLOEXEC | _os.EFD_NONBLOCK)

    def __del__(self):
        _os.close(self.fd)


class ListenGroup:
    """The member listeners of one dmm socket that listens on several stacks."""

    __slots__ = ("stacks", "names", "members", "epoll", "wake", "next")

    def __init__(self, stacks, names):
        self.stacks = stacks  # the runtime's instances by name
        self.names = tuple(names)
        self.members = []  # (name, kernel _socket.socket or None, core socket or None)
        self.epoll = None
        self.wake = None  # eventfd in the epoll, written once by close()
        self.next = 0  # round robin, so one busy stack cannot starve another

    def open_user_space(self, family, host, port, backlog):
        """Makes the user-space members listen on ``port``; returns the name
        of the stack the kernel member should be (the first named that keeps
        its fd: a kernel port has one listener), or ``None``."""
        kernel = None
        for name in self.names:
            inst = self.stacks[name]
            if inst.keeps_fd:
                kernel = kernel or name
                continue
            core = inst.listener(family, (host, port), backlog)
            core.settimeout(0.0)
            self.members.append((name, None, core))
        return kernel

    def add_kernel(self, name, fd):
        """Adds the kernel member: ``fd``, a listening kernel socket."""
        ksock = _socket.socket(fileno=fd)
        ksock.setblocking(False)
        self.members.insert(0, (name, ksock, None))

    def seal(self, sock):
        """Puts an epoll fd over the members under ``sock``'s fd number."""
        self.epoll = _select.epoll()
        for _name, ksock, core in self.members:
            self.epoll.register(ksock.fileno() if ksock is not None else core.poll_fd(), _select.EPOLLIN)
        self.wake = _Wake()
        self.epoll.register(self.wake.fd, _select.EPOLLIN)
        _os.dup2(self.epoll.fileno(), sock.fileno(), inheritable=sock.get_inheritable())
        for name, _ksock, core in self.members:
            if core is not None:
                self.stacks[name].count("listen")

    def accept_one(self):
        """The next waiting connection from any member, or ``None``:
        ``(stack name, kernel fd or None, core socket or None, address)``."""
        n = len(self.members)
        for i in range(n):
            name, ksock, core = self.members[(self.next + i) % n]
            try:
                if ksock is not None:
                    fd, addr = ksock._accept()
                    conn = (name, fd, None, addr)
                else:
                    conn_core, addr = core.accept()
                    conn = (name, None, conn_core, addr)
            except (BlockingIOError, InterruptedError):
                continue
            self.next = (self.next + i + 1) % n
            return conn
        return None

    def close(self):
        for _name, ksock, core in self.members:
            try:
                if ksock is not None:
                    ksock.close()
                else:
                    core.close()
            except OSError:
                pass
        self.members = []
        # Wake any thread blocked in accept(): it finds the group closed and
        # raises EBADF, as accept() on a closed socket does. The epoll and
        # eventfd are not closed here: a waiter still holds them, and closing
        # the eventfd would pull its event off the ready list before the
        # waiter saw it. They close when the last reference goes.
        wake, self.wake, self.epoll = self.wake, None, None
        if wake is not None:
            _os.eventfd_write(wake.fd, 1)


def _listening(name):
    return refusing(name, _errno.ENOTCONN, "{name}() on a listening socket",
                    "A listening socket has no peer: raises OSError(ENOTCONN).")


class MultiListenMethods:
    """A socket listening on several stacks at once (``_dmm_core`` is its
    :class:`ListenGroup`). ``accept()`` returns the next connection from any
    of them, as a dmm socket of the stack it arrived on."""

    __slots__ = ()

    def listen(self, *backlog):
        group = self._dmm_core
        if group.epoll is not None:
            return
        backlog = backlog[0] if backlog else 128
        family = _raw_family(self)
        if _socket.socket.getsockname(self)[1] == 0:
            _socket.socket.bind(self, ("::" if family == _std.AF_INET6 else "0.0.0.0", 0))
        host, port = _socket.socket.getsockname(self)[:2]
        try:
            kernel = group.open_user_space(family, host, port, backlog)
            if kernel is not None:
                # The kernel member is the socket itself, moved to a new fd.
                self._dmm_move_to(kernel, "listen")
                _socket.socket.listen(self, backlog)
                group.add_kernel(kernel, _os.dup(self.fileno()))
            group.seal(self)
        except BaseException:
            group.close()
            raise

    def accept(self):
        group = self._dmm_core
        if group.epoll is None:
            raise OSError(_errno.EINVAL, "Invalid argument")
        timeout = self.gettimeout()
        deadline = None if not timeout else _time.monotonic() + timeout
        while True:
            epoll, wake = group.epoll, group.wake  # held: close() may drop them
            if epoll is None:  # closed by another thread while we waited
                raise OSError(_errno.EBADF, "Bad file descriptor")
            conn = group.accept_one()
            if conn is not None:
                name, fd, core, addr = conn
                sock = self._dmm_accepted(fd, core, name)
                if self._dmm_admit(sock, addr):
                    return sock, addr
                continue
            if timeout == 0.0:
                raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
            wait = -1 if deadline is None else deadline - _time.monotonic()
            if deadline is not None and wait <= 0:
                raise TimeoutError("timed out")
            epoll.poll(wait)  # EINTR: handlers run, then it retries (PEP 475)
            del wake

    def getsockname(self):
        name, ksock, core = self._dmm_core.members[0]
        return ksock.getsockname() if ksock is not None else core.getsockname()

    def _dmm_set_option(self, level, optname, value, optlen):
        for _name, ksock, core in self._dmm_core.members:
            if ksock is not None:
                ksock.setsockopt(level, optname, value) if optlen is None else ksock.setsockopt(level, optname, value, optlen)
            else:
                try:
                    core.setsockopt(level, optname, option_bytes(value))
                except OSError as exc:
                    if exc.errno != _errno.ENOPROTOOPT:
                        raise

    def _dmm_get_option(self, level, optname, buflen):
        _name, ksock, core = self._dmm_core.members[0]
        if ksock is not None:
            return ksock.getsockopt(level, optname) if buflen is None else ksock.getsockopt(level, optname, buflen)
        raw = core.getsockopt(level, optname, buflen or 4)
        return int.from_bytes(raw[:4], _sys.byteorder, signed=True) if buflen is None else raw

    def shutdown(self, how):
        for _name, ksock, core in self._dmm_core.members:
            ksock.shutdown(how) if ksock is not None else core.shutdown(how)

    def _real_close(self, *args):
        try:
            self._dmm_core.close()
        finally:
            super()._real_close(*args)

    @property
    def dmm_stacks(self):
        return self._dmm_core.names if not self._dmm_core.members else tuple(m[0] for m in self._dmm_core.members)

    def dmm_counters(self):
        return {}

    getpeername = _listening("getpeername")
    connect = _listening("connect")
    connect_ex = _listening("connect_ex")
    send = _listening("send")
    sendall = _listening("sendall")
    sendto = _listening("sendto")
    sendmsg = _listening("sendmsg")
    sendfile = _listening("sendfile")
    recv = _listening("recv")
    recv_into = _listening("recv_into")
    recvfrom = _listening("recvfrom")
    recvfrom_into = _listening("recvfrom_into")
    recvmsg = _listening("recvmsg")
    recvmsg_into = _listening("recvmsg_into")
    dup = not_supported("dup")


class AdvertisedMethods:
    """A listener registered in L-RD: closing it withdraws the advertisement."""

    __slots__ = ()

    def _real_close(self, *args):
        from . import runtime

        rt = runtime._runtime
        try:
            address = self.getsockname()
        except OSError:
            address = None
        try:
            super()._real_close(*args)
        finally:
            if rt is not None and rt.negotiator is not None and address is not None:
                rt.negotiator.withdraw(address[0], address[1])
