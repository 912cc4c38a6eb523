"""A drop-in replacement for the stdlib :mod:`socket` module.

``import dmm.socket as socket`` and the program's sockets are routed, one by
one, to a stack instance at ``connect()``, ``listen()`` or the first
``sendto()`` (see :mod:`dmm.runtime` for the order of a decision). Until
then a dmm socket is an ordinary kernel socket, so options, ``bind()`` and
``fileno()`` work from the start; the fd number never changes.

The module is organised like gevent's: names it re-implements
(``__implements__``), names it re-exports from the stdlib unchanged
(``__imports__``) and its own additions (``__extensions__``). ``__all__`` is
their union and a test checks it against the stdlib's.

dmm's additions on every socket:

* ``stack=`` (constructor keyword) or ``setsockopt(SOL_DMM, DMM_STACK, b"name")``:
  ask for a stack instance, before the decision is made;
* ``properties=`` or ``setsockopt(SOL_DMM, DMM_PROPERTIES, b"k=v;k2=v2")``:
  application properties that policy hooks see;
* ``sock.dmm_stack``: the instance carrying the socket (``None`` before the
  decision, and for socket families dmm does not route, such as AF_UNIX);
* ``sock.dmm_counters()``: per-socket counters (for kernel TCP, from
  ``TCP_INFO``: bytes, segments, retransmits, RTT, delivery rate).
"""

from __future__ import annotations

import errno as _errno
import os as _os
import select as _select
import sys as _sys
import time as _time
import weakref as _weakref
import socket as _std
import _socket

from . import policy as _policy
from . import runtime as _runtime

#: The stdlib class, captured before any patching (after ``patch_all()``,
#: ``socket.socket`` is our own class).
_StdSocket = _std.socket

__implements__ = ["socket", "create_connection", "create_server", "socketpair", "fromfd"]
__extensions__ = ["SOL_DMM", "DMM_STACK", "DMM_PROPERTIES", "stack_counters", "write_poll_fd"]
__imports__ = [name for name in _std.__all__ if name not in __implements__]

for _name in __imports__:
    globals()[_name] = getattr(_std, _name)
del _name
# Used by http.client and others through the module, though not in __all__.
_GLOBAL_DEFAULT_TIMEOUT = _std._GLOBAL_DEFAULT_TIMEOUT
SocketIO = _std.SocketIO

__all__ = __implements__ + __imports__ + __extensions__

#: The socket option level of dmm's own options (not a kernel level).
SOL_DMM = 0x444D4D
#: ``setsockopt(SOL_DMM, DMM_STACK, b"name")``: ask for a stack instance.
DMM_STACK = 1
#: ``setsockopt(SOL_DMM, DMM_PROPERTIES, b"k=v;k2=v2")``: properties for hooks.
DMM_PROPERTIES = 2

_INET = (_std.AF_INET, _std.AF_INET6)
_NOT_ROUTED = ""  # marks sockets dmm does not route (AF_UNIX, raw, ...)
# The C getters: plain ints, without the stdlib properties' enum conversion,
# which costs more than the rest of a routing decision.
_raw_family = _socket.socket.family.__get__
_raw_type = _socket.socket.type.__get__
_inet_pton = _socket.inet_pton


def _is_ip(host, family):
    """Whether ``host`` is a numeric address of ``family`` (zone allowed)."""
    try:
        _inet_pton(family, host.partition("%")[0] if family == _std.AF_INET6 else host)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _parse_properties(value: bytes) -> dict[str, str]:
    props = {}
    for item in value.decode().split(";"):
        if not item.strip():
            continue
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"DMM_PROPERTIES expects 'key=value;...', got {item!r}")
        props[key.strip()] = val.strip()
    return props


