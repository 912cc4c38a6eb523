"""A selector with exact read *and* write readiness for dmm sockets.

A dmm socket on a user-space stack (FillP, smoltcp) keeps its fd number, but
the fd under it is a readiness eventfd: it polls readable exactly when the
socket is readable, so ``select``, ``poll`` and the stdlib selectors wait for
reading correctly. An eventfd always polls *writable*, though, so a program
that waits for writability (asyncio's transports and ``sock_sendall`` do,
whenever a send returns ``EAGAIN``) would wake at once and spin until the
send buffer drains.

:class:`EpollSelector` here is ``selectors.EpollSelector`` with one
difference: for such a socket, write interest is registered on the socket's
``write_poll_fd``, an eventfd the stack keeps readable exactly while the
socket is writable (connected with room in its send buffer, or an error to
report; once full, writable again when half the buffer is free, as the
kernel does). Every other fd is polled as the stdlib polls it.

``dmm run`` (and :func:`dmm.patch.patch_all`) installs it as
``selectors.DefaultSelector``, which is what ``asyncio``'s default event loop
and ``socketserver`` create. Without patching, pass it yourself::

    loop = asyncio.SelectorEventLoop(dmm.selectors.DefaultSelector())
"""

from __future__ import annotations

import math
import select
import selectors
from collections.abc import Mapping

from .socket import write_poll_fd

__all__ = ["DefaultSelector", "EpollSelector", "EVENT_READ", "EVENT_WRITE"]

EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE

# What a polled fd stands for: the registered fd's own readiness, or one
# event of a user-space socket.
_NATIVE = 0


def _fd_of(fileobj) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class _KeyMap(Mapping):
    """The selector's ``get_map()``: file object -> key."""

    def __init__(self, selector: EpollSelector):
        self._selector = selector

    def __len__(self):
        return len(self._selector._keys)

    def __getitem__(self, fileobj):
        fd = self._selector._lookup(fileobj)
        try:
            return self._selector._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None

    def __iter__(self):
        return iter(self._selector._keys)


def _native_mask(events: int) -> int:
    """The epoll mask for ``events`` on an fd whose own readiness is exact."""
    return (select.EPOLLIN if events & EVENT_READ else 0) | (select.EPOLLOUT if events & EVENT_WRITE else 0)


class EpollSelector(selectors.EpollSelector):
    """``selectors.EpollSelector`` with exact write readiness for dmm sockets
    on user-space stacks (see the module docs). A subclass, so that
    ``isinstance`` checks hold; every method is its own (the stdlib's
    ``_selector_cls`` is what it polls with)."""

    def __init__(self):  # not the stdlib's: the state is its own
        self._epoll = self._selector_cls()
        self._keys: dict[int, selectors.SelectorKey] = {}
        # Polled fd -> (registered fd, what it stands for).
        self._polled: dict[int, tuple[int, int]] = {}
        # Registered fd -> the write_poll_fd polled for it.
        self._write_fds: dict[int, int] = {}
        self._map = _KeyMap(self)

    def _lookup(self, fileobj) -> int:
        """The fd a file object was registered with; a closed one (no
        ``fileno`` any more) is found by identity, as the stdlib does."""
        try:
            return _fd_of(fileobj)
        except ValueError:
            for key in self._keys.values():
                if key.fileobj is fileobj:
                    return key.fd
            raise

    # The stdlib implementation's helpers, for code that reaches for them.
    _fileobj_lookup = _lookup

    def _key_from_fd(self, fd):
        return self._keys.get(fd)

    def _add(self, key: selectors.SelectorKey) -> None:
        fd, events = key.fd, key.events
        wfd = write_poll_fd(fd) if events & EVENT_WRITE else None
        if wfd is None:
            self._epoll.register(fd, _native_mask(events))
            self._polled[fd] = (fd, _NATIVE)
            return
        if events & EVENT_READ:
            self._epoll.register(fd, select.EPOLLIN)
            self._polled[fd] = (fd, EVENT_READ)
        try:
            self._epoll.register(wfd, select.EPOLLIN)
        except OSError:
            self._drop(fd)
            raise
        self._polled[wfd] = (fd, EVENT_WRITE)
        self._write_fds[fd] = wfd

    def _drop(self, fd: int) -> None:
        for polled in (fd, self._write_fds.pop(fd, None)):
            if polled is None or self._polled.get(polled, (None, 0))[0] != fd:
                continue
            del self._polled[polled]
            try:
                self._epoll.unregister(polled)
            except OSError:
                pass  # closed already: epoll forgot it by itself

    def register(self, fileobj, events, data=None):
        if not events or events & ~(EVENT_READ | EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        fd = _fd_of(fileobj)
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {fd}) is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._add(key)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj):
        fd = self._lookup(fileobj)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        self._drop(fd)
        return key

    def modify(self, fileobj, events, data=None):
        fd = self._lookup(fileobj)
        try:
            key = self._keys[fd]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            if not events or events & ~(EVENT_READ | EVENT_WRITE):
                raise ValueError(f"Invalid events: {events!r}")
            new = key._replace(events=events, data=data)
            try:
                if fd in self._write_fds or (events & EVENT_WRITE and write_poll_fd(fd) is not None):
                    self._drop(fd)
                    self._add(new)
                else:  # one fd polled for both: one syscall
                    self._epoll.modify(fd, _native_mask(events))
            except BaseException:
                # As the stdlib: a failed modify leaves the fd unregistered.
                self._keys.pop(fd, None)
                self._drop(fd)
                raise
            key = new
        elif data is not key.data:
            key = key._replace(data=data)
        self._keys[fd] = key
        return key

    def select(self, timeout=None):
        if timeout is None:
            timeout = -1
        elif timeout <= 0:
            timeout = 0
        else:
            # epoll counts milliseconds: round up, so a short timeout still
            # waits rather than spinning.
            timeout = math.ceil(timeout * 1e3) * 1e-3
        ready = self._epoll.poll(timeout, max(len(self._polled), 1))
        found: dict[int, int] = {}
        for polled, ev in ready:
            owner = self._polled.get(polled)
            if owner is None:
                continue
            fd, stands_for = owner
            if stands_for == _NATIVE:
                events = 0
                if ev & ~select.EPOLLIN:
                    events |= EVENT_WRITE
                if ev & ~select.EPOLLOUT:
                    events |= EVENT_READ
            else:
                events = stands_for
            found[fd] = found.get(fd, 0) | events
        result = []
        for fd, events in found.items():
            key = self._keys.get(fd)
            if key is not None and key.events & events:
                result.append((key, key.events & events))
        return result

    def get_map(self):
        return self._map  # None once closed, which get_key() reports

    def fileno(self) -> int:
        """The epoll fd (readable when some registered fd is ready)."""
        return self._epoll.fileno()

    def close(self):
        self._epoll.close()
        self._map = None
        self._keys.clear()
        self._polled.clear()
        self._write_fds.clear()


#: The selector ``dmm run`` makes the stdlib's default.
DefaultSelector = EpollSelector
