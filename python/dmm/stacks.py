"""Stack instances as the Python facade sees them.

Every kind is opened the same way, from its checked ``[[stack]]`` table:
``_core.Stack(name, config)``. What differs between kinds is how a socket
moves onto the instance, and the Rust core says which (``placement``):

* :class:`KernelInstance` (``"kernel"`` placement): the socket keeps its own
  kernel fd. A stream socket of another protocol is reopened (TCP <-> MPTCP),
  and an io_uring instance moves data through a core socket over that fd.
* :class:`UserSpaceInstance` (``"core"`` placement): the socket moves into a
  core socket of the instance (FillP, smoltcp, memory), and its fd number
  becomes that socket's readiness eventfd.

:meth:`StackInstance.handover` tells a socket what to become; the socket
does it (calls run one way: socket -> runtime -> instance -> core).
"""

from __future__ import annotations

import errno as _errno
import itertools
import socket as _stdsocket
from typing import Any, NamedTuple, Optional, Sequence

from . import _core
from .config import StackSpec

__all__ = ["IPPROTO_MPTCP", "Handover", "KernelInstance", "StackInstance", "UserSpaceInstance", "make_instance"]

#: ``IPPROTO_MPTCP`` (CPython exposes it only from 3.10 on some builds).
IPPROTO_MPTCP = getattr(_stdsocket, "IPPROTO_MPTCP", 262)

_INET = (_stdsocket.AF_INET, _stdsocket.AF_INET6)
_KIND = {_stdsocket.SOCK_STREAM: "stream", _stdsocket.SOCK_DGRAM: "dgram"}
_ROLE_KEYS = {"connect": "connects", "listen": "listens", "accept": "accepts", "sendto": "datagram_sockets"}


class Handover(NamedTuple):
    """What a socket must do to move onto an instance, in this order."""

    #: Reopen the kernel socket under the same fd with this protocol number.
    reopen: Optional[int] = None
    #: Then move data through ``instance.adopt(fd, ...)``'s core socket.
    adopt: bool = False
    #: Or: hand the whole socket to this core socket.
    core: Any = None


class StackInstance:
    """One stack instance: what it can carry, how a socket moves onto it,
    and counters kept in Python (sockets by role, refusals).

    Facts the core fixed at open (``io`` of a kernel instance after any
    io_uring fallback, ``device`` of a smoltcp one) read as attributes.
    """

    #: Sockets keep their kernel fd (at most one such instance listens on a port).
    keeps_fd = False
    #: Sockets stay exactly as the stdlib made them: no handover at all.
    passthrough = False
    #: Accepted and routed sockets move data through ``adopt()``.
    adopts = False

    def __init__(self, spec: StackSpec, core: Any):
        self.name = spec.name
        self.kind = spec.kind
        self.core = core
        #: The protocol its connections speak on the wire ("tcp", "mptcp", "fillp", ...).
        self.protocol = core.protocol
        self.attributes = dict(core.attributes())
        self._carries: dict[tuple[int, int], Optional[str]] = {}
        # itertools.count: next() is atomic under the GIL and cheaper than a lock.
        self._counts = {key: itertools.count() for key in ("sockets", "policy_refused", *_ROLE_KEYS.values())}

    def __getattr__(self, name: str) -> Any:
        attributes = self.__dict__.get("attributes", {})
        if name in attributes:
            return attributes[name]
        raise AttributeError(f"{type(self).__name__} {self.__dict__.get('name')!r} has no attribute {name!r}")

    def can_carry(self, family: int, type: int) -> Optional[str]:
        """``None`` if this instance can carry such a socket, else why not."""
        key = (family, type)
        why = self._carries.get(key, False)
        if why is False:
            if family not in _INET:
                why = f"address family {family!r} is not IPv4 or IPv6"
            elif type not in _KIND:
                why = f"socket type {type!r} is not stream or datagram"
            else:
                why = self.core.carries(family, _KIND[type])
            self._carries[key] = why
        return why

    def handover(self, family: int, type: int, proto: int, local: Optional[tuple]) -> Handover:
        """What a socket of ``family``/``type``/``proto``, bound to ``local``
        (or not bound), must do to move onto this instance."""
        raise NotImplementedError

    def adopt(self, fd: int, family: int, type: int) -> Any:
        """A core socket over the kernel socket ``fd`` (the caller keeps it)."""
        return self.core.adopt(fd, family, _KIND.get(type, "stream"))

    def listener(self, family: int, address: tuple, backlog: int) -> Any:
        """User-space kinds: a core socket listening on ``address``'s port,
        for a dmm socket that listens on several stacks at once."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``dmm stacks``."""
        return self.core.describe()

    def count(self, role: str) -> None:
        """Counts a socket taken over in ``role`` (connect, listen, accept, sendto)."""
        counts = self._counts
        next(counts["sockets"])
        next(counts[_ROLE_KEYS[role]])

    def count_refused(self) -> None:
        """Counts a connection the accept policy refused."""
        next(self._counts["policy_refused"])

    def counters(self) -> dict[str, int]:
        """Instance-wide counters."""
        return {key: _peek(c) for key, c in self._counts.items()}


