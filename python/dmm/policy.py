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
application carries on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

__all__ = [
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

    #: ``"connect"``, ``"listen"`` or ``"sendto"``.
    role: str
    #: ``socket.AF_INET`` or ``socket.AF_INET6``.
    family: int
    #: ``socket.SOCK_STREAM`` or ``socket.SOCK_DGRAM``.
    type: int
    #: The numeric destination address (the bind address for listeners).
    address: str
    #: The destination port (the bind port for listeners).
    port: int
    #: The host name the application gave, when it gave one.
    host: Optional[str] = None
    #: Application properties set with ``properties=`` or ``DMM_PROPERTIES``.
    properties: Mapping[str, Any] = field(default_factory=dict)


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

_lock = threading.Lock()
_hooks: tuple[tuple[str, Hook], ...] = ()


def register(hook: Hook, *, name: Optional[str] = None) -> Hook:
    """Adds a hook (also usable as a decorator); returns it unchanged."""
    global _hooks
    if not callable(hook):
        raise TypeError(f"a policy hook must be callable, got {hook!r}")
    label = name or getattr(hook, "__qualname__", None) or repr(hook)
    with _lock:
        _hooks = _hooks + ((label, hook),)
    return hook


def unregister(hook: Hook) -> None:
    """Removes a hook; ``ValueError`` if it was not registered."""
    global _hooks
    with _lock:
        kept = tuple(h for h in _hooks if h[1] is not hook)
        if len(kept) == len(_hooks):
            raise ValueError(f"{hook!r} is not a registered policy hook")
        _hooks = kept


def clear() -> None:
    """Removes every hook."""
    global _hooks
    with _lock:
        _hooks = ()


def hooks() -> tuple[tuple[str, Hook], ...]:
    """The registered hooks as ``(name, hook)`` pairs, in the order they run."""
    return _hooks


def ask(request: Request) -> Optional[tuple[str, Decision]]:
    """Runs the hooks in order; the first answer wins, as ``(hook name, decision)``.

    Never raises because of a hook: failures are logged and skipped.
    """
    for label, hook in _hooks:
        try:
            answer = hook(request)
        except Exception:  # a hook must never take the application down
            log.exception("dmm policy hook %s raised; ignoring it for this socket", label)
            continue
        if answer is None:
            continue
        decision = _as_decision(answer)
        if decision is None:
            log.error("dmm policy hook %s returned %r, which is not a decision; ignoring it", label, answer)
            continue
        return label, decision
    return None


def _as_decision(answer: Any) -> Optional[Decision]:
    if isinstance(answer, Decision):
        return answer if answer.stacks and all(isinstance(s, str) for s in answer.stacks) else None
    if isinstance(answer, str):
        return Decision((answer,))
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(s, str) for s in answer):
        return Decision(tuple(answer))
    return None