class socket(_StdSocket):
    """A stdlib-compatible socket whose stack is chosen by dmm's router.

    Accepts the stdlib's arguments plus ``stack`` (the name of an instance to
    use, bypassing hooks and rules) and ``properties`` (a mapping that policy
    hooks receive).
    """

    __slots__ = ("_dmm_stack", "_dmm_core", "_dmm_override", "_dmm_props", "_dmm_host", "_dmm_opts")

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None, *, stack=None, properties=None):
        super().__init__(family, type, proto, fileno)
        self._dmm_stack = None if _raw_family(self) in _INET else _NOT_ROUTED
        self._dmm_core = None
        self._dmm_override = stack
        self._dmm_props = dict(properties) if properties else {}
        self._dmm_host = None
        self._dmm_opts = None

    def __repr__(self):
        text = super().__repr__()
        if self._dmm_stack:
            text = text[:-1] + f", stack={self._dmm_stack}>"
        return text

    # -- routing ----------------------------------------------------------------

    def _dmm_route(self, role, address):
        """Chooses the stack for this socket; returns ``address`` made numeric."""
        if self._dmm_stack is not None:  # already routed, or never routed
            return address
        rt = _runtime._runtime
        if rt is not None and rt.plain_kernel is not None and self._dmm_override is None and not _policy._hooks:
            # Nothing to decide and nothing to change: the socket stays as it is.
            rt.plain_kernel.count(role)
            self._dmm_stack = rt.only
            return address
        if not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[1], int):
            return address  # malformed: the C method raises the stdlib's own error
        host, port = address[0], address[1]
        family = _raw_family(self)
        if not isinstance(host, str) or not _is_ip(host, family):
            infos = _std.getaddrinfo(host, port, family, _raw_type(self))
            address = infos[0][4]
            if isinstance(host, str):
                self._dmm_host = host
            host, port = address[0], address[1]
        rt = _runtime._runtime or _runtime.get()
        if rt.only is not None and self._dmm_override is None and not _policy._hooks:
            name = rt.only
        else:
            request = _policy.Request(role=role, family=family, type=_raw_type(self), address=host.partition("%")[0],
                                      port=port, host=self._dmm_host, properties=dict(self._dmm_props))
            outcome = rt.decide(request, self._dmm_override)
            name = outcome.stack
            if len(outcome.stacks) > 1:
                # Listens on several stacks: the members are made by listen().
                self._dmm_core = _ListenGroup(rt, outcome.stacks)
                self._dmm_stack = name
                self.__class__ = _with_mixin(type(self), _MultiListenMethods)
                return address
        rt.stacks[name].attach(self, role)
        self._dmm_stack = name
        self._dmm_opts = None
        return address

    def _dmm_reopen(self, proto):
        """Replaces the kernel socket under this fd number with one of another
        protocol (TCP <-> MPTCP), replaying the options set so far and the
        bound address."""
        timeout = self.gettimeout()
        bound = None
        try:
            local = _StdSocket.getsockname(self)
            if local[1] != 0:
                bound = local
        except OSError:
            pass
        new = _socket.socket(self.family, self.type, proto)
        try:
            for level, optname, value, optlen in self._dmm_opts or ():
                if optlen is None:
                    new.setsockopt(level, optname, value)
                else:
                    new.setsockopt(level, optname, value, optlen)
            _os.dup2(new.fileno(), self.fileno(), inheritable=self.get_inheritable())
        finally:
            new.close()
        # Re-read family, type and protocol from the fd, keep the timeout.
        _socket.socket.__init__(self, -1, -1, -1, self.fileno())
        _StdSocket.settimeout(self, timeout)
        if bound is not None:
            _StdSocket.bind(self, bound)

    def _dmm_use_core(self, core):
        """Sends this socket's data through a Rust core socket from now on
        (the fd stays the kernel socket: io_uring kernel instances)."""
        self._dmm_core = core
        core.settimeout(self.gettimeout())
        self.__class__ = _with_mixin(type(self), _CoreMethods)

    def _dmm_use_userspace(self, core):
        """Hands the whole socket to a user-space stack's core socket.

        The kernel socket under our fd number is replaced (``dup2``) by the
        core socket's readiness eventfd, so ``fileno()`` keeps its number and
        polls readable exactly when the socket is readable."""
        timeout = self.gettimeout()
        core.settimeout(timeout)
        # Options set before routing (SO_LINGER, TCP_NODELAY...) went to the
        # kernel socket standing in; the core takes those it has. The rest
        # stay as silent as the stand-in left them.
        for level, optname, value, optlen in self._dmm_opts or ():
            if optlen is not None:
                continue
            if isinstance(value, int):
                value = value.to_bytes(4, _sys.byteorder, signed=True)
            try:
                core.setsockopt(level, optname, bytes(value))
            except OSError:
                pass
        _os.dup2(core.poll_fd(), self.fileno(), inheritable=self.get_inheritable())
        self._dmm_core = core
        self.__class__ = _with_mixin(type(self), _UserSpaceMethods)
        _user_space[self.fileno()] = self

    # -- methods that route ------------------------------------------------------

    def bind(self, address):
        # A socket that named its stack is routed here, so that a user-space
        # stack binds its own port instead of a kernel socket taking it first.
        if self._dmm_stack is None and self._dmm_override is not None and isinstance(address, tuple):
            address = self._dmm_route("listen", address)
            if isinstance(self, _UserSpaceMethods):
                return _UserSpaceMethods.bind(self, address)
        return super().bind(address)

    def connect(self, address):
        if self._dmm_stack is None:
            address = self._dmm_route("connect", address)
            if isinstance(self, _UserSpaceMethods):
                return _UserSpaceMethods.connect(self, address)
        return super().connect(address)

    def connect_ex(self, address):
        if self._dmm_stack is None:
            try:
                address = self._dmm_route("connect", address)
            except _std.gaierror:
                raise
            except OSError as exc:
                if exc.errno is None:
                    raise
                return exc.errno
            if isinstance(self, _UserSpaceMethods):
                return _UserSpaceMethods.connect_ex(self, address)
        return super().connect_ex(address)

    def listen(self, *backlog):
        if self._dmm_stack is None:
            try:
                local = self.getsockname()
            except OSError:
                local = ("::" if self.family == _std.AF_INET6 else "0.0.0.0", 0)
            self._dmm_route("listen", local)
            if isinstance(self, _MultiListenMethods):
                return _MultiListenMethods.listen(self, *backlog)
            if isinstance(self, _UserSpaceMethods):
                return _UserSpaceMethods.listen(self, *backlog)
        return super().listen(*backlog)

    def sendto(self, *args):
        # (data, address) or (data, flags, address); anything else is left to
        # the C method, so errors read exactly as the stdlib's.
        if self._dmm_stack is None and len(args) in (2, 3):
            dest = args[-1]
            if isinstance(dest, tuple) and len(dest) >= 2:
                args = args[:-1] + (self._dmm_route("sendto", dest),)
                if isinstance(self, _UserSpaceMethods):
                    return _UserSpaceMethods.sendto(self, *args)
        return super().sendto(*args)

    def sendmsg(self, buffers, *args):
        if self._dmm_stack is None and len(args) > 2 and args[2] is not None:
            args = args[:2] + (self._dmm_route("sendto", args[2]),) + args[3:]
        return super().sendmsg(buffers, *args)

    def accept(self):
        while True:
            fd, addr = self._accept()
            sock = _adopt_kernel(self, fd, self._dmm_stack)
            if _admitted(self, sock, addr):
                return sock, addr

    def dup(self):
        sock = super().dup()
        sock._dmm_stack = self._dmm_stack
        return sock

    # -- options -----------------------------------------------------------------

    def setsockopt(self, level, optname, value, optlen=None):
        if level == SOL_DMM:
            self._dmm_setopt(optname, value)
            return
        if optlen is None:
            super().setsockopt(level, optname, value)
        else:
            super().setsockopt(level, optname, value, optlen)
        if self._dmm_stack is None and (_runtime._runtime is None or _runtime._runtime.plain_kernel is None):
            # Kept so that a change of protocol at routing time can replay them.
            if self._dmm_opts is None:
                self._dmm_opts = []
            self._dmm_opts.append((level, optname, value, optlen))

    def getsockopt(self, level, optname, buflen=None):
        if level == SOL_DMM:
            if optname == DMM_STACK:
                return (self._dmm_stack or "").encode()
            if optname == DMM_PROPERTIES:
                return ";".join(f"{k}={v}" for k, v in self._dmm_props.items()).encode()
            raise OSError(_errno.ENOPROTOOPT, "Protocol not available")
        if buflen is None:
            return super().getsockopt(level, optname)
        return super().getsockopt(level, optname, buflen)

    def _dmm_setopt(self, optname, value):
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"SOL_DMM options take bytes or str, got {type(value).__name__}")
        if optname == DMM_STACK:
            if self._dmm_stack is not None:
                raise OSError(_errno.EISCONN, "dmm: the stack was chosen already")
            self._dmm_override = bytes(value).decode() or None
        elif optname == DMM_PROPERTIES:
            self._dmm_props.update(_parse_properties(bytes(value)))
        else:
            raise OSError(_errno.ENOPROTOOPT, "Protocol not available")

    # -- dmm's additions ---------------------------------------------------------

    @property
    def dmm_stack(self):
        """The name of the stack instance carrying this socket, or ``None``."""
        return self._dmm_stack or None

    @property
    def dmm_stacks(self):
        """Every stack the socket is on: one, or several for a listener that
        spans stacks (``()`` before the decision)."""
        return (self._dmm_stack,) if self._dmm_stack else ()

    @property
    def dmm_properties(self):
        """Application properties that policy hooks see (a mutable dict)."""
        return self._dmm_props

    def dmm_counters(self):
        """Per-socket counters as a dict (empty for unrouted or datagram sockets)."""
        if self._dmm_core is not None:
            return dict(self._dmm_core.counters())
        if self._dmm_stack and self.type == _std.SOCK_STREAM and self.fileno() >= 0:
            from . import _core

            try:
                return dict(_core.tcp_info(self.fileno()))
            except OSError:
                return {}
        return {}


