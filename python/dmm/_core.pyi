"""Types of ``dmm._core``, the compiled Rust core (private: use ``dmm``).

Checked against the built module by ``mypy.stubtest`` (``tests/test_typing.py``).
"""

from _typeshed import ReadableBuffer as Buffer
from types import TracebackType
from typing import Any, final

__all__ = [
    "__version__",
    "Router",
    "CoreSocket",
    "Stack",
    "StackConfig",
    "OptionError",
    "stack_kinds",
    "parse_stack",
    "discovery_query",
    "parse_offer",
    "tcp_info",
    "uring_available",
    "Linkem",
]

__version__: str

#: A socket address as the stdlib gives it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
_Address = tuple[Any, ...]

class OptionError(ValueError):
    """A stack option is wrong: ``field`` names it, ``message`` says why."""

    field: str
    message: str

@final
class Router:
    """The routing table: prefix rules over stack ids, longest prefix, then
    priority, then the earlier rule."""

    def __new__(cls) -> Router: ...
    def __len__(self) -> int: ...
    def add(
        self,
        prefix: str,
        stacks: list[int],
        *,
        ports: tuple[int, int] = ...,
        kind: str | None = None,
        role: str | None = None,
        priority: int = 0,
        tag: int = 0,
    ) -> int:
        """Adds a rule and returns its id."""
    def remove(self, rule_id: int) -> bool:
        """Removes a rule by id; returns whether it existed."""
    def set_default(self, stacks: list[int]) -> None:
        """Sets the stacks used when no rule matches."""
    def lookup(self, addr: str, port: int, kind: str, role: str) -> tuple[int | None, list[int]]:
        """Decides for one request: ``(tag, stacks)``, tag None for the default route."""
    def candidates(self, addr: str, port: int, kind: str, role: str) -> list[int]:
        """Every matching rule's tag, best first."""

@final
class CoreSocket:
    """A socket of a user-space stack (or an adopted kernel socket) with the
    stdlib's blocking semantics; errors are the stdlib's OSErrors."""

    @property
    def stack(self) -> str:
        """The name of the stack instance carrying this socket."""
    def bind(self, addr: _Address) -> None: ...
    def listen(self, backlog: int) -> None: ...
    def accept(self) -> tuple[CoreSocket, _Address]: ...
    def connect(self, addr: _Address) -> None: ...
    def send(self, data: Buffer, flags: int = 0) -> int: ...
    def sendall(self, data: Buffer, flags: int = 0) -> None: ...
    def sendto(self, data: Buffer, flags: int, address: _Address) -> int: ...
    def recv(self, bufsize: int, flags: int = 0) -> bytes: ...
    def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int: ...
    def recvfrom(self, bufsize: int, flags: int = 0) -> tuple[bytes, _Address | None]: ...
    def recvfrom_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> tuple[int, _Address | None]: ...
    def shutdown(self, how: int) -> None: ...
    def close(self) -> None: ...
    def settimeout(self, timeout: float | None) -> None:
        """``None`` blocks, ``0.0`` is non-blocking, a positive float is a timeout."""
    def gettimeout(self) -> float | None: ...
    def setsockopt(self, level: int, name: int, value: Buffer) -> None: ...
    def getsockopt(self, level: int, name: int, buflen: int) -> bytes: ...
    def getsockname(self) -> _Address: ...
    def getpeername(self) -> _Address: ...
    def poll_fd(self) -> int:
        """The fd that polls readable when this socket is readable."""
    def write_poll_fd(self) -> int | None:
        """The fd that polls readable when it is writable, or None when
        ``poll_fd`` itself polls writable."""
    def readiness(self) -> tuple[bool, bool, bool]:
        """``(readable, writable, error)`` now."""
    def counters(self) -> dict[str, int]:
        """Per-socket counters."""

@final
class StackConfig:
    """A checked ``[[stack]]`` table (see ``parse_stack``)."""

    @property
    def kind(self) -> str:
        """The kind's name."""
    def values(self) -> dict[str, Any]:
        """Every field with the value in force (lists as tuples)."""

@final
class Stack:
    """One stack instance of any kind."""

    def __new__(cls, name: str, config: StackConfig) -> Stack: ...
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def protocol(self) -> str:
        """The protocol its connections speak on the wire ("tcp", "fillp", ...)."""
    @property
    def placement(self) -> tuple[str, int, bool]:
        """Where its sockets live: ``("kernel", protocol, mptcp)`` or ``("core", 0, False)``."""
    def attributes(self) -> dict[str, Any]:
        """Facts fixed at open (the kernel's ``io`` after any fallback, a device)."""
    def carries(self, family_: int, kind: str) -> str | None:
        """None if the instance carries this family and kind, else why not."""
    def describe(self) -> str: ...
    def socket(self, family_: int, kind: str) -> CoreSocket:
        """A new socket on this instance."""
    def adopt(self, fd: int, family_: int, kind: str) -> CoreSocket:
        """Takes over a kernel socket's fd."""
    def bind_address(self, family_: int, host: str) -> str:
        """Where a core socket binds when the application bound ``host``."""
    def counters(self) -> dict[str, int]: ...
    def restart(self) -> None:
        """Brings an instance that went down back up."""
    def stop(self) -> None:
        """Takes the instance down; its sockets then fail with ENETDOWN."""

@final
class Linkem:
    """A running link emulator between two TAP devices."""

    @staticmethod
    def start(
        dev_a: str,
        dev_b: str,
        *,
        netns_a: str | None = None,
        netns_b: str | None = None,
        params: str = "",
        mtu: int = 1500,
        txqueuelen: int = 1000,
        spin_us: int = 80,
        realtime: int = 0,
        device: str = "tap",
    ) -> Linkem: ...
    @staticmethod
    def parse_params(params: str) -> tuple[str, str]:
        """The normalized (a->b, b->a) forms of ``params``; ValueError if bad."""
    def set_params(self, direction: str, params: str, *, replace: bool = False) -> None: ...
    def params(self, direction: str) -> str: ...
    def stats(self) -> dict[str, dict[str, Any]]: ...
    def reset_stats(self) -> None: ...
    def devices(self) -> tuple[str, str]: ...
    @property
    def running(self) -> bool: ...
    def stop(self) -> None: ...
    def __enter__(self) -> Linkem: ...
    def __exit__(self, *_args: type[BaseException] | BaseException | TracebackType | None) -> None: ...

def stack_kinds() -> list[tuple[str, str, list[str]]]:
    """The stack kinds of this build: ``[(name, summary, fields), ...]``."""

def parse_stack(kind: str, options: dict[str, Any]) -> StackConfig:
    """Checks a ``[[stack]]`` table's fields for ``kind``; raises OptionError."""

def discovery_query(nonce: bytes) -> bytes:
    """A DISCOVER datagram carrying ``nonce`` (16 bytes)."""

def parse_offer(data: bytes, nonce: bytes) -> list[tuple[str, int]]:
    """The ``[(protocol, port), ...]`` of an OFFER answering ``nonce``."""

def tcp_info(fd: int) -> dict[str, int]:
    """Counters of a kernel TCP socket from TCP_INFO."""

def uring_available() -> str | None:
    """None if this process may use io_uring, else the reason it may not."""
