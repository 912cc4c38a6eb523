"""A process's view of the host's L-RD, and the RD thread that keeps it.

``connect()`` asks :meth:`LocalRD.facts`, :meth:`LocalRD.local_listener`
and :meth:`LocalRD.path_estimate`: dict lookups in this process, never the store. Everything that touches the
store or the network runs in the process's reactor thread
(:mod:`dmm.reactor`): writing what was learned, re-reading what other
processes learned (when SQLite's ``data_version`` says something changed),
removing listeners of dead processes, adding closed connections' path
samples to the shared estimates, sending DISCOVER queries and reading their
OFFERs.

A store that cannot be opened or written is logged once; knowledge then
lives in this process only, and routing carries on.
"""

from __future__ import annotations

import atexit
import collections
import errno
import logging
import os
import select
import socket as _std
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .. import _core, reactor
from ..config import PathsSpec
from ..config import RDSpec as Settings
from .paths import Aggregate, Estimate, Sample, keys_for
from .store import Listener, PeerFact, Store, default_dir, process_start

__all__ = ["LocalRD", "get_local", "wire_protocol"]

log = logging.getLogger("dmm.rd")

#: Pauses between tries of a store another process holds locked (each try
#: already waits out SQLite's own busy timeout).
_BUSY_PAUSES = (0.02, 0.1, 0.5)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` says another connection holds the lock."""
    text = str(exc)
    return "locked" in text or "busy" in text


#: Protocols that reach the same servers: an MPTCP connect falls back to TCP
#: and an MPTCP listener takes TCP clients, so knowledge keeps them as one.
_SAME = {"mptcp": "tcp"}


def wire_protocol(protocol: str) -> str:
    """The name knowledge is kept under for ``protocol``."""
    return _SAME.get(protocol, protocol)


class LocalRD:
    """The in-process cache of the host's L-RD plus the thread behind it."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = Path(settings.store) if settings.store else default_dir()
        self._peers: dict[tuple[str, int], dict[str, PeerFact]] = {}
        self._listeners: dict[int, list[Listener]] = {}
        self._paths: dict[str, Aggregate] = {}
        #: How path knowledge is kept (set by :func:`get_local`).
        self.paths_spec = PathsSpec()
        self.counters: collections.Counter = collections.Counter()
        #: Bumped whenever the knowledge of peers or listeners changes
        #: (decisions cached on it).
        self.version = 0
        #: Bumped whenever a path estimate changes.
        self.paths_version = 0
        #: Central RD (:class:`dmm.rd.central.CentralRD`), when configured.
        self.central: Any = None
        self.reactor = reactor.get()
        self._hooked = False
        self._writes: list[PeerFact] = []
        self._samples: list[tuple[str, Sample, float]] = []
        self._lock = threading.Lock()
        # Held while a batch goes to the store, so that the exit flush waits
        # for the RD thread's batch instead of the process ending under it.
        self._flush_lock = threading.Lock()
        self._store: Optional[Store] = None
        self._store_failed = False
        self._version = -1
        self._next_refresh = 0.0
        self._next_prune = 0.0
        self._pid = os.getpid()
        self._pid_start = process_start(self._pid)
        self._load()
        # A program that closes its last connection and exits at once would
        # otherwise take that connection's knowledge with it.
        atexit.register(self._flush_at_exit)
        # Start the reactor now, not inside the first connect that learns.
        self.submit(lambda: None)

    # -- what connect() reads (any thread, no I/O) ----------------------------

    def facts(self, address: str, port: int) -> dict[str, PeerFact]:
        """What is known now about ``address:port``, by wire protocol."""
        known = self._peers.get((address, port))
        if not known:
            return {}
        now = time.time()
        return {p: f for p, f in known.items() if f.expires > now}

    def local_listener(self, address: str, port: int) -> Optional[Listener]:
        """A live listener of this host on ``port`` that ``address`` reaches."""
        for lst in self._listeners.get(port, ()):
            if lst.address in ("0.0.0.0", "::") or lst.address == address:
                return lst
        return None

    def listeners(self) -> list[Listener]:
        """Every listener of this host, as last read."""
        return [lst for group in self._listeners.values() for lst in group]

    def peers(self) -> list[PeerFact]:
        """Every unexpired fact, as this process knows it."""
        now = time.time()
        return [f for group in self._peers.values() for f in group.values() if f.expires > now]

    def path_estimate(self, address: str) -> Optional[Estimate]:
        """The path estimate for ``address``: its own, else its prefix's."""
        spec = self.paths_spec
        now = time.time()
        for key in keys_for(address, spec.prefix_v4, spec.prefix_v6):
            agg = self._paths.get(key)
            if agg is not None:
                est = agg.estimate(key, now, spec.half_life)
                if est is not None:
                    return est
        # Nothing measured from here: what other hosts shared, if anything.
        central = self.central
        if central is not None:
            return central.path_estimate(address, spec.prefix_v4, spec.prefix_v6, spec.half_life)
        return None

    # -- learning (any thread) ------------------------------------------------

    def learn(self, address: str, port: int, protocol: str, speaks: bool, source: str,
              rtt_ms: Optional[float] = None) -> None:
        """Records whether ``address:port`` speaks ``protocol``: at once in
        this process, and in the store from the RD thread."""
        now = time.time()
        ttl = self.settings.ttl if speaks else self.settings.negative_ttl
        proto = wire_protocol(protocol)
        old = self._peers.get((address, port), {}).get(proto)
        if rtt_ms is None and old is not None and old.speaks == speaks:
            rtt_ms = old.rtt_ms
        fact = PeerFact(address, port, proto, speaks, source, now, now + ttl, rtt_ms)
        # Copy on write: readers on other threads see one dict or the other.
        group = dict(self._peers.get((address, port), {}))
        group[proto] = fact
        self._peers[(address, port)] = group
        self.version += 1
        with self._lock:
            self._writes.append(fact)
        self.submit(lambda: None)  # the next turn writes it

    def record_path(self, address: str, sample: Sample) -> None:
        """Counts a closed connection's measurements into the estimates of
        ``address`` and its prefix: at once here, in the store from the RD
        thread."""
        if sample.empty():
            return
        spec, now = self.paths_spec, time.time()
        keys = keys_for(address, spec.prefix_v4, spec.prefix_v6)
        for key in keys:
            old = self._paths.get(key) or Aggregate(updated=now)
            self._paths[key] = old.add(sample, now, spec.half_life)
        with self._lock:
            idle = not self._samples
            self._samples.extend((key, sample, now) for key in keys)
        self.paths_version += 1
        self.counters["path_samples"] += 1
        if idle:
            # The first sample of a batch wakes the RD thread; the rest ride
            # along with its write (one wake-up and one transaction per batch).
            self.submit(lambda: None)

    def forget_paths(self) -> None:
        """Drops the path knowledge (``dmm paths --forget``)."""
        self._paths = {}
        self.paths_version += 1
        with self._lock:
            self._samples = []
        self.submit(lambda: self._with_store(lambda st: st.forget_paths()))

    def forget_peers(self) -> None:
        """Drops what this host learned about peers (``dmm rd forget``)."""
        self._peers = {}
        self.version += 1
        with self._lock:
            self._writes = []
        self.submit(lambda: self._with_store(lambda st: st.forget()))

    def advertise(self, address: str, port: int, protocols: list[tuple[str, int]], stacks: tuple[str, ...]) -> None:
        """Registers a listener of this process."""
        lst = Listener(address, port, tuple(protocols), stacks, self._pid, self._pid_start, time.time())
        group = [x for x in self._listeners.get(port, []) if not (x.pid == self._pid and x.address == address)]
        self._listeners[port] = group + [lst]
        self.version += 1
        self.submit(lambda: self._with_store(lambda st: st.add_listener(lst)))

    def withdraw(self, address: str, port: int) -> None:
        """Removes a listener of this process (it closed)."""
        group = [x for x in self._listeners.get(port, []) if not (x.pid == self._pid and x.address == address)]
        self._listeners[port] = group
        self.version += 1
        self.submit(lambda: self._with_store(lambda st: st.remove_listener(address, port, self._pid)))

    def discover(self, family: int, address: str, port: int) -> None:
        """Asks ``address:port`` (its FillP side) what it accepts on, in the
        background; the answer, or its absence, is learned."""
        self.counters["discovery_queries"] += 1
        self.submit(lambda: self._send_query(family, address, port))

    # -- the RD thread ----------------------------------------------------------

    def submit(self, job: Callable[[], None]) -> None:
        """Runs ``job`` on the reactor thread (:mod:`dmm.reactor`)."""
        if not self._hooked:
            self._hooked = True
            self.reactor.every_turn.append(self._periodic)
        self.reactor.submit(job)

    def _periodic(self, now: float) -> None:
        """Every turn of the reactor: write what was learned; re-read what
        other processes wrote (at most once a second, when SQLite says the
        store changed); drop listeners of dead processes (every 10 s)."""
        self._flush_writes()
        if now >= self._next_refresh:
            self._next_refresh = now + 1.0
            self._refresh()
        if now >= self._next_prune:
            self._next_prune = now + 10.0
            self._with_store(lambda st: st.prune_dead())
            self._with_store(lambda st: st.prune_paths(time.time() - self.paths_spec.max_age))

    # -- store ----------------------------------------------------------------

    def _with_store(self, op: Callable[[Store], Any]) -> Any:
        """Runs ``op`` on the store (RD thread); ``None`` if it could not
        (see :meth:`_try_store`)."""
        return self._try_store(op)[1]

    def _try_store(self, op: Callable[[Store], Any]) -> tuple[bool, Any]:
        """``(True, op(store))``, or ``(False, None)``. Another process
        holding the store's lock past the busy timeout (two processes opening
        a new store at once can meet that) is waited out a few times, then
        left for the next turn: the store stays in use. Any other failure (a
        bad or unwritable store) is logged once and leaves knowledge in this
        process for good."""
        if self._store_failed:
            return False, None
        for pause in _BUSY_PAUSES:
            try:
                if self._store is None:
                    self._store = Store(self.path / "lrd.sqlite")
                return True, op(self._store)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    self._fail_store(exc)
                    return False, None
                self.counters["store_busy"] += 1
                self._drop_store()
                time.sleep(pause)
            except Exception as exc:  # sqlite3.Error, OSError: a bad or unwritable store
                self._fail_store(exc)
                return False, None
        return False, None

    def _fail_store(self, exc: Exception) -> None:
        self.counters["store_errors"] += 1
        if not self._store_failed:
            log.warning("dmm: the L-RD store %s is not usable (%s); knowledge stays in this process",
                        self.path / "lrd.sqlite", exc)
        self._store_failed = True
        self._drop_store()

    def _drop_store(self) -> None:
        if self._store is not None:
            try:
                self._store.close()
            except Exception:
                pass
            self._store = None

    def _load(self) -> None:
        """Reads the store once, at start (in the caller's thread)."""
        self._with_store(self._read_all)

    def _read_all(self, st: Store) -> None:
        self._version = st.data_version()
        peers: dict[tuple[str, int], dict[str, PeerFact]] = {}
        for f in st.peers():
            peers.setdefault((f.address, f.port), {})[f.protocol] = f
        # What this process learned and has not written yet wins.
        with self._lock:
            pending = list(self._writes)
        for f in pending:
            peers.setdefault((f.address, f.port), {})[f.protocol] = f
        self._peers = peers
        listeners: dict[int, list[Listener]] = {}
        for lst in st.listeners():
            if lst.pid == self._pid or process_start(lst.pid) == lst.pid_start:
                listeners.setdefault(lst.port, []).append(lst)
        self._listeners = listeners
        self.version += 1
        paths = st.paths()
        with self._lock:
            pending_samples = list(self._samples)
        for key, sample, when in pending_samples:
            old = paths.get(key) or Aggregate(updated=when)
            paths[key] = old.add(sample, when, self.paths_spec.half_life)
        self._paths = paths
        self.paths_version += 1

    def _refresh(self) -> None:
        def check(st: Store) -> None:
            if st.data_version() != self._version:
                self._read_all(st)
        self._with_store(check)

    def _flush_at_exit(self) -> None:
        """Writes what the RD thread has not, over a connection of its own
        (the RD thread may be in the middle of using its one)."""
        if not self._flush_lock.acquire(timeout=5.0):
            return
        try:
            self._flush_rest_at_exit()
        finally:
            self._flush_lock.release()

    def _flush_rest_at_exit(self) -> None:
        with self._lock:
            batch, self._writes = self._writes, []
            samples, self._samples = self._samples, []
        if not (batch or samples) or self._store_failed:
            return
        for pause in _BUSY_PAUSES:
            try:
                st = Store(self.path / "lrd.sqlite")
                try:
                    # Learning is idempotent; the samples, added last, are
                    # added once (a busy try rolls them back).
                    if batch:
                        st.learn(batch)
                    if samples:
                        st.add_samples(samples, self.paths_spec.half_life)
                finally:
                    st.close()
                return
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    log.warning("dmm: could not write L-RD knowledge at exit: %s", exc)
                    return
                time.sleep(pause)
            except Exception as exc:  # sqlite3.Error, OSError: exiting anyway
                log.warning("dmm: could not write L-RD knowledge at exit: %s", exc)
                return
        log.warning("dmm: could not write L-RD knowledge at exit: the store stayed locked by another process")

    def _flush_writes(self) -> None:
        with self._flush_lock:
            self._flush_batch()

    def _flush_batch(self) -> None:
        with self._lock:
            batch, self._writes = self._writes, []
            samples, self._samples = self._samples, []
        if batch and not self._try_store(lambda st: st.learn(batch))[0] and not self._store_failed:
            with self._lock:  # busy: the next turn tries again, in order
                self._writes[:0] = batch
        if samples and not self._try_store(lambda st: st.add_samples(samples, self.paths_spec.half_life))[0] \
                and not self._store_failed:
            with self._lock:
                self._samples[:0] = samples

    # -- discovery --------------------------------------------------------------

    def _send_query(self, family: int, address: str, port: int) -> None:
        nonce = os.urandom(16)
        sock = _std.socket(family, _std.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            # Connected: an ICMP port unreachable then comes back as
            # ECONNREFUSED, which says "no FillP here" at once.
            sock.connect((address, port))
            sock.send(_core.discovery_query(nonce))
        except OSError as exc:
            sock.close()
            self._no_offer(address, port, exc.errno)
            return
        fd = sock.fileno()
        done = [False]

        def finish() -> None:
            if not done[0]:
                done[0] = True
                self.reactor.unwatch(fd)
                sock.close()

        def ready(_revents: int) -> bool:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return False
            except OSError as exc:
                finish()
                self._no_offer(address, port, exc.errno)
                return True
            try:
                offer = _core.parse_offer(data, nonce)
            except ValueError:
                self.counters["discovery_bad_answers"] += 1
                return False  # not our answer: keep waiting
            finish()
            self.counters["discovery_answers"] += 1
            self._learn_offer(address, port, offer)
            return True

        def expire() -> None:
            if not done[0]:
                finish()
                self._no_offer(address, port, None)

        self.reactor.watch(fd, select.POLLIN, ready)
        self.reactor.at(time.monotonic() + self.settings.discovery_timeout, expire)

    def _learn_offer(self, address: str, port: int, offer: list[tuple[str, int]]) -> None:
        offered = {wire_protocol(p) for p, p_port in offer if p_port == port}
        for proto in offered:
            self.learn(address, port, proto, True, "answer")
        # It answered, so it speaks FillP here even if it did not list it.
        if "fillp" not in offered:
            self.learn(address, port, "fillp", True, "answer")
        if "tcp" not in offered:
            self.learn(address, port, "tcp", False, "answer")

    def _no_offer(self, address: str, port: int, err: Optional[int]) -> None:
        self.counters["discovery_unanswered"] += 1
        if err in (None, errno.ECONNREFUSED):
            self.learn(address, port, "fillp", False, "probe")


_locals: dict[Path, LocalRD] = {}
_locals_lock = threading.Lock()


def get_local(settings: Settings, paths: Optional[PathsSpec] = None) -> LocalRD:
    """The process's :class:`LocalRD` for the store ``settings`` name (one
    per store, shared by runtimes built one after the other)."""
    path = Path(settings.store) if settings.store else default_dir()
    with _locals_lock:
        rd = _locals.get(path)
        if rd is None:
            rd = _locals[path] = LocalRD(settings)
        rd.settings = settings
        if paths is not None:
            rd.paths_spec = paths
        return rd