class _CoreMethods:
    """Data methods that go through the Rust core socket in ``_dmm_core``
    (kernel instances with ``io = "uring"``). Mixed in by changing the
    instance's class, so plain kernel sockets pay nothing for it."""

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
        self._dmm_core.settimeout(self.gettimeout())

    def setblocking(self, flag):
        super().setblocking(flag)
        self._dmm_core.settimeout(self.gettimeout())

    def _real_close(self, *args):
        if _user_space.get(self.fileno()) is self:
            del _user_space[self.fileno()]
        try:
            self._dmm_core.close()
        finally:
            super()._real_close(*args)


def _refusing(name, code, why, doc):
    """A method ``name`` that raises ``OSError(code)``; ``why`` is formatted
    with ``name`` and ``stack``."""

    def method(self, *args, **kwargs):
        raise OSError(code, why.format(name=name, stack=self._dmm_stack))

    method.__name__ = name
    method.__doc__ = doc
    return method


def _not_supported(name):
    return _refusing(name, _errno.EOPNOTSUPP, "{name}() is not supported on a {stack} socket",
                     "Not supported on user-space stacks: raises OSError(EOPNOTSUPP).")


class _UserSpaceMethods(_CoreMethods):
    """Every socket method goes to the Rust core socket of a user-space stack
    (FillP, smoltcp). The fd is that socket's readiness eventfd."""

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

    def _dmm_numeric(self, address):
        host, port = address[0], address[1]
        if not _is_ip(host, _raw_family(self)):
            address = _std.getaddrinfo(host, port, _raw_family(self), _raw_type(self))[0][4]
        return address

    def bind(self, address):
        return self._dmm_core.bind(self._dmm_numeric(address))

    def listen(self, *backlog):
        return self._dmm_core.listen(backlog[0] if backlog else 128)

    def accept(self):
        while True:
            core, addr = self._dmm_core.accept()
            sock = _adopt_core(self, core, self._dmm_stack)
            if _admitted(self, sock, addr):
                return sock, addr

    def sendto(self, data, *args):
        flags, address = (0, args[0]) if len(args) == 1 else args
        return self._dmm_core.sendto(data, flags, self._dmm_numeric(address))

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

    def setsockopt(self, level, optname, value, optlen=None):
        if level == SOL_DMM:
            return socket.setsockopt(self, level, optname, value)
        if isinstance(value, int):
            value = value.to_bytes(4, _sys.byteorder, signed=True)
        return self._dmm_core.setsockopt(level, optname, bytes(value))

    def getsockopt(self, level, optname, buflen=None):
        if level == SOL_DMM:
            return socket.getsockopt(self, level, optname, buflen)
        raw = self._dmm_core.getsockopt(level, optname, buflen or 4)
        if buflen is None:
            return int.from_bytes(raw[:4], _sys.byteorder, signed=True)
        return raw

    sendmsg = _not_supported("sendmsg")
    recvmsg = _not_supported("recvmsg")
    recvmsg_into = _not_supported("recvmsg_into")
    dup = _not_supported("dup")


