"""Socket methods for sockets whose data lives in a Rust core socket.

:mod:`dmm.socket` mixes these into a socket's class when the router places
it on a stack (``_with_mixin``), so sockets that stay plain kernel sockets
pay nothing for them:

* :class:`CoreMethods`: the data methods go through ``_dmm_core``, a core
  socket over the socket's own kernel fd (kernel instances with
  ``io = "uring"``);
* :class:`UserSpaceMethods`: every method goes to the core socket of a
  user-space stack (FillP, smoltcp, memory); the fd is that socket's
  readiness eventfd, listed in :data:`user_space` so that selectors find
  its write-readiness fd.
"""

from __future__ import annotations

import _socket
import errno as _errno
import io as _io
import operator as _operator
import os as _os
import stat as _stat
import socket as _std
import sys as _sys
import threading as _threading
import weakref as _weakref

__all__ = ["GONE", "CoreMethods", "UserSpaceMethods", "detached", "is_ip", "not_supported", "option_bytes", "refusing",
           "forget", "release", "retain", "take_detached", "user_space", "with_mixin", "write_poll_fd"]

# The C getters: plain ints, without the stdlib properties' enum conversion.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__

#: Open sockets on user-space stacks by fd number. Their fd (a readiness
#: eventfd) polls readable exactly when they are readable but is always
#: writable, so :mod:`dmm.selectors` polls their ``write_poll_fd`` instead.
user_space: _weakref.WeakValueDictionary = _weakref.WeakValueDictionary()

#: Core sockets with more than one handle (``dup()``, ``fromfd()``, a
#: detached fd): id -> handles. A core closes with its last handle, as a
#: kernel socket closes with its last fd.
_handles: dict[int, int] = {}
_handles_lock = _threading.Lock()

#: Fds given away by ``detach()``: fd -> (core, stack, family, type, proto),
#: so that ``socket(fileno=fd)`` and ``fromfd(fd)`` find the socket again.
detached: dict[int, tuple] = {}


def retain(core):
    """Counts one more handle on ``core``."""
    with _handles_lock:
        _handles[id(core)] = _handles.get(id(core), 1) + 1


def release(core):
    """Counts one handle of ``core`` gone; whether it was the last."""
    with _handles_lock:
        left = _handles.pop(id(core), 1) - 1
        if left > 1:
            _handles[id(core)] = left
        return left <= 0


def take_detached(fd):
    """The detached user-space socket whose fd is ``fd``, taken off the
    list, or ``None``. An entry whose number now holds something else (the
    program closed the fd and the number was reused: a socket, or nothing)
    is stale: its connection is closed and ``None`` returned."""
    entry = detached.pop(fd, None)
    if entry is None:
        return None
    try:
        stale = _stat.S_ISSOCK(_os.fstat(fd).st_mode)  # ours is an eventfd
    except OSError:
        stale = True
    if stale:
        forget(entry)
        return None
    return entry


def forget(entry):
    """Drops a detached socket's handle on its core (closing the
    connection if it was the last)."""
    core = entry[0]
    if release(core):
        try:
            core.close()
        except OSError:
            pass


def write_poll_fd(fd):
    """For the fd of an open dmm socket on a user-space stack (FillP,
    smoltcp): an fd that polls readable exactly while that socket is
    writable. ``None`` for any other fd, whose own ``POLLOUT`` is exact."""
    sock = user_space.get(fd)
    if sock is None:
        return None
    try:
        return sock._dmm_core.write_poll_fd()
    except (AttributeError, OSError):
        return None


def refusing(name, code, why, doc):
    """A method ``name`` that raises ``OSError(code)``; ``why`` is formatted
    with ``name`` and ``stack``."""

    def method(self, *args, **kwargs):
        raise OSError(code, why.format(name=name, stack=self._dmm_stack))

    method.__name__ = name
    method.__doc__ = doc
    return method


def not_supported(name):
    """A method ``name`` that user-space stacks do not have (EOPNOTSUPP)."""
    return refusing(name, _errno.EOPNOTSUPP, "{name}() is not supported on a {stack} socket",
                    "Not supported on user-space stacks: raises OSError(EOPNOTSUPP).")


def option_bytes(value):
    """A setsockopt value as the bytes the core takes (an int is a C int)."""
    return value.to_bytes(4, _sys.byteorder, signed=True) if isinstance(value, int) else bytes(value)


