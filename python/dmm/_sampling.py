"""Path samples from connections (the producer side of :mod:`dmm.rd.paths`).

A stream socket routed for a connect while path knowledge is on gets the
:class:`PathSampled` mixin and a :class:`Probe`. Its ``close()`` reads the
connection's counters once (kernel ``TCP_INFO``, or the user-space stack's
own estimators) and hands the sample to L-RD. A connection open for longer
than ``[paths] sample_every_s`` is also read from the reactor thread at that
interval, so a long transfer informs the connections opened meanwhile; each
sample covers what happened since the previous one. Nothing runs on
``send``/``recv``, and sockets of a config without path knowledge never get
the mixin.
"""

from __future__ import annotations

import logging
import os
import threading
import time as _time
import weakref
from typing import Any, Optional

from . import reactor
from . import runtime as _runtime
from .rd.paths import sample_from_counters, since

__all__ = ["PathSampled", "Probe", "watch"]

log = logging.getLogger("dmm.paths")

#: Held while a probe is read: ``close()`` then cannot release the fd under
#: the reactor thread's ``getsockopt`` (no read of a reused fd number).
_lock = threading.Lock()
_live: "weakref.WeakSet[Any]" = weakref.WeakSet()
_next_tick = 0.0
_hooked_pid = 0


class Probe:
    """One connection's sampling state: where to, since when, and the
    counters its last sample had reached."""

    __slots__ = ("address", "started", "last", "before")

    def __init__(self, address: str):
        self.address = address
        self.started = self.last = _time.monotonic()
        self.before: dict[str, int] = {}


class PathSampled:
    """``close()`` leaves the connection's measurements in L-RD first."""

    __slots__ = ()

    def close(self):
        with _lock:
            probe, self._dmm_path = self._dmm_path, None
            _live.discard(self)
            if probe is not None and not self._closed:
                _record(self, probe, final=True)
        super().close()


def watch(sock: Any, address: str, every: float) -> None:
    """Gives ``sock`` (a connecting stream socket) a probe toward ``address``;
    with ``every`` > 0 it is also sampled that often while open."""
    sock._dmm_path = Probe(address)
    if every > 0:
        global _hooked_pid
        with _lock:
            _live.add(sock)
            if _hooked_pid != os.getpid():  # once per process (again after fork)
                _hooked_pid = os.getpid()
                reactor.get().every_turn.append(_tick)


def _tick(now: float) -> None:
    """Reactor thread, every turn: samples the connections due (checked at
    most once a second)."""
    global _next_tick
    if now < _next_tick:
        return
    _next_tick = now + 1.0
    rt = _runtime._runtime
    every = rt.paths.paths_spec.sample_every if rt is not None and rt.paths is not None else 0
    if every <= 0:
        return
    with _lock:
        socks = list(_live)
    for sock in socks:
        with _lock:
            probe: Optional[Probe] = sock._dmm_path
            if probe is None or now - probe.last < every or sock.fileno() < 0:
                continue
            _record(sock, probe, final=False)


def _record(sock: Any, probe: Probe, final: bool) -> None:
    """Reads ``sock``'s counters and records what changed since the probe's
    last sample (called with ``_lock`` held)."""
    rt = _runtime._runtime
    if rt is None or rt.paths is None or not sock._dmm_stack:
        return
    try:
        counters = sock.dmm_counters()
    except (OSError, AttributeError, ValueError):  # not connected, or still racing
        return
    if not counters:
        return
    now = _time.monotonic()
    # A counter that went backwards is not this connection's (a stack
    # restarted under it): nothing is recorded from it.
    if any(counters.get(k, 0) < v for k, v in probe.before.items()):
        return
    sample = sample_from_counters(since(counters, probe.before), now - probe.last, sock._dmm_stack,
                                  connection=final)
    probe.before = {k: counters[k] for k in counters if isinstance(counters[k], int)}
    probe.last = now
    try:
        rt.paths.record_path(probe.address, sample)
    except Exception:  # knowledge is optional; closing the socket is not
        log.exception("dmm: could not record a path sample")