class KernelInstance(StackInstance):
    """An instance whose sockets keep their kernel fd (the kernel's TCP/IP,
    or MPTCP). Data moves through CPython's own socket methods on that fd, so
    a kernel socket costs exactly what a stdlib socket costs; with
    ``io = "uring"`` it moves through the core's io_uring path instead."""

    keeps_fd = True

    def __init__(self, spec: StackSpec, core: Any):
        super().__init__(spec, core)
        _place, self.stream_protocol, self.adopts = core.placement
        self.passthrough = self.stream_protocol == _stdsocket.IPPROTO_TCP and not self.adopts

    def handover(self, family: int, type: int, proto: int, local: Optional[tuple]) -> Handover:
        reopen = None
        if type == _stdsocket.SOCK_STREAM and (proto or _stdsocket.IPPROTO_TCP) != self.stream_protocol:
            reopen = self.stream_protocol
        return Handover(reopen=reopen, adopt=self.adopts)


class UserSpaceInstance(StackInstance):
    """An instance that carries sockets entirely in the Rust core (FillP,
    smoltcp, memory). A socket bound before routing keeps its port on the
    new stack, at the address the core maps the application's to."""

    def core_socket(self, family: int, type: int) -> Any:
        """A new core socket for a Python socket of ``family`` and ``type``."""
        return self.core.socket(family, _KIND.get(type, "stream"))

    def handover(self, family: int, type: int, proto: int, local: Optional[tuple]) -> Handover:
        family = _stdsocket.AF_INET6 if family == _stdsocket.AF_INET6 else _stdsocket.AF_INET
        core = self.core_socket(family, type)
        if local is not None and local[1] != 0:
            try:
                core.bind((self.core.bind_address(family, local[0]), local[1]))
            except BaseException:
                core.close()
                raise
        return Handover(core=core)

    def listener(self, family: int, address: tuple, backlog: int) -> Any:
        core = self.core_socket(family, _stdsocket.SOCK_STREAM)
        try:
            core.bind((self.core.bind_address(family, address[0]), address[1]))
            core.listen(backlog)
        except BaseException:
            core.close()
            raise
        return core

    def port_free(self, family: int, host: str, port: int, options: Sequence[tuple] = ()) -> bool:
        """Whether a stream socket of ``family`` with ``options`` (``(level,
        name, bytes)``, as ``SO_REUSEPORT``) could bind ``host:port`` here
        now (``False`` only for ``EADDRINUSE``: a family or address the
        instance cannot take is not its to refuse)."""
        family = _stdsocket.AF_INET6 if family == _stdsocket.AF_INET6 else _stdsocket.AF_INET
        try:
            core = self.core_socket(family, _stdsocket.SOCK_STREAM)
        except OSError:
            return True
        try:
            for level, name, value in options:
                try:
                    core.setsockopt(level, name, value)
                except OSError:
                    pass  # not one this stack has: it changes nothing here
            core.bind((self.core.bind_address(family, host), port))
        except OSError as exc:
            return exc.errno != _errno.EADDRINUSE
        except (TypeError, ValueError):
            return True
        finally:
            core.close()
        return True

    def counters(self) -> dict[str, int]:
        counts = super().counters()
        counts.update(self.core.counters())
        return counts


def _peek(counter: itertools.count) -> int:
    """The next value of an ``itertools.count`` without advancing it."""
    return counter.__reduce__()[1][0]


def make_instance(spec: StackSpec) -> StackInstance:
    """Opens the instance a ``[[stack]]`` entry describes."""
    core = _core.Stack(spec.name, spec.core)
    cls = KernelInstance if core.placement[0] == "kernel" else UserSpaceInstance
    return cls(spec, core)
