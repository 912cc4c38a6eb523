"""Negotiation: from a connect's candidate stacks to the one that carries it.

The routing table or a hook names candidates in preference order. Here they
become the list a connect tries (:meth:`Negotiator.candidates`):

1. Candidates that reach a peer the same way collapse into the first of
   them: kernel TCP and kernel MPTCP both connect to any TCP server (MPTCP
   falls back), so racing them would only cost a second handshake.
2. What L-RD knows about the destination applies: a candidate whose
   protocol the peer is known not to speak (refused, unanswered) is dropped,
   unless that would drop them all (the knowledge may be stale, and a wrong
   guess must not break the connection); a local listener's advertisement
   counts as knowledge.

With one candidate left, the socket connects on it as on any stack; with
more, :meth:`Negotiator.plan` sets up a :class:`dmm.race.Race` and
:meth:`Negotiator.settle` learns from its outcome and asks the peer's FillP
port what it speaks when a TCP candidate won without FillP being tried.
"""

from __future__ import annotations

import collections
import errno
import threading
import time
from typing import Any, Optional

from .config import PathsSpec, RDSpec
from .race import Race
from .rd.local import LocalRD, get_local, wire_protocol

__all__ = ["DMM_OFFER", "Negotiator", "SOL_DMM"]

#: dmm's own socket option level (as :data:`dmm.socket.SOL_DMM`).
SOL_DMM = 0x444D4D
#: ``setsockopt(SOL_DMM, DMM_OFFER, b"fillp:8080,mptcp:8080")`` on a core
#: listener: what it answers to DISCOVER (core sockets only; private).
DMM_OFFER = 3
#: What one lost handshake packet adds to a connect, by wire protocol:
#: FillP resends INIT or CONN_REQ after 200 ms
#: (``rust/src/fillp/connection/handshake.rs``), kernel TCP its SYN after
#: the initial RTO of 1 s (RFC 6298).
HANDSHAKE_RETRY = {"fillp": 0.2, "tcp": 1.0}
#: The longest connection-attempt delay RFC 8305 allows, seconds.
MAX_ATTEMPT_DELAY = 2.0
#: Races in a row a protocol the peer is known to speak may lose by being
#: slow before it is learned as not spoken.
BEATEN_LIMIT = 2


