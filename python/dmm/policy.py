"""Policy hooks: Python callables that choose a stack for a socket.

A hook receives a :class:`Request` and returns ``None`` (no opinion: the next
hook, then the routing table, decides), a stack name, a list of stack names
in preference order, or a :class:`Decision` with a reason::

    import dmm.policy

    @dmm.policy.register
    def bulk_over_mptcp(req):
        if req.properties.get("bulk") and req.role == "connect":
            return dmm.policy.Decision(["mptcp", "kernel"], reason="bulk transfer")
        return None

Hooks run in registration order at ``connect()``, ``listen()`` and the first
``sendto()``. A hook that raises, or returns something that is not a
decision, is logged and ignored: the routing table decides and the
application carries on. On a socket with a timeout, the hooks run within
it: a hook still running when ``connect()``'s timeout runs out is abandoned
and logged, the table decides, and ``connect()`` raises ``TimeoutError`` as
the stdlib's does when its time is up.

For a listener the answer may name several stacks: the listening socket then
listens on every one of them that can carry it (see ``[listen]`` in
:mod:`dmm.config`).

Hooks registered with ``roles=("accept",)`` (or ``roles=None``, every role)
also run for each connection a listener accepts. ``Request.address`` is then
the client's address, ``Request.port`` the listener's port and
``Request.stack`` the stack the connection arrived on; the answer lists the
stacks allowed to serve that client, and a connection that arrived on any
other stack is refused (closed at once)::

    @dmm.policy.register(roles=("accept",))
    def lan_clients_on_lan0(req):
        if ipaddress.ip_address(req.address) in LAN:
            return "lan0"
        return "kernel"

Accept is opt-in so that a hook written for outgoing connections, which may
return a stack name whatever it is asked, never refuses clients.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from . import _deadline

__all__ = [
    "DEFAULT_ROLES",
    "Decision",
    "Hook",
    "Request",
    "clear",
    "hooks",
    "register",
    "unregister",
]

log = logging.getLogger("dmm.policy")


@dataclass(frozen=True)
class Request:
    """What a hook sees about the socket being routed."""

    #: ``"connect"``, ``"listen"``, ``"sendto"`` or ``"accept"``.
    role: str
    #: ``socket.AF_INET`` or ``socket.AF_INET6``.
    family: int
    #: ``socket.SOCK_STREAM`` or ``socket.SOCK_DGRAM``.
    type: int
    #: The numeric destination address (the bind address for listeners, the
    #: client's address for accepts).
    address: str
    #: The destination port (the bind port for listeners and accepts).
    port: int
    #: The host name the application gave, when it gave one.
    host: Optional[str] = None
    #: Application properties set with ``properties=`` or ``DMM_PROPERTIES``.
    properties: Mapping[str, Any] = field(default_factory=dict)
    #: For accepts: the stack the connection arrived on.
    stack: Optional[str] = None
    #: What was measured on the way to ``address`` (:class:`dmm.rd.paths.Estimate`:
    #: ``rtt_ms``, ``loss``, ``rate_mbit``, ``samples``, ``age_s``), or ``None``.
    path: Optional[Any] = None


@dataclass(frozen=True)
class Decision:
    """A hook's answer: stacks in preference order, and why."""

    stacks: Sequence[str]
    reason: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.stacks, str):
            object.__setattr__(self, "stacks", (self.stacks,))
        else:
            object.__setattr__(self, "stacks", tuple(self.stacks))


Hook = Callable[[Request], Union[None, str, Sequence[str], Decision]]

#: The roles a hook runs for unless it says otherwise.
DEFAULT_ROLES = frozenset({"connect", "listen", "sendto"})
_ROLES = DEFAULT_ROLES | {"accept"}

_lock = threading.Lock()
# (label, hook, roles, inline): an immutable tuple, replaced whole, so readers need no lock.
_hooks: tuple[tuple[str, Hook, frozenset[str], bool], ...] = ()
#: Whether some hook runs for accepts (read on every accept, so kept apart).
accept_hooks = False