class CoreMethods:
    """Data methods that go through the Rust core socket in ``_dmm_core``
    (kernel instances with ``io = "uring"``)."""

    __slots__ = ()

    def send(self, data, flags=0):
        return self._dmm_core.send(data, flags)

    def sendall(self, data, flags=0):
        return self._dmm_core.sendall(data, flags)

    def recv(self, bufsize, flags=0):
        return self._dmm_core.recv(bufsize, flags)

    def recv_into(self, buffer, nbytes=0, flags=0):
        return self._dmm_core.recv_into(buffer, nbytes, flags)

    def settimeout(self, value):
        super().settimeout(value)
        if self._dmm_core is not None:  # None: a dup() not yet given its core
            self._dmm_core.settimeout(self.gettimeout())

    def setblocking(self, flag):
        super().setblocking(flag)
        if self._dmm_core is not None:
            self._dmm_core.settimeout(self.gettimeout())

    def dup(self):
        # A new kernel fd on the same connection; a core socket is over one
        # fd, so the duplicate gets a core of its own on the same stack.
        from . import runtime

        sock = super().dup()
        inst = (runtime._runtime or runtime.get()).stacks[self._dmm_stack]
        sock._dmm_use_core(inst.adopt(sock.fileno(), _raw_family(self), _raw_type(self)))
        return sock

    def detach(self):
        # The core forgets the fd without closing it: the fd leaves with
        # detach(), and this object's calls now fail as on a closed fd.
        core, self._dmm_core = self._dmm_core, GONE
        core.close()
        return super().detach()

    def _real_close(self, *args):
        if self._dmm_core is GONE:  # detached: the core went with the fd
            return super()._real_close(*args)
        if user_space.get(self.fileno()) is self:
            del user_space[self.fileno()]
        try:
            if release(self._dmm_core):
                self._dmm_core.close()
        finally:
            super()._real_close(*args)


class UserSpaceMethods(CoreMethods):
    """Every socket method goes to the Rust core socket of a user-space
    stack. The fd is that socket's readiness eventfd."""

    __slots__ = ()

    def connect(self, address):
        return self._dmm_core.connect(self._dmm_numeric(address))

    def connect_ex(self, address):
        try:
            self._dmm_core.connect(self._dmm_numeric(address))
        except OSError as exc:
            if exc.errno is None:
                raise
            return exc.errno
        return 0

    def _dmm_numeric(self, address, call="connect"):
        """``address`` with a numeric host, checked as the stdlib's C code
        checks it (the same TypeError/OverflowError for a bad one)."""
        family = _raw_family(self)
        _check_address(address, family, call)
        host, port = address[0], address[1]
        if not is_ip(host, family):
            address = _std.getaddrinfo(host, port, family, _raw_type(self))[0][4]
        return address

    def bind(self, address):
        return self._dmm_core.bind(self._dmm_numeric(address, "bind"))

    def listen(self, *backlog):
        return self._dmm_core.listen(backlog[0] if backlog else 128)

    def accept(self):
        while True:
            core, addr = self._dmm_core.accept()
            sock = self._dmm_accepted(None, core, self._dmm_stack)
            if self._dmm_admit(sock, addr):
                return sock, addr

    def sendto(self, data, *args):
        flags, address = (0, args[0]) if len(args) == 1 else args
        return self._dmm_core.sendto(data, flags, self._dmm_numeric(address, "sendto"))

    def recvfrom(self, bufsize, flags=0):
        return self._dmm_core.recvfrom(bufsize, flags)

    def recvfrom_into(self, buffer, nbytes=0, flags=0):
        return self._dmm_core.recvfrom_into(buffer, nbytes, flags)

    def sendfile(self, file, offset=0, count=None):
        return self._sendfile_use_send(file, offset, count)

    def shutdown(self, how):
        return self._dmm_core.shutdown(how)

    def getsockname(self):
        return self._dmm_core.getsockname()

    def getpeername(self):
        return self._dmm_core.getpeername()

    def _dmm_set_option(self, level, optname, value, optlen):
        return self._dmm_core.setsockopt(level, optname, option_bytes(value))

    def _dmm_get_option(self, level, optname, buflen):
        raw = self._dmm_core.getsockopt(level, optname, buflen or 4)
        if buflen is None:
            return int.from_bytes(raw[:4], _sys.byteorder, signed=True)
        return raw

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        # Scatter-gather only: there is no ancillary data to send on a
        # user-space stack, so any is refused rather than dropped. The
        # arguments are checked as the C method checks them first.
        views = [memoryview(b) for b in buffers]
        items = [_ancillary_item(item) for item in ancdata]
        flags = _operator.index(flags)
        if items:
            raise OSError(_errno.EOPNOTSUPP, f"ancillary data is not supported on a {self._dmm_stack} socket")
        data = b"".join(views)
        if address is None:
            return self._dmm_core.send(data, flags)
        return self._dmm_core.sendto(data, flags, self._dmm_numeric(address, "sendto"))

    def recvmsg(self, bufsize, ancbufsize=0, flags=0):
        bufsize, ancbufsize, flags = _operator.index(bufsize), _operator.index(ancbufsize), _operator.index(flags)
        if bufsize < 0 or ancbufsize < 0:
            raise ValueError("negative buffer size in recvmsg()")
        data, address = self._dmm_core.recvfrom(bufsize, flags)
        return data, [], 0, address

    def recvmsg_into(self, buffers, ancbufsize=0, flags=0):
        views = [memoryview(b) for b in buffers]
        if any(v.readonly for v in views):
            raise TypeError("recvmsg_into() argument 1 must be an iterable of writable buffers")
        views = [v.cast("B") for v in views]
        ancbufsize, flags = _operator.index(ancbufsize), _operator.index(flags)
        if ancbufsize < 0:
            raise ValueError("negative buffer size in recvmsg_into()")
        total = sum(len(v) for v in views)
        data, address = self._dmm_core.recvfrom(total, flags)
        at = 0
        for v in views:
            n = min(len(v), len(data) - at)
            v[:n] = data[at:at + n]
            at += n
        return len(data), [], 0, address

    def _sendfile_use_sendfile(self, file, offset=0, count=None):
        # No zero-copy path out of a user-space stack: os.sendfile() on the
        # placeholder fd would fail, so the copying path does the work. It
        # gives up where the stdlib's does (no real file), for sendfile()
        # to fall back the same way.
        try:
            size = _os.fstat(file.fileno()).st_size
        except (AttributeError, _io.UnsupportedOperation, OSError) as err:
            raise _std._GiveupOnSendfile(err)
        if not size:
            return 0
        return self._sendfile_use_send(file, offset, count)

    def dup(self):
        # A second handle on the same core socket, with its own fd number (a
        # duplicate of the readiness eventfd) and a copy of the timeout. The
        # core closes with the last handle. Unlike the kernel's, both
        # handles share one timeout: the core socket holds it.
        from .socket import socket  # the plain dmm class (this module is mixed into it)

        sock = socket(_raw_family(self), _raw_type(self), self.proto)
        sock.settimeout(self.gettimeout())
        sock._dmm_stack = self._dmm_stack
        retain(self._dmm_core)
        sock._dmm_use_userspace(self._dmm_core)
        return sock

    def detach(self):
        # The fd leaves with the core socket behind it: socket(fileno=fd)
        # or fromfd(fd) takes it up again. This object keeps nothing of it,
        # so its calls fail as on a closed fd and its close() releases no
        # handle.
        fd = self.fileno()
        if user_space.get(fd) is self:
            del user_space[fd]
        detached[fd] = (self._dmm_core, self._dmm_stack, _raw_family(self), _raw_type(self), self.proto)
        self._dmm_core = GONE
        return super(CoreMethods, self).detach()  # past CoreMethods': the core is kept