class Negotiator:
    """Candidate lists, races and what they teach, for one runtime."""

    def __init__(self, stacks: dict[str, Any], spec: RDSpec, paths: Optional[PathsSpec] = None):
        self.stacks = stacks
        self.spec = spec
        self.rd: Optional[LocalRD] = get_local(spec, paths) if spec.enabled else None
        self.counters: collections.Counter = collections.Counter()
        #: (address, port, protocol) -> races in a row it lost by being slow
        #: although the peer was known to speak it.
        self._beaten: dict[tuple[str, int, str], int] = {}
        self._beaten_lock = threading.Lock()  # races settle in several threads

    def _protocol(self, name: str) -> str:
        return wire_protocol(self.stacks[name].protocol)

    def facts(self, address: str, port: int) -> dict[str, Any]:
        """What L-RD knows of ``address:port`` by protocol: learned facts,
        and the advertisement of a listener of this host it would reach."""
        if self.rd is None:
            return {}
        central = self.rd.central
        # Central advertisements first; what this host saw itself wins.
        known = dict(central.facts(address, port)) if central is not None else {}
        known.update(self.rd.facts(address, port))
        if _is_local(address):
            lst = self.rd.local_listener(address, port)
            if lst is not None:
                offered = {wire_protocol(p) for p, p_port in lst.protocols if p_port == port}
                for proto in ("tcp", "fillp"):
                    known.setdefault(proto, _Advertised(proto in offered, lst.pid))
        return known

    def candidates(self, names: tuple[str, ...], request: Any,
                   trace: Optional[list[str]]) -> tuple[tuple[str, ...], int]:
        """The candidates a connect to ``request`` tries, in order, and how
        many of them are first choices: the rest are last resorts, started
        only when every earlier one failed (L-RD says the peer does not
        speak them, but L-RD may be out of date)."""
        kept: list[str] = []
        seen_fd: set[str] = set()
        for name in names:
            inst = self.stacks[name]
            proto = self._protocol(name)
            if inst.keeps_fd and proto in seen_fd:
                if trace is not None:
                    trace.append(f"negotiate: {name} skipped, it reaches the peer as {kept[0]} does ({proto})")
                continue
            if inst.keeps_fd:
                seen_fd.add(proto)
            kept.append(name)
        known = self.facts(request.address, request.port)
        if not known:
            return tuple(kept), len(kept)
        for n in kept if trace is not None else ():
            f = known.get(self._protocol(n))
            if f is not None:
                trace.append(f"L-RD: {request.address}:{request.port} {'speaks' if f.speaks else 'does not speak'} "
                             f"{self._protocol(n)} ({_describe(f)})")
        first = [n for n in kept if not (f := known.get(self._protocol(n))) or f.speaks]
        last = [n for n in kept if n not in first]
        if not first:
            return tuple(kept), len(kept)
        if last and trace is not None:
            trace.append(f"negotiate: {', '.join(last)} only if {', '.join(first)} fail: not spoken there")
        return tuple(first + last), len(first)

    def attempt_delay(self, address: str, port: int, first: Optional[str] = None) -> float:
        """RFC 8305's connection-attempt delay before the candidate after
        ``first`` (a stack name) starts.

        Where nothing says the peer speaks ``first``'s protocol, it is the
        configured delay, shortened to twice the time ``first`` should take
        to connect (never under the minimum): the connect time L-RD saw for
        it, and for FillP at least two round trips (its stateless cookie
        costs one more than TCP's handshake), the round trip taken from a
        TCP connect time or the path estimate.

        Where L-RD or central RD confirms it (a learned fact, an
        advertisement), a race is there only for a peer that stopped
        answering: the delay is then the configured one or twice the
        expected connect time plus one handshake retransmission, whichever
        is longer (at most :data:`MAX_ATTEMPT_DELAY`), so that one lost
        packet on a lossy path does not start a second handshake for
        nothing."""
        delay = self.spec.attempt_delay
        if self.rd is None:
            return delay
        facts = self.facts(address, port)
        proto = self._protocol(first) if first is not None else None
        own = facts.get(proto) if proto is not None else None
        confirmed = own is not None and own.speaks
        expected = own.rtt_ms if confirmed and own.rtt_ms else None
        rtts = [f.rtt_ms for p, f in facts.items() if p != "fillp" and f.speaks and f.rtt_ms]
        path = self.rd.path_estimate(address)
        if path is not None and path.rtt_ms:
            rtts.append(path.rtt_ms)
        if rtts:
            floor = min(rtts) * (2 if proto == "fillp" else 1)
            expected = floor if expected is None else max(expected, floor)
        if confirmed:
            wait = 2 * expected / 1000 if expected is not None else delay
            return min(MAX_ATTEMPT_DELAY, max(delay, wait + HANDSHAKE_RETRY.get(proto or "", 0.0)))
        if expected is None:
            return delay
        return min(delay, max(self.spec.min_attempt_delay, 2 * expected / 1000))

    def plan(self, outcome: Any, family: int, type_: int, address: tuple, options: Optional[list]) -> "Plan":
        """What a connect of ``outcome``'s candidates to ``address`` races,
        if it races (the race itself is made on demand)."""
        return Plan(self, outcome, family, type_, address, options)

    def version(self) -> int:
        """Changes whenever what L-RD knows changes (decisions depend on it)."""
        return self.rd.version if self.rd is not None else 0

    def settle(self, race: Race, family: int) -> None:
        """Learns from a decided race, and asks the peer what it speaks when
        FillP was a candidate that never got its turn."""
        host, port = race.address[0].partition("%")[0], race.address[1]
        winner = race.winner
        first = race.attempts[0]
        self.counters["races_started"] += 1
        if sum(1 for a in race.attempts if a.started) > 1:
            # A second handshake went out: the first choice was slow or failed.
            self.counters["races_contested"] += 1
        if winner is not None:
            self.counters[f"races_won_{winner.name}"] += 1
            if winner is not first:
                self.counters["fallbacks"] += 1
        else:
            self.counters["races_failed"] += 1
        if self.rd is None:
            return
        known = self.facts(host, port)
        for a in race.attempts:
            proto = wire_protocol(a.protocol)
            if a is winner:
                self._forgive(host, port, proto)
                rtt = (a.finished - a.started) * 1000
                self.rd.learn(host, port, a.protocol, True, "race", rtt_ms=rtt)
            elif a.hard_failure and a.error.errno in (errno.ECONNREFUSED, errno.ECONNRESET):  # nobody there
                self._forgive(host, port, proto)
                self.rd.learn(host, port, a.protocol, False, "race")
            elif a.started and winner is not None and a.started < winner.started:
                # Started first, given the attempt delay and more, beaten
                # by a later one: blackholed or too lossy to set up. Unless
                # the peer is known to speak it: on a lossy path one lost
                # handshake packet is enough to lose a race, so it takes
                # BEATEN_LIMIT races in a row.
                self._slow(host, port, a.protocol, known.get(proto))
        untried = [a for a in race.attempts if not a.started and wire_protocol(a.protocol) == "fillp"]
        if (self.spec.discovery and winner is not None and untried
                and "fillp" not in self.rd.facts(host, port)):
            self.rd.discover(family, host, port)

    def _forgive(self, host: str, port: int, proto: str) -> None:
        with self._beaten_lock:
            self._beaten.pop((host, port, proto), None)

    def _slow(self, host: str, port: int, protocol: str, fact: Any) -> None:
        """An attempt on ``protocol`` lost its race by being slow."""
        key = (host, port, wire_protocol(protocol))
        with self._beaten_lock:
            strikes = self._beaten.pop(key, 0) + 1
            if fact is not None and fact.speaks and strikes < BEATEN_LIMIT:
                if len(self._beaten) >= 4096:  # peers seen once each: forget the oldest
                    del self._beaten[next(iter(self._beaten))]
                self._beaten[key] = strikes
                self.counters["races_lost_by_known"] += 1
                return
        assert self.rd is not None
        self.rd.learn(host, port, protocol, False, "race")

    def advertise(self, host: str, port: int, members: list[tuple[str, Any]]) -> None:
        """A listener on ``host:port`` over ``members`` (stack name, core
        socket or ``None`` for the kernel member): its FillP members answer
        DISCOVER with every protocol it accepts on, and L-RD lists it."""
        protocols = []
        for name, _core in members:
            proto = self.stacks[name].protocol
            if (proto, port) not in protocols:
                protocols.append((proto, port))
        offer = ",".join(f"{p}:{n}" for p, n in protocols).encode()
        for _name, core in members:
            if core is not None:
                try:
                    core.setsockopt(SOL_DMM, DMM_OFFER, offer)
                except OSError:
                    pass  # a kind that answers no discovery
        if self.rd is not None:
            stacks = tuple(name for name, _core in members)
            self.rd.advertise(host, port, protocols, stacks)
            if self.rd.central is not None:
                self.rd.central.advertise(host, port, protocols, stacks)

    def withdraw(self, host: str, port: int) -> None:
        """The listener on ``host:port`` closed."""
        if self.rd is not None:
            self.rd.withdraw(host, port)
            if self.rd.central is not None:
                self.rd.central.withdraw(host, port)

    def counts(self) -> dict[str, int]:
        """Races, wins per stack, fallbacks and what L-RD did."""
        out = dict(self.counters)
        if self.rd is not None:
            out.update(self.rd.counters)
        return out