#: Open sockets on user-space stacks by fd number. Their fd (a readiness
#: eventfd) polls readable exactly when they are readable but is always
#: writable, so :mod:`dmm.selectors` polls their ``write_poll_fd`` instead.
_user_space: _weakref.WeakValueDictionary = _weakref.WeakValueDictionary()


def write_poll_fd(fd):
    """For the fd of an open dmm socket on a user-space stack (FillP,
    smoltcp): an fd that polls readable exactly while that socket is
    writable. ``None`` for any other fd, whose own ``POLLOUT`` is exact."""
    sock = _user_space.get(fd)
    if sock is None:
        return None
    try:
        return sock._dmm_core.write_poll_fd()
    except (AttributeError, OSError):
        return None


def _adopt_kernel(listener, fd, name):
    """The dmm socket for a kernel connection ``fd`` accepted on stack ``name``."""
    # Plain ints for the new socket: the stdlib's enum properties cost more
    # than the rest of the bookkeeping here.
    sock = socket(_raw_family(listener), _raw_type(listener), listener.proto, fileno=fd)
    if listener.gettimeout() and _std.getdefaulttimeout() is None:
        sock.setblocking(True)
    if name:
        sock._dmm_stack = name
        inst = (_runtime._runtime or _runtime.get()).stacks.get(name)
        if inst is not None:
            inst.count("accept")
            if inst.kind == "kernel" and inst.io == "uring":
                kind = "stream" if _raw_type(listener) == _std.SOCK_STREAM else "dgram"
                sock._dmm_use_core(inst.core.adopt(sock.fileno(), _raw_family(sock), kind))
    return sock


