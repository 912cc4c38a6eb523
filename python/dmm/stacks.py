"""Stack instances as the Python facade sees them.

Each instance wraps its Rust core object and knows how to take over a
``dmm.socket.socket`` once the router has chosen it (:meth:`attach`). The
kernel kind keeps the socket's own fd; the user-space kinds (FillP, smoltcp)
hand the socket to a Rust core socket.
"""

from __future__ import annotations

import _socket
import socket as _stdsocket
import itertools
from typing import Any, Optional

from . import _core
from .config import StackSpec

__all__ = ["IPPROTO_MPTCP", "FillpInstance", "KernelInstance", "SmolInstance", "StackInstance",
           "UserSpaceInstance", "make_instance"]

#: ``IPPROTO_MPTCP`` (CPython exposes it only from 3.10 on some builds).
IPPROTO_MPTCP = getattr(_stdsocket, "IPPROTO_MPTCP", 262)

_INET = (_stdsocket.AF_INET, _stdsocket.AF_INET6)
_raw_type = _socket.socket.type.__get__  # an int, without the enum conversion
_ROLE_KEYS = {"connect": "connects", "listen": "listens", "accept": "accepts", "sendto": "datagram_sockets"}


class StackInstance:
    """A stack instance as the facade sees it: what it can carry, how it takes
    over a socket, and counters kept in Python (sockets by role, refusals)."""

    name: str
    kind: str
    core: Any

    def __init__(self, name: str):
        self.name = name
        # itertools.count: next() is atomic under the GIL and cheaper than a lock.
        self._counts = {key: itertools.count() for key in ("sockets", "policy_refused", *_ROLE_KEYS.values())}

    def can_carry(self, family: int, type: int) -> Optional[str]:
        """``None`` if this instance can carry such a socket, else why not."""
        raise NotImplementedError

    def attach(self, sock: Any, role: str) -> None:
        """Makes ``sock`` a socket of this instance (may replace its fd in place)."""
        raise NotImplementedError

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
    """The kernel's TCP/IP (or MPTCP) stack.

    Data moves through CPython's own socket methods on the same fd, so a
    kernel socket costs exactly what a stdlib socket costs. With
    ``io = "uring"``, blocking sends and receives go through the Rust core's
    io_uring path instead (falling back to syscalls when io_uring is refused).
    """

    kind = "kernel"

    def __init__(self, spec: StackSpec):
        super().__init__(spec.name)
        self.protocol = spec.protocol
        self.core = _core.KernelStack(spec.name, spec.protocol, spec.io)
        self.io = self.core.io
        self._stream_proto = IPPROTO_MPTCP if spec.protocol == "mptcp" else _stdsocket.IPPROTO_TCP

    def can_carry(self, family: int, type: int) -> Optional[str]:
        if family not in _INET:
            return f"address family {family!r} is not IPv4 or IPv6"
        if self.protocol == "mptcp" and type != _stdsocket.SOCK_STREAM:
            return "MPTCP carries stream sockets only"
        if type not in (_stdsocket.SOCK_STREAM, _stdsocket.SOCK_DGRAM):
            return f"socket type {type!r} is not stream or datagram"
        return None

    def attach(self, sock: Any, role: str) -> None:
        if _raw_type(sock) == _stdsocket.SOCK_STREAM:
            want = self._stream_proto
            if (sock.proto or _stdsocket.IPPROTO_TCP) != want:
                sock._dmm_reopen(want)
        if self.io == "uring":
            kind = "stream" if sock.type == _stdsocket.SOCK_STREAM else "dgram"
            sock._dmm_use_core(self.core.adopt(sock.fileno(), sock.family, kind))
        self.count(role)


