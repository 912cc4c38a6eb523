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
import socket as _std
import time as _time
import _socket

from . import policy as _policy
from . import runtime as _runtime
from .negotiate import Plan as _Plan
from ._multilisten import AdvertisedMethods as _AdvertisedMethods
from ._multilisten import ListenGroup as _ListenGroup
from ._racing import RaceTakeover as _RaceTakeover
from . import _sampling
from ._sampling import PathSampled as _PathSampled
from ._multilisten import MultiListenMethods as _MultiListenMethods
from . import _userspace
from ._userspace import CoreMethods as _CoreMethods
from ._userspace import UserSpaceMethods as _UserSpaceMethods
from ._userspace import option_bytes as _option_bytes
from ._userspace import user_space as _user_space
from ._userspace import is_ip as _is_ip
from ._userspace import with_mixin as _with_mixin
from ._userspace import write_poll_fd

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
# The enums the stdlib module defines but does not export.
AddressInfo = _std.AddressInfo
MsgFlag = _std.MsgFlag

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


class socket(_RaceTakeover, _StdSocket):
    """A stdlib-compatible socket whose stack is chosen by dmm's router.

    Accepts the stdlib's arguments plus ``stack`` (the name of an instance to
    use, bypassing hooks and rules) and ``properties`` (a mapping that policy
    hooks receive).
    """

    __slots__ = ("_dmm_stack", "_dmm_core", "_dmm_override", "_dmm_props", "_dmm_host", "_dmm_opts", "_dmm_bound",
                 "_dmm_path", "_dmm_deadline")

    def __init__(self, family=-1, type=-1, proto=-1, fileno=None, *, stack=None, properties=None):
        adopted = _userspace.take_detached(fileno) if fileno is not None else None
        if adopted is not None:
            # A detached user-space socket's fd (an eventfd, which the C
            # socket refuses): open under its number as a kernel socket
            # first, then put the eventfd back over it.
            core, name, family, type, proto = adopted
            stand_in = _socket.socket(family, type, proto)
            poll_fd = _os.dup(fileno)
            _os.dup2(stand_in.fileno(), fileno)
            stand_in.close()
            try:
                super().__init__(family, type, proto, fileno)
            finally:
                _os.dup2(poll_fd, fileno)
                _os.close(poll_fd)
        else:
            super().__init__(family, type, proto, fileno)
        self._dmm_stack = None if _raw_family(self) in _INET else _NOT_ROUTED
        self._dmm_core = None
        self._dmm_override = stack
        self._dmm_props = dict(properties) if properties else {}
        self._dmm_host = None
        self._dmm_opts = None
        # Whether the socket may hold a local port of its own (bound, or
        # made from an fd): then a failed connect has nothing to race with.
        self._dmm_bound = fileno is not None
        # (connect start, numeric destination) while a closing connect
        # should leave a path sample (dmm._sampling).
        self._dmm_path = None
        # While connect() routes under a timeout: when that timeout ends.
        self._dmm_deadline = None
        if adopted is not None:
            self._dmm_stack = name
            self._dmm_core = core
            core.settimeout(self.gettimeout())
            self.__class__ = _with_mixin(self.__class__, _UserSpaceMethods)
            _user_space[self.fileno()] = self

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
        given = address
        host, port = address[0], address[1]
        family = _raw_family(self)
        if not isinstance(host, str) or not _is_ip(host, family):
            infos = _std.getaddrinfo(host, port, family, _raw_type(self))
            address = infos[0][4]
            if isinstance(host, str):
                self._dmm_host = host
            host, port = address[0], address[1]
        rt = _runtime._runtime or _runtime.get()
        sample_to = None
        if rt.paths is not None and role == "connect" and _raw_type(self) == _std.SOCK_STREAM:
            sample_to = host.partition("%")[0]
            self._dmm_sample(rt, sample_to)
        single = True  # one candidate: nothing to race
        if rt.only is not None and self._dmm_override is None and not _policy._hooks:
            name = rt.only
        else:
            outcome = rt.decision(role, family, _raw_type(self), host.partition("%")[0], port, self._dmm_host,
                                  self._dmm_props, self._dmm_override, self._dmm_hook_limit(role))
            name = outcome.stack
            single = len(outcome.candidates) == 1
            if len(outcome.stacks) > 1:
                # Listens on several stacks: the members are made by listen().
                self._dmm_core = _ListenGroup(rt.stacks, outcome.stacks)
                self._dmm_stack = name
                self.__class__ = _with_mixin(type(self), _MultiListenMethods)
                return address
            if len(outcome.candidates) > 1 and role == "connect" and _raw_type(self) == _std.SOCK_STREAM:
                race = rt.negotiator.plan(outcome, family, _raw_type(self), address, self._dmm_opts)
                if outcome.first_choices == 1 and rt.stacks[name].passthrough and self.gettimeout() != 0.0:
                    # One first choice, the plain kernel: this socket connects
                    # as it is; the last resorts race only if that fails (and
                    # the socket has no fixed local port: connect() checks).
                    self._dmm_move_to(name, role)
                    self._dmm_stack = name
                    self._dmm_core = race
                    return address
                if _StdSocket.getsockname(self)[1] == 0:
                    # Several candidates: connect() races them.
                    self._dmm_core = race
                    return address
                # A fixed local port can be bound once: no race, the first candidate.
        self._dmm_move_to(name, role)
        self._dmm_stack = name
        self._dmm_opts = None
        if single and role == "connect" and address is given and self._dmm_override is None \
                and not _policy._hooks and rt.stacks[name].passthrough and (self.proto or _std.IPPROTO_TCP) == _std.IPPROTO_TCP:
            rt.remember_direct(family, _raw_type(self), self.proto, address, rt.stacks[name], sample_to)
        return address

    def _dmm_move_to(self, name, role):
        """Moves this socket onto stack instance ``name``, as it says."""
        inst = (_runtime._runtime or _runtime.get()).stacks[name]
        if inst.passthrough and (self.proto or _std.IPPROTO_TCP) == _std.IPPROTO_TCP:
            # The plain kernel: the socket is already what it must be.
            inst.count(role)
            return
        local = None
        if not inst.keeps_fd:  # a kernel socket keeps its own binding
            try:
                local = _StdSocket.getsockname(self)
            except OSError:
                pass
        family, type_ = _raw_family(self), _raw_type(self)
        handover = inst.handover(family, type_, self.proto, local)
        if handover.reopen is not None:
            self._dmm_reopen(handover.reopen)
        if handover.adopt:
            self._dmm_use_core(inst.adopt(self.fileno(), family, type_))
        elif handover.core is not None:
            self._dmm_use_userspace(handover.core)
        inst.count(role)

    def _dmm_reopen(self, proto, rebind=True):
        """Replaces the kernel socket under this fd number with one of another
        protocol (TCP <-> MPTCP), replaying the options set so far and (with
        ``rebind``) the bound address."""
        timeout = self.gettimeout()
        bound = None
        try:
            local = _StdSocket.getsockname(self)
            if local[1] != 0 and rebind:
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

    def _dmm_sample(self, rt, host):
        """Gives this connecting socket its path probe: the runtime samples
        the connection to ``host`` while it lasts and at close."""
        _sampling.watch(self, host, rt.paths.paths_spec.sample_every)
        self.__class__ = _with_mixin(type(self), _PathSampled)

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
            try:
                core.setsockopt(level, optname, _option_bytes(value))
            except OSError:
                pass
        _os.dup2(core.poll_fd(), self.fileno(), inheritable=self.get_inheritable())
        stale = _userspace.detached.pop(self.fileno(), None)
        if stale is not None:  # the number was closed and reused: that fd is gone
            _userspace.forget(stale)
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
        self._dmm_bound = True
        super().bind(address)
        if (self._dmm_stack is None and isinstance(address, tuple) and len(address) >= 2
                and _runtime._runtime is not None and _runtime._runtime.user_space
                and _raw_type(self) == _std.SOCK_STREAM):
            self._dmm_port_for_every_stack(_runtime._runtime.user_space, address)

    def _dmm_port_for_every_stack(self, instances, address):
        """After a kernel bind: listen() may move this socket to a
        user-space instance, so the port must be free there too, as one
        port is one port to a program. A port the program named and a dmm
        socket there holds fails as the kernel fails a taken port
        (``EADDRINUSE``). A port the kernel picked (port 0) that is taken
        there (a FillP connection's UDP port, say) is swapped for another,
        since programs read their port before listen() (socketserver does):
        the kernel socket is reopened and bound again while the old one
        holds its port."""
        family, held = _raw_family(self), []
        options = [(level, name, _option_bytes(value)) for level, name, value, optlen in self._dmm_opts or ()
                   if optlen is None]
        try:
            for _ in range(16):
                host, port = _StdSocket.getsockname(self)[:2]
                if all(inst.port_free(family, host, port, options) for inst in instances):
                    return
                if address[1] != 0:
                    self._dmm_reopen(self.proto, rebind=False)  # unbound again, as a failed bind leaves it
                    raise OSError(_errno.EADDRINUSE, _os.strerror(_errno.EADDRINUSE))
                held.append(_os.dup(self.fileno()))  # keeps the port from coming back
                self._dmm_reopen(self.proto, rebind=False)
                _StdSocket.bind(self, address)
        finally:
            for fd in held:
                _os.close(fd)

    def connect(self, address):
        if self._dmm_stack is None:
            rt = _runtime._runtime
            if rt is not None and rt.plain_kernel is not None and self._dmm_override is None and not _policy._hooks:
                # The built-in config's fast path (what _dmm_route does first),
                # inline: connect rates count every call here.
                rt.plain_kernel.count("connect")
                self._dmm_stack = rt.only
                return _StdSocket.connect(self, address)
            if rt is not None and self._dmm_override is None and not _policy._hooks:
                hit = rt.direct(_raw_family(self), _raw_type(self), self.proto, address)
                if hit is not None:
                    # Decided before, for this destination: the plain kernel, as the socket is.
                    inst, sample_to = hit
                    inst.count("connect")
                    self._dmm_stack = inst.name
                    self._dmm_opts = None
                    if sample_to is not None:
                        self._dmm_sample(rt, sample_to)
                    return _StdSocket.connect(self, address)
            timeout = self.gettimeout()
            if timeout and _policy._hooks:
                return self._dmm_connect_within(timeout, address)
            return self._dmm_connect_routed(self._dmm_route("connect", address))
        return super().connect(address)

    def _dmm_connect_routed(self, address):
        """``connect()`` once the decision is made."""
        race = self._dmm_core
        if isinstance(race, _Plan):
            if self._dmm_stack is None:
                return self._dmm_race()
            self._dmm_core = None
            try:
                return super().connect(address)
            except OSError as exc:
                # A fixed local port can be bound once: nothing to race.
                if self._dmm_bound or not race.first_failed(exc):
                    raise
            self._dmm_stack, self._dmm_core = None, race
            return self._dmm_race()
        if isinstance(self, _UserSpaceMethods):
            return _UserSpaceMethods.connect(self, address)
        return super().connect(address)

    def _dmm_connect_within(self, timeout, address):
        """``connect()`` when hooks decide and the socket has a timeout: the
        decision counts against the timeout, as the whole call must."""
        deadline = _time.monotonic() + timeout
        self._dmm_deadline = deadline
        try:
            address = self._dmm_route("connect", address)
        finally:
            self._dmm_deadline = None
        left = deadline - _time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        self.settimeout(left)
        try:
            return self._dmm_connect_routed(address)
        finally:
            if self.fileno() >= 0:
                self.settimeout(timeout)

    def _dmm_hook_limit(self, role):
        """How long the hooks may take for this call (``None``: no limit)."""
        deadline = self._dmm_deadline if role == "connect" else None
        return None if deadline is None else max(deadline - _time.monotonic(), 0.0)

    def connect_ex(self, address):
        if self._dmm_stack is None:
            if self.gettimeout() and _policy._hooks:
                try:
                    self.connect(address)
                    return 0
                except _std.gaierror:
                    raise
                except TimeoutError:
                    return _errno.EAGAIN
                except OSError as exc:
                    if exc.errno is None:
                        raise
                    return exc.errno
            try:
                address = self._dmm_route("connect", address)
                if isinstance(self._dmm_core, _Plan):
                    self._dmm_connect_routed(address)
                    return 0
            except _std.gaierror:
                raise
            except TimeoutError:
                return _errno.EAGAIN  # as CPython's connect_ex on a timeout
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
                _MultiListenMethods.listen(self, *backlog)
            elif isinstance(self, _UserSpaceMethods):
                _UserSpaceMethods.listen(self, *backlog)
            else:
                super().listen(*backlog)
            rt = _runtime._runtime
            if rt is not None and rt.negotiator is not None and self._dmm_stack:
                # Tell L-RD, and the FillP members' peers, what this accepts on.
                if isinstance(self, _MultiListenMethods):
                    members = [(name, core) for name, _ksock, core in self._dmm_core.members]
                else:
                    members = [(self._dmm_stack, self._dmm_core if isinstance(self, _UserSpaceMethods) else None)]
                address = self.getsockname()
                rt.negotiator.advertise(address[0], address[1], members)
                self.__class__ = _with_mixin(type(self), _AdvertisedMethods)
            return None
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
            # Routed like sendto: a user-space stack sends it, not the
            # kernel through the placeholder fd.
            if isinstance(self, _UserSpaceMethods):
                return _UserSpaceMethods.sendmsg(self, buffers, *args)
        return super().sendmsg(buffers, *args)

    def accept(self):
        rt = _runtime._runtime
        if rt is not None and rt.plain_kernel is not None and not _policy.accept_hooks:
            # The built-in config's fast path: nothing to adopt or admit.
            fd, addr = self._accept()
            sock = socket(_raw_family(self), _raw_type(self), self.proto, fileno=fd)
            if self.gettimeout() and _std.getdefaulttimeout() is None:
                sock.setblocking(True)
            if self._dmm_stack:
                sock._dmm_stack = self._dmm_stack
                rt.plain_kernel.count("accept")
            return sock, addr
        while True:
            fd, addr = self._accept()
            sock = self._dmm_accepted(fd, None, self._dmm_stack)
            if self._dmm_admit(sock, addr):
                return sock, addr

    def _dmm_accepted(self, fd, core, name):
        """The dmm socket for a connection this listener accepted on stack
        ``name``: a kernel socket ``fd``, or a user-space ``core`` socket."""
        # Plain ints for the new socket: the stdlib's enum properties cost
        # more than the rest of the bookkeeping here.
        sock = socket(_raw_family(self), _raw_type(self), self.proto, fileno=fd)
        if self.gettimeout() and _std.getdefaulttimeout() is None:
            sock.setblocking(True)
        if not name:
            return sock
        sock._dmm_stack = name
        inst = (_runtime._runtime or _runtime.get()).stacks.get(name)
        if core is not None:
            sock._dmm_use_userspace(core)
        elif inst is not None and inst.adopts:
            sock._dmm_use_core(inst.adopt(sock.fileno(), _raw_family(sock), _raw_type(sock)))
        if inst is not None:
            inst.count("accept")
        return sock

    def _dmm_admit(self, sock, addr):
        """Whether the accept policy lets ``sock``'s stack serve the client
        at ``addr``; a refused connection is reset and closed."""
        rt = _runtime._runtime
        if rt is None or not (_policy.accept_hooks or rt.accept_rules) or not sock._dmm_stack:
            return True
        try:
            port = self.getsockname()[1]
        except OSError:
            port = 0
        if rt.admits(_raw_family(sock), _raw_type(sock), addr[0].partition("%")[0], port, sock._dmm_stack):
            return True
        try:
            # Linger 0: the client sees a reset, not an orderly close.
            sock.setsockopt(_std.SOL_SOCKET, _std.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        sock.close()
        return False

    def dup(self):
        sock = super().dup()
        sock._dmm_stack = self._dmm_stack
        return sock

    # -- options -----------------------------------------------------------------

    def setsockopt(self, level, optname, value, optlen=None):
        if level == SOL_DMM:
            self._dmm_setopt(optname, value)
            return
        if optlen is None and self._dmm_core is None:
            rt = _runtime._runtime
            if rt is not None and rt.plain_kernel is not None:
                # A kernel socket that can never move: no option log to keep.
                return _StdSocket.setsockopt(self, level, optname, value)
            if self._dmm_stack is None and rt is not None:
                # Not routed yet (inline: connect loops set options on every socket).
                _StdSocket.setsockopt(self, level, optname, value)
                if self._dmm_opts is None:
                    self._dmm_opts = []
                self._dmm_opts.append((level, optname, value, None))
                return None
        self._dmm_set_option(level, optname, value, optlen)

    def _dmm_set_option(self, level, optname, value, optlen):
        """A kernel-level option, on whatever carries the socket."""
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
        return self._dmm_get_option(level, optname, buflen)

    def _dmm_get_option(self, level, optname, buflen):
        """A kernel-level option, from whatever carries the socket."""
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
    """A dmm socket over a duplicate of ``fd``; for the fd of a socket on a
    user-space stack (open or detached), a new handle on that socket."""
    sock = _user_space.get(fd)
    if sock is not None:
        return sock.dup()
    held = _userspace.take_detached(fd)
    if held is not None:
        _userspace.detached[fd] = held  # the fd stays detached: this is a new handle
        core, name, family, type, proto = held
        new = socket(family, type, proto)
        new._dmm_stack = name
        _userspace.retain(core)
        new._dmm_use_userspace(core)
        return new
    return socket(family, type, proto, _os.dup(fd))


def stack_counters():
    """Counters of every stack instance, by name."""
    rt = _runtime.get()
    return {name: inst.counters() for name, inst in rt.stacks.items()}