def _adopt_core(listener, core, name):
    """The dmm socket for a user-space connection ``core`` accepted on ``name``."""
    sock = socket(_raw_family(listener), _raw_type(listener), listener.proto)
    sock._dmm_stack = name
    if _std.getdefaulttimeout() is None and listener.gettimeout():
        sock.setblocking(True)
    sock._dmm_use_userspace(core)
    inst = _runtime.get().stacks.get(name)
    if inst is not None:
        inst.count("accept")
    return sock


def _admitted(listener, sock, addr):
    """Whether the accept policy lets ``sock``'s stack serve the client at
    ``addr``; a refused connection is reset and counted."""
    rt = _runtime._runtime
    if rt is None or not (_policy.accept_hooks or rt.accept_rules) or not sock._dmm_stack:
        return True
    try:
        port = listener.getsockname()[1]
    except OSError:
        port = 0
    request = _policy.Request(role="accept", family=_raw_family(sock), type=_raw_type(sock),
                              address=addr[0].partition("%")[0], port=port, stack=sock._dmm_stack)
    outcome = rt.admit(request)
    if outcome is None or sock._dmm_stack in outcome.stacks:
        return True
    inst = rt.stacks.get(sock._dmm_stack)
    if inst is not None:
        inst.count_refused()
    try:
        # Linger 0: the client sees a reset, not an orderly close.
        sock.setsockopt(_std.SOL_SOCKET, _std.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
    return False


class _ListenGroup:
    """The member listeners of one dmm socket that listens on several stacks.

    The dmm socket's fd becomes an epoll fd watching every member (a kernel
    listening socket, and the readiness fds of user-space listeners), so it
    polls readable when any member has a connection waiting, and
    ``selectors``, ``socketserver`` and asyncio work on it unchanged.
    """

    __slots__ = ("runtime", "names", "members", "epoll", "next")

    def __init__(self, runtime, names):
        self.runtime = runtime
        self.names = tuple(names)
        self.members = []  # (name, kernel _socket.socket or None, core socket or None)
        self.epoll = None
        self.next = 0  # round robin, so one busy stack cannot starve another

    def open(self, sock, backlog):
        """Makes the members listen, then puts the epoll fd under ``sock``'s number."""
        family = _raw_family(sock)
        if _StdSocket.getsockname(sock)[1] == 0:
            _StdSocket.bind(sock, ("::" if family == _std.AF_INET6 else "0.0.0.0", 0))
        host, port = _StdSocket.getsockname(sock)[:2]
        kernel = None
        try:
            for name in self.names:
                inst = self.runtime.stacks[name]
                if inst.kind == "kernel":
                    if kernel is not None:
                        continue  # one kernel listener per port; the first named wins
                    kernel = name
                    continue
                core = inst.listener(family, (host, port), backlog)
                core.settimeout(0.0)
                self.members.append((name, None, core))
            if kernel is not None:
                # The kernel member is the socket itself, moved to a new fd.
                self.runtime.stacks[kernel].attach(sock, "listen")
                _StdSocket.listen(sock, backlog)
                ksock = _socket.socket(fileno=_os.dup(sock.fileno()))
                ksock.setblocking(False)
                self.members.insert(0, (kernel, ksock, None))
            self.epoll = _select.epoll()
            for _name, ksock, core in self.members:
                self.epoll.register(ksock.fileno() if ksock is not None else core.poll_fd(), _select.EPOLLIN)
            _os.dup2(self.epoll.fileno(), sock.fileno(), inheritable=sock.get_inheritable())
        except BaseException:
            self.close()
            raise
        for name, _ksock, core in self.members:
            if core is not None:
                self.runtime.stacks[name].count("listen")

    def accept_one(self):
        """The next waiting connection from any member, or ``None``."""
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
        if self.epoll is not None:
            self.epoll.close()
            self.epoll = None


def _listening(name):
    return _refusing(name, _errno.ENOTCONN, "{name}() on a listening socket",
                     "A listening socket has no peer: raises OSError(ENOTCONN).")


class _MultiListenMethods:
    """A socket listening on several stacks at once (``_dmm_core`` is its
    :class:`_ListenGroup`). ``accept()`` returns the next connection from any
    of them, as a dmm socket of the stack it arrived on."""

    __slots__ = ()

    def listen(self, *backlog):
        group = self._dmm_core
        if group.epoll is None:
            group.open(self, backlog[0] if backlog else 128)

    def accept(self):
        group = self._dmm_core
        if group.epoll is None:
            raise OSError(_errno.EINVAL, "Invalid argument")
        timeout = self.gettimeout()
        deadline = None if not timeout else _time.monotonic() + timeout
        while True:
            conn = group.accept_one()
            if conn is not None:
                name, fd, core, addr = conn
                sock = _adopt_kernel(self, fd, name) if fd is not None else _adopt_core(self, core, name)
                if _admitted(self, sock, addr):
                    return sock, addr
                continue
            if timeout == 0.0:
                raise BlockingIOError(_errno.EAGAIN, "Resource temporarily unavailable")
            wait = -1 if deadline is None else deadline - _time.monotonic()
            if deadline is not None and wait <= 0:
                raise TimeoutError("timed out")
            group.epoll.poll(wait)  # EINTR: handlers run, then it retries (PEP 475)

    def getsockname(self):
        name, ksock, core = self._dmm_core.members[0]
        return ksock.getsockname() if ksock is not None else core.getsockname()

    def setsockopt(self, level, optname, value, optlen=None):
        if level == SOL_DMM:
            return socket.setsockopt(self, level, optname, value)
        for _name, ksock, core in self._dmm_core.members:
            if ksock is not None:
                ksock.setsockopt(level, optname, value) if optlen is None else ksock.setsockopt(level, optname, value, optlen)
            else:
                raw = value.to_bytes(4, _sys.byteorder, signed=True) if isinstance(value, int) else bytes(value)
                try:
                    core.setsockopt(level, optname, raw)
                except OSError as exc:
                    if exc.errno != _errno.ENOPROTOOPT:
                        raise

    def getsockopt(self, level, optname, buflen=None):
        if level == SOL_DMM:
            return socket.getsockopt(self, level, optname, buflen)
        _name, ksock, core = self._dmm_core.members[0]
        if ksock is not None:
            return ksock.getsockopt(level, optname) if buflen is None else ksock.getsockopt(level, optname, buflen)
        raw = core.getsockopt(level, optname, buflen or 4)
        return int.from_bytes(raw[:4], _sys.byteorder, signed=True) if buflen is None else raw

    def settimeout(self, value):
        _StdSocket.settimeout(self, value)

    def setblocking(self, flag):
        _StdSocket.setblocking(self, flag)

    def shutdown(self, how):
        for _name, ksock, core in self._dmm_core.members:
            ksock.shutdown(how) if ksock is not None else core.shutdown(how)

    def _real_close(self, *args):
        try:
            self._dmm_core.close()
        finally:
            _StdSocket._real_close(self, *args)

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
    dup = _not_supported("dup")


_mixed_classes: dict[tuple[type, type], type] = {}


def _with_mixin(cls, mixin):
    """``cls`` with ``mixin``'s methods first, same layout, cached."""
    if issubclass(cls, mixin):
        return cls
    derived = _mixed_classes.get((cls, mixin))
    if derived is None:
        derived = type(cls.__name__, (mixin, cls),
                       {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _mixed_classes[(cls, mixin)] = derived
    return derived


# -- module functions ------------------------------------------------------------


def create_connection(address, timeout=_GLOBAL_DEFAULT_TIMEOUT, source_address=None, *, all_errors=False):
    """Connects to ``(host, port)``, trying each address ``getaddrinfo`` gives,
    like the stdlib's; the host name reaches policy hooks."""
    host, port = address
    # Once patched, use whatever the stdlib module's class is now (ours, or a
    # test's mock), as the stdlib's create_connection does.
    cls = _std.socket if _std.socket is not _StdSocket else socket
    errors = []
    for family, type_, proto, _canon, sockaddr in _std.getaddrinfo(host, port, 0, _std.SOCK_STREAM):
        sock = None
        try:
            sock = cls(family, type_, proto)
            if isinstance(sock, socket):
                sock._dmm_host = host if isinstance(host, str) and not _runtime.is_ip(host) else None
            if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            errors.append(exc)
            if sock is not None:
                sock.close()
    if not errors:
        raise OSError("getaddrinfo returns an empty list")
    try:
        if all_errors:
            raise ExceptionGroup("create_connection failed", errors)
        raise errors[0]
    finally:
        errors = []


def create_server(address, *, family=_std.AF_INET, backlog=None, reuse_port=False, dualstack_ipv6=False):
    """Creates a listening TCP socket bound to ``address``, like the stdlib's."""
    if reuse_port and not hasattr(_std, "SO_REUSEPORT"):
        raise ValueError("SO_REUSEPORT not supported on this platform")
    if dualstack_ipv6:
        if not _std.has_dualstack_ipv6():
            raise ValueError("dualstack_ipv6 not supported on this platform")
        if family != _std.AF_INET6:
            raise ValueError("dualstack_ipv6 requires AF_INET6 family")
    sock = socket(family, _std.SOCK_STREAM)
    try:
        sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(_std.SOL_SOCKET, _std.SO_REUSEPORT, 1)
        if family == _std.AF_INET6 and _std.has_ipv6:
            sock.setsockopt(_std.IPPROTO_IPV6, _std.IPV6_V6ONLY, 0 if dualstack_ipv6 else 1)
        try:
            sock.bind(address)
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (while attempting to bind on address {address!r})") from None
        if backlog is None:
            sock.listen()
        else:
            sock.listen(backlog)
        return sock
    except BaseException:
        sock.close()
        raise


def socketpair(family=None, type=_std.SOCK_STREAM, proto=0):
    """A pair of connected dmm sockets (AF_UNIX by default; not routed)."""
    if family is None:
        family = _std.AF_UNIX
    a, b = _socket.socketpair(family, type, proto)
    return socket(family, type, proto, a.detach()), socket(family, type, proto, b.detach())


def fromfd(fd, family, type, proto=0):
    """A dmm socket over a duplicate of ``fd``."""
    return socket(family, type, proto, _os.dup(fd))


def stack_counters():
    """Counters of every stack instance, by name."""
    rt = _runtime.get()
    return {name: inst.counters() for name, inst in rt.stacks.items()}