class Plan:
    """A connect's candidates, before anything started: cheap to make, so a
    connect that goes straight to its first choice pays for no race."""

    __slots__ = ("negotiator", "outcome", "family", "type", "address", "options", "_race")

    def __init__(self, negotiator: Negotiator, outcome: Any, family: int, type_: int, address: tuple,
                 options: Optional[list]):
        self.negotiator = negotiator
        self.outcome = outcome
        self.family = family
        self.type = type_
        self.address = address
        self.options = list(options or ())
        self._race: Optional[Race] = None

    def race(self) -> Race:
        """The race (made once)."""
        if self._race is None:
            o = self.outcome
            self._race = Race([(n, self.negotiator.stacks[n]) for n in o.candidates], self.family, self.type,
                              self.address, self.options, None,
                              self.negotiator.attempt_delay(self.address[0], self.address[1], o.candidates[0]),
                              sequential=not o.race, last_resort=o.first_choices)
        return self._race

    def first_failed(self, exc: OSError) -> bool:
        """The first choice, tried on the socket itself, failed: see
        :meth:`dmm.race.Race.first_failed`."""
        return self.race().first_failed(exc)


class _Advertised:
    """A local listener's advertisement, read as a fact."""

    __slots__ = ("speaks", "pid")
    source = "listener"
    rtt_ms = None

    def __init__(self, speaks: bool, pid: int):
        self.speaks = speaks
        self.pid = pid


def _describe(fact: Any) -> str:
    if hasattr(fact, "describe"):
        return fact.describe()
    if isinstance(fact, _Advertised):
        return f"advertised by local pid {fact.pid}"
    return f"from {fact.source}, {time.time() - fact.learned:.0f} s ago"


def _is_local(address: str) -> bool:
    """Whether ``address`` is a loopback address (this host's listeners)."""
    return address.startswith("127.") or address == "::1" or address.startswith("::ffff:127.")