class UserSpaceInstance(StackInstance):
    """A stack that carries sockets entirely in the Rust core (FillP, smoltcp).

    The Python socket's fd becomes the core socket's readiness eventfd. A
    socket bound before routing keeps its port on the new stack; its address
    is mapped by :meth:`local_address`.
    """

    def local_address(self, family: int, host: str) -> str:
        """The address a core socket binds to when the application bound
        ``host`` (the wildcard, or one of its own addresses)."""
        raise NotImplementedError

    def core_socket(self, family: int, type: int) -> Any:
        """A new core socket for a Python socket of ``family`` and ``type``."""
        return self.core.socket(family, "stream" if type == _stdsocket.SOCK_STREAM else "dgram")

    def attach(self, sock: Any, role: str) -> None:
        family = _stdsocket.AF_INET6 if sock.family == _stdsocket.AF_INET6 else _stdsocket.AF_INET
        core = self.core_socket(family, _raw_type(sock))
        try:
            local = sock.getsockname()
        except OSError:
            local = None
        if local is not None and local[1] != 0:
            core.bind((self.local_address(family, local[0]), local[1]))
        sock._dmm_use_userspace(core)
        self.count(role)

    def listener(self, family: int, address: tuple, backlog: int) -> Any:
        core = self.core_socket(family, _stdsocket.SOCK_STREAM)
        try:
            core.bind((self.local_address(family, address[0]), address[1]))
            core.listen(backlog)
        except BaseException:
            core.close()
            raise
        return core

    def counters(self) -> dict[str, int]:
        counts = super().counters()
        counts.update(self.core.counters())
        return counts


class FillpInstance(UserSpaceInstance):
    """A FillP-style reliable transport over UDP (Rust driver thread).

    A listener bound to port P takes UDP port P, the number of its TCP twin.
    """

    kind = "fillp"

    def __init__(self, spec: StackSpec):
        super().__init__(spec.name)
        self.rate_control = spec.rate_control
        self.address = spec.address
        # The core counts bytes/s; the configuration, bits/s.
        fixed_rate = None if spec.fixed_rate is None else spec.fixed_rate // 8
        self.core = _core.FillpStack(spec.name, spec.rate_control, spec.address, fixed_rate, spec.datagram_size)
        self._family = _stdsocket.AF_INET6 if ":" in spec.address else _stdsocket.AF_INET

    def can_carry(self, family: int, type: int) -> Optional[str]:
        if type != _stdsocket.SOCK_STREAM:
            return "FillP carries stream sockets only"
        if family != self._family:
            return f"this instance's UDP sockets are {'IPv6' if self._family == _stdsocket.AF_INET6 else 'IPv4'}"
        return None

    def local_address(self, family: int, host: str) -> str:
        return self.address if host in ("0.0.0.0", "::") else host


class SmolInstance(UserSpaceInstance):
    """A user-space TCP/IP stack (smoltcp) over a TAP device, with its own
    addresses, MAC and MTU, driven by one Rust thread."""

    kind = "smoltcp"

    def __init__(self, spec: StackSpec):
        super().__init__(spec.name)
        self.device = spec.device
        self.addresses = spec.addresses
        self.core = _core.SmolStack(spec.name, spec.device, list(spec.addresses), list(spec.gateways),
                                    spec.mtu, spec.mac or None, spec.buffer_size)
        self._families = {_stdsocket.AF_INET6 if ":" in a else _stdsocket.AF_INET for a in spec.addresses}

    def can_carry(self, family: int, type: int) -> Optional[str]:
        if type not in (_stdsocket.SOCK_STREAM, _stdsocket.SOCK_DGRAM):
            return f"socket type {type!r} is not stream or datagram"
        if family not in self._families:
            return f"the instance has no {'IPv6' if family == _stdsocket.AF_INET6 else 'IPv4'} address"
        return None

    def local_address(self, family: int, host: str) -> str:
        # The host's addresses are not the instance's: anything else than one
        # of its own means "any of mine".
        own = {a.split("/")[0] for a in self.addresses}
        if host in own:
            return host
        return "::" if family == _stdsocket.AF_INET6 else "0.0.0.0"


def _peek(counter: itertools.count) -> int:
    """The next value of an ``itertools.count`` without advancing it."""
    return counter.__reduce__()[1][0]


def make_instance(spec: StackSpec) -> StackInstance:
    """Builds the instance a ``[[stack]]`` entry describes."""
    if spec.kind == "kernel":
        return KernelInstance(spec)
    if spec.kind == "fillp":
        return FillpInstance(spec)
    if spec.kind == "smoltcp":
        return SmolInstance(spec)
    raise ValueError(f"stack kind {spec.kind!r} is not available in this version of dmm")