class _Gone:
    """Stands in for the core socket of a socket whose fd was detached:
    every call fails with ``EBADF``, as on a closed kernel socket."""

    __slots__ = ()

    def __getattr__(self, name):
        def closed(*args, **kwargs):
            raise OSError(_errno.EBADF, "Bad file descriptor")

        return closed

    def __repr__(self):
        return "<detached>"


#: The core of a detached socket (see :class:`_Gone`).
GONE = _Gone()


def _ancillary_item(item):
    """One ``sendmsg`` ancillary item checked as the C method checks it:
    a ``(level, type, data)`` sequence of two ints and a bytes-like object,
    else ``TypeError``."""
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise TypeError("ancillary data items must be (level, type, data) sequences")
    level, kind, data = item
    return _operator.index(level), _operator.index(kind), memoryview(data)


def is_ip(host, family):
    """Whether ``host`` is a numeric address of ``family`` (zone allowed)."""
    try:
        _std.inet_pton(family, host.partition("%")[0] if family == _std.AF_INET6 else host)
    except (OSError, TypeError, ValueError):
        return False
    return True


_mixed_classes: dict[tuple[type, type], type] = {}


def with_mixin(cls, mixin):
    """``cls`` with ``mixin``'s methods first, same layout, cached."""
    if issubclass(cls, mixin):
        return cls
    derived = _mixed_classes.get((cls, mixin))
    if derived is None:
        derived = type(cls.__name__, (mixin, cls),
                       {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _mixed_classes[(cls, mixin)] = derived
    return derived


def _check_address(address, family, call):
    """Raises what CPython's socket module raises for an ``AF_INET`` or
    ``AF_INET6`` address of the wrong shape."""
    name = "AF_INET6" if family == _std.AF_INET6 else "AF_INET"
    if not isinstance(address, tuple):
        raise TypeError(f"{call}(): {name} address must be tuple, not {type(address).__name__}")
    if family == _std.AF_INET6:
        if not 2 <= len(address) <= 4:
            raise TypeError("AF_INET6 address must be a tuple (host, port[, flowinfo[, scopeid]])")
    elif len(address) != 2:
        raise TypeError("AF_INET address must be a pair (host, port)")
    host, port = address[0], address[1]
    if not isinstance(host, (str, bytes, bytearray)):
        raise TypeError(f"str, bytes or bytearray expected, not {type(host).__name__}")
    for extra in address[1:]:
        if not isinstance(extra, int):
            raise TypeError(f"'{type(extra).__name__}' object cannot be interpreted as an integer")
    if not 0 <= port <= 65535:
        raise OverflowError(f"{call}(): port must be 0-65535.")
    if len(address) > 2 and not 0 <= address[2] <= 0xFFFFF:
        raise OverflowError(f"{call}(): flowinfo must be 0-1048575.")
