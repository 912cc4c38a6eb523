"""The host's L-RD store: an SQLite database in WAL mode, shared by every
dmm process on the host.

It holds three tables:

* ``listeners``: what each listening dmm socket on this host accepts on
  (address, port, protocols with their ports, stack names, owning pid and
  that process's start time, so a reused pid is not taken for the owner);
* ``peers``: what this host learned about remote endpoints: whether
  ``address:port`` speaks a protocol, from what (``race``, ``probe``,
  ``answer``, ``central``), when, until when, and the connect time seen;
* ``paths``: what connections measured on the way to each destination
  address and prefix (:mod:`dmm.rd.paths`), as decayed sums, so that every
  process adds its samples to the same estimate.

Only the RD thread of a process writes (:mod:`dmm.rd.service`); readers
are the same thread (to refresh the in-process cache) and ``dmm rd``.
Concurrent writers are serialised by SQLite's own locking (a busy timeout,
then the write is retried by the next batch). Every call here may raise
``sqlite3.Error``; the service logs it once and routing carries on from the
table and the in-process cache.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .paths import Aggregate, Sample

__all__ = ["Listener", "PeerFact", "Store", "default_dir", "process_start"]

_PATH_COLUMNS = "key, rtt_sum, rtt_w, loss_sum, loss_w, rate_sum, rate_w, samples, updated"

_SCHEMA_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS listeners (
    address TEXT NOT NULL, port INTEGER NOT NULL, protocols TEXT NOT NULL,
    stacks TEXT NOT NULL, pid INTEGER NOT NULL, pid_start INTEGER NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (address, port, pid));
CREATE TABLE IF NOT EXISTS peers (
    address TEXT NOT NULL, port INTEGER NOT NULL, protocol TEXT NOT NULL,
    speaks INTEGER NOT NULL, source TEXT NOT NULL, learned REAL NOT NULL,
    expires REAL NOT NULL, rtt_ms REAL,
    PRIMARY KEY (address, port, protocol));
CREATE TABLE IF NOT EXISTS paths (
    key TEXT PRIMARY KEY, rtt_sum REAL NOT NULL, rtt_w REAL NOT NULL,
    loss_sum REAL NOT NULL, loss_w REAL NOT NULL, rate_sum REAL NOT NULL,
    rate_w REAL NOT NULL, samples INTEGER NOT NULL, updated REAL NOT NULL);
"""


@dataclass(frozen=True)
class Listener:
    """One listening socket on this host, as advertised."""

    address: str
    port: int
    #: ``((protocol, port), ...)`` it accepts connections on.
    protocols: tuple[tuple[str, int], ...]
    stacks: tuple[str, ...]
    pid: int
    pid_start: int
    since: float


@dataclass(frozen=True)
class PeerFact:
    """Whether ``address:port`` speaks ``protocol``, and how we know."""

    address: str
    port: int
    protocol: str
    speaks: bool
    source: str
    learned: float
    expires: float
    rtt_ms: Optional[float] = None


