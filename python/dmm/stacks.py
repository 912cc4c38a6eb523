"""Stack instances as the Python facade sees them.

Each instance wraps its Rust core object and knows how to take over a
``dmm.socket.socket`` once the router has chosen it (:meth:`attach`). Only
the kernel kind exists in this version; the user-space TCP stack and the
FillP transport plug in here with the same three methods.
"""

from __future__ import annotations

import socket as _stdsocket
import threading
from typing import Any, Optional

from . import _core
from .config import StackSpec

__all__ = ["IPPROTO_MPTCP", "KernelInstance", "StackInstance", "make_instance"]

#: ``IPPROTO_MPTCP`` (CPython exposes it only from 3.10 on some builds).
IPPROTO_MPTCP = getattr(_stdsocket, "IPPROTO_MPTCP", 262)

_INET = (_stdsocket.AF_INET, _stdsocket.AF_INET6)


class StackInstance:
    """Interface of a stack instance (documentation and ``isinstance`` only)."""

    name: str
    kind: str

    def can_carry(self, family: int, type: int) -> Optional[str]:
        """``None`` if this instance can carry such a socket, else why not."""
        raise NotImplementedError

    def attach(self, sock: Any, role: str) -> None:
        """Makes ``sock`` a socket of this instance (may replace its fd in place)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for ``dmm stacks``."""
        raise NotImplementedError

    def counters(self) -> dict[str, int]:
        """Instance-wide counters."""
        raise NotImplementedError


class KernelInstance(StackInstance):
    """The kernel's TCP/IP (or MPTCP) stack.

    Data moves through CPython's own socket methods on the same fd, so a
    kernel socket costs exactly what a stdlib socket costs. With
    ``io = "uring"``, blocking sends and receives go through the Rust core's
    io_uring path instead (falling back to syscalls when io_uring is refused).
    """

    kind = "kernel"

    def __init__(self, spec: StackSpec):
        self.name = spec.name
        self.protocol = spec.protocol
        self.core = _core.KernelStack(spec.name, spec.protocol, spec.io)
        self.io = self.core.io
        self._lock = threading.Lock()
        self._counts = {"sockets": 0, "connects": 0, "listens": 0, "accepts": 0, "datagram_sockets": 0}

    def can_carry(self, family: int, type: int) -> Optional[str]:
        if family not in _INET:
            return f"address family {family!r} is not IPv4 or IPv6"
        if self.protocol == "mptcp" and type != _stdsocket.SOCK_STREAM:
            return "MPTCP carries stream sockets only"
        if type not in (_stdsocket.SOCK_STREAM, _stdsocket.SOCK_DGRAM):
            return f"socket type {type!r} is not stream or datagram"
        return None

    def attach(self, sock: Any, role: str) -> None:
        if sock.type == _stdsocket.SOCK_STREAM:
            want = IPPROTO_MPTCP if self.protocol == "mptcp" else _stdsocket.IPPROTO_TCP
            have = sock.proto or _stdsocket.IPPROTO_TCP
            if have != want:
                sock._dmm_reopen(want)
        if self.io == "uring":
            kind = "stream" if sock.type == _stdsocket.SOCK_STREAM else "dgram"
            sock._dmm_use_core(self.core.adopt(sock.fileno(), sock.family, kind))
        self.count(role)

    def count(self, role: str) -> None:
        """Counts a socket taken over in ``role`` (connect, listen, accept, sendto)."""
        key = {"connect": "connects", "listen": "listens", "accept": "accepts", "sendto": "datagram_sockets"}[role]
        with self._lock:
            self._counts["sockets"] += 1
            self._counts[key] += 1

    def describe(self) -> str:
        return self.core.describe()

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def make_instance(spec: StackSpec) -> StackInstance:
    """Builds the instance a ``[[stack]]`` entry describes."""
    if spec.kind == "kernel":
        return KernelInstance(spec)
    raise ValueError(f"stack kind {spec.kind!r} is not available in this version of dmm")