def register(hook: Optional[Hook] = None, *, name: Optional[str] = None,
             roles: Optional[Sequence[str]] = tuple(DEFAULT_ROLES), inline: bool = False) -> Any:
    """Adds a hook; returns it unchanged.

    Usable as ``register(fn)``, ``@register`` or ``@register(roles=...)``.
    ``roles``: the calls the hook is asked about (default connect, listen and
    sendto; ``None`` means all, accept included). ``inline``: on a socket with
    a timeout, run the hook in the calling thread, unbounded, instead of on
    a worker thread within the timeout: for a hook that never blocks, it
    saves the handoff (measured: 6.5k connects/s with a worker, 12.4k inline).
    """
    wanted = _ROLES if roles is None else frozenset(roles)
    if isinstance(roles, str) or not wanted <= _ROLES or not wanted:
        raise ValueError(f"roles must be a non-empty list drawn from {sorted(_ROLES)}, got {roles!r}")
    if hook is None:
        return lambda fn: register(fn, name=name, roles=roles, inline=inline)
    global _hooks, accept_hooks
    if not callable(hook):
        raise TypeError(f"a policy hook must be callable, got {hook!r}")
    label = name or getattr(hook, "__qualname__", None) or repr(hook)
    with _lock:
        _hooks = _hooks + ((label, hook, wanted, inline),)
        accept_hooks = any("accept" in h[2] for h in _hooks)
    return hook


def unregister(hook: Hook) -> None:
    """Removes a hook; ``ValueError`` if it was not registered."""
    global _hooks, accept_hooks
    with _lock:
        kept = tuple(h for h in _hooks if h[1] is not hook)
        if len(kept) == len(_hooks):
            raise ValueError(f"{hook!r} is not a registered policy hook")
        _hooks = kept
        accept_hooks = any("accept" in h[2] for h in _hooks)


def clear() -> None:
    """Removes every hook."""
    global _hooks, accept_hooks
    with _lock:
        _hooks = ()
        accept_hooks = False


def hooks() -> tuple[tuple[str, Hook], ...]:
    """The registered hooks as ``(name, hook)`` pairs, in the order they run."""
    return tuple((label, hook) for label, hook, _roles, _inline in _hooks)


def ask(request: Request, timeout: Optional[float] = None) -> Optional[tuple[str, Decision]]:
    """Runs the hooks that asked for ``request.role``, in order; the first
    answer wins, as ``(hook name, decision)``.

    Never raises because of a hook: failures are logged and skipped. With
    ``timeout`` (seconds: what is left of the socket's timeout), the hooks
    together get that long: each runs on a worker thread (unless registered
    ``inline``), and one still running at the end is abandoned (it runs on,
    its answer unused), logged, and ``None`` lets the routing table decide.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    for label, hook, roles, inline in _hooks:
        if request.role not in roles:
            continue
        if deadline is None or inline:
            answer = _run(label, hook, request)
        else:
            try:
                answer = _deadline.call(deadline - time.monotonic(), _run, label, hook, request)
            except _deadline.Expired:
                log.error("dmm policy hook %s was still running when the socket's timeout (%.3g s) ran out for %s "
                          "to %s port %d; abandoned it, the routing table decides", label, timeout, request.role,
                          request.address, request.port)
                return None
        if answer is None:
            continue
        decision = _as_decision(answer)
        if decision is None:
            log.error("dmm policy hook %s returned %r, which is not a decision; ignoring it", label, answer)
            continue
        return label, decision
    return None


def _run(label: str, hook: Hook, request: Request) -> Any:
    """One hook's answer; ``None`` (logged) if it raised."""
    try:
        return hook(request)
    except Exception:  # a hook must never take the application down
        log.exception("dmm policy hook %s raised; ignoring it for this socket", label)
        return None


def _as_decision(answer: Any) -> Optional[Decision]:
    if isinstance(answer, Decision):
        return answer if answer.stacks and all(isinstance(s, str) for s in answer.stacks) else None
    if isinstance(answer, str):
        return Decision((answer,))
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(s, str) for s in answer):
        return Decision(tuple(answer))
    return None