def default_dir() -> Path:
    """Where the store lives unless ``[rd] store`` or ``$DMM_RD_DIR`` say:
    ``$XDG_RUNTIME_DIR/dmm``, else ``/run/dmm`` for root, else
    ``/tmp/dmm-<uid>``."""
    env = os.environ.get("DMM_RD_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "dmm"
    if os.geteuid() == 0:
        return Path("/run/dmm")
    return Path(f"/tmp/dmm-{os.geteuid()}")


def process_start(pid: int) -> int:
    """The start time of process ``pid`` in clock ticks since boot (field 22
    of ``/proc/PID/stat``), or 0 if it is not running."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split
    # after its last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return 0


def _encode_protocols(protocols: Iterable[tuple[str, int]]) -> str:
    return ",".join(f"{p}:{port}" for p, port in protocols)


def _decode_protocols(text: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in text.split(","):
        name, _, port = item.partition(":")
        if name and port.isdigit():
            out.append((name, int(port)))
    return tuple(out)


class Store:
    """One connection to the store (use it from one thread)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=2.0, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            # A store another version wrote is not ours to interpret.
            row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"{self.path}: schema version {row[0]!r}, this dmm reads {_SCHEMA_VERSION!r}")
            self.db.execute("PRAGMA quick_check").fetchone()
        except BaseException:
            self.db.close()
            raise

    def _tx(self):
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def data_version(self) -> int:
        """Changes when another connection commits (SQLite's ``data_version``)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # -- listeners ------------------------------------------------------------

    def add_listener(self, lst: Listener) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO listeners VALUES (?, ?, ?, ?, ?, ?, ?)",
                            (lst.address, lst.port, _encode_protocols(lst.protocols), ",".join(lst.stacks),
                             lst.pid, lst.pid_start, lst.since))

    def remove_listener(self, address: str, port: int, pid: int) -> None:
        with self._tx():
            self.db.execute("DELETE FROM listeners WHERE address = ? AND port = ? AND pid = ?", (address, port, pid))

    def listeners(self) -> list[Listener]:
        rows = self.db.execute("SELECT address, port, protocols, stacks, pid, pid_start, since FROM listeners")
        return [Listener(a, p, _decode_protocols(pr), tuple(s for s in st.split(",") if s), pid, ps, since)
                for a, p, pr, st, pid, ps, since in rows]

    def prune_dead(self) -> int:
        """Removes listeners whose process is gone (or whose pid now belongs
        to another process). Returns how many."""
        dead = [(lst.address, lst.port, lst.pid) for lst in self.listeners()
                if process_start(lst.pid) != lst.pid_start]
        if dead:
            with self._tx():
                self.db.executemany("DELETE FROM listeners WHERE address = ? AND port = ? AND pid = ?", dead)
        return len(dead)

    # -- peers ----------------------------------------------------------------

    def learn(self, facts: Iterable[PeerFact]) -> None:
        with self._tx():
            self.db.executemany("INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                [(f.address, f.port, f.protocol, int(f.speaks), f.source, f.learned, f.expires,
                                  f.rtt_ms) for f in facts])

    def peers(self, now: Optional[float] = None) -> list[PeerFact]:
        """Unexpired facts (all of them with ``now`` of 0)."""
        now = time.time() if now is None else now
        rows = self.db.execute("SELECT address, port, protocol, speaks, source, learned, expires, rtt_ms FROM peers "
                               "WHERE expires > ?", (now,))
        return [PeerFact(a, p, pr, bool(sp), so, le, ex, rtt) for a, p, pr, sp, so, le, ex, rtt in rows]

    def expire(self, now: Optional[float] = None) -> None:
        with self._tx():
            self.db.execute("DELETE FROM peers WHERE expires <= ?", (time.time() if now is None else now,))

    def forget(self) -> None:
        """Empties the peer knowledge (``dmm rd forget``)."""
        with self._tx():
            self.db.execute("DELETE FROM peers")

    # -- paths ----------------------------------------------------------------

    def add_samples(self, samples: Iterable[tuple[str, Sample, float]], half_life: float) -> None:
        """Counts ``(key, sample, when)`` triples into the stored aggregates,
        read and written in one transaction so that no other process's
        samples are lost in between."""
        with self._tx():
            for key, sample, when in samples:
                row = self.db.execute(f"SELECT {_PATH_COLUMNS} FROM paths WHERE key = ?", (key,)).fetchone()
                agg = Aggregate(*row[1:]) if row else Aggregate(updated=when)
                agg = agg.add(sample, when, half_life)
                self.db.execute(f"INSERT OR REPLACE INTO paths ({_PATH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (key, agg.rtt_sum, agg.rtt_w, agg.loss_sum, agg.loss_w, agg.rate_sum, agg.rate_w,
                                 agg.samples, agg.updated))

    def paths(self) -> dict[str, Aggregate]:
        """Every stored aggregate by key."""
        rows = self.db.execute(f"SELECT {_PATH_COLUMNS} FROM paths")
        return {row[0]: Aggregate(*row[1:]) for row in rows}

    def prune_paths(self, older_than: float) -> None:
        """Drops aggregates whose newest sample is older than ``older_than``."""
        with self._tx():
            self.db.execute("DELETE FROM paths WHERE updated < ?", (older_than,))

    def forget_paths(self) -> None:
        """Empties the path knowledge (``dmm paths --forget``)."""
        with self._tx():
            self.db.execute("DELETE FROM paths")


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error: the write
    lock is taken up front, so a busy store fails fast instead of deadlocking
    two upgraders."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
        return False
