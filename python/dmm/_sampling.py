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

import collections
import logging
import os
import threading
import time as _time
import weakref
from typing import Any, Optional

from . import reactor
from . import runtime as _runtime
from .rd.paths import sample_from_counters, since

__all__ = ["PathSampled", "Probe", "SHORT", "SHORT_EVERY", "watch"]

log = logging.getLogger("dmm.paths")

#: Held while a probe is read: ``close()`` then cannot release the fd under
#: the reactor thread's ``getsockopt`` (no read of a reused fd number).
_lock = threading.Lock()
#: Sockets connected since the last tick (weak references): appended by
#: connecting threads (``deque.append`` is atomic), taken by the reactor.
_young: "collections.deque[weakref.ref[Any]]" = collections.deque()
#: Open sockets the reactor samples while they live (reactor thread only).
_live: "dict[int, weakref.ref[Any]]" = {}
_next_tick = 0.0
_hooked = False


def _forked() -> None:
    """In a forked child: the parent's reactor and sockets are not here."""
    global _hooked
    _hooked = False
    _young.clear()
    _live.clear()


os.register_at_fork(after_in_child=_forked)

#: A connection that lived less than this (seconds) is a short one: of a
#: stream of short connections to one address, one per
#: :data:`SHORT_EVERY` seconds leaves a sample (each would say the same:
#: an RTT, no loss or rate), so a server-to-server RPC pattern at tens of
#: thousands of connections a second pays for path knowledge only once a
#: second. Longer connections always leave theirs.
SHORT = 0.05
SHORT_EVERY = 1.0
_short_last: dict[str, float] = {}


class Probe:
    """One connection's sampling state: where to, since when, and the
    counters its last sample had reached."""

    __slots__ = ("address", "started", "last", "before", "every")

    def __init__(self, address: str, every: float = 0.0):
        self.address = address
        self.started = self.last = _time.monotonic()
        self.before: dict[str, int] = {}
        #: The reactor samples the connection every this many seconds (0: never).
        self.every = every


class PathSampled:
    """``close()`` leaves the connection's measurements in L-RD first."""

    __slots__ = ()

    def close(self):
        probe = self._dmm_path
        if probe is not None:
            now = _time.monotonic()
            if probe.every <= 0 or now - probe.last < probe.every:
                # The reactor reads only connections a sample interval old,
                # so it leaves this one alone: no lock needed.
                self._dmm_path = None
                if not self._closed and _worth_a_sample(probe, now):
                    _record(self, probe, final=True)
            else:
                with _lock:
                    probe, self._dmm_path = self._dmm_path, None
                    if probe is not None and not self._closed:
                        _record(self, probe, final=True)
        super().close()


def _worth_a_sample(probe: Probe, now: float) -> bool:
    """Whether a closing connection leaves a sample: a long one always, a
    short one if its address had none from a short one lately."""
    if now - probe.started >= SHORT:
        return True
    if now - _short_last.get(probe.address, -SHORT_EVERY) < SHORT_EVERY:
        return False
    if len(_short_last) >= 4096:  # a scan of many addresses: start over
        _short_last.clear()
    _short_last[probe.address] = now
    return True


def watch(sock: Any, address: str, every: float) -> None:
    """Gives ``sock`` (a connecting stream socket) a probe toward ``address``;
    with ``every`` > 0 it is also sampled that often while open."""
    sock._dmm_path = Probe(address, every)
    if every > 0:
        # Connect costs one weak reference and an append; the reactor sorts
        # the live from the closed once a second.
        _young.append(weakref.ref(sock))
        if not _hooked:
            _hook()


def _hook() -> None:
    global _hooked
    with _lock:
        if not _hooked:  # once per process (again after fork)
            _hooked = True
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
    if every <= 0:  # sampling turned off since
        _young.clear()
        _live.clear()
        return
    for _ in range(len(_young)):
        ref = _young.popleft()
        _live[id(ref)] = ref
    for key, ref in list(_live.items()):
        sock = ref()
        if sock is None or sock._dmm_path is None:
            del _live[key]  # closed (or gone) since
            continue
        with _lock:
            probe: Optional[Probe] = sock._dmm_path
            if probe is None or now - probe.last < every or sock.fileno() < 0:
                continue
            _record(sock, probe, final=False)


def _record(sock: Any, probe: Probe, final: bool) -> None:
    """Reads ``sock``'s counters and records what changed since the probe's
    last sample (with ``_lock`` held, or by ``close()`` of a connection the
    reactor does not read)."""
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
