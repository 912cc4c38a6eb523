"""The process-wide routing state: stack instances, the table, decisions.

The runtime is built lazily from :func:`dmm.config.load` the first time a
socket needs a decision, or explicitly with :func:`configure`.

Order of a decision, first answer wins:

1. the socket's own override (``stack=`` argument or ``DMM_STACK`` option);
2. policy hooks (:mod:`dmm.policy`), in registration order;
3. for listeners, the config's ``[listen]`` section;
4. the routing table (longest prefix, then priority, then order; a rule
   with ``when`` conditions only while the measured path meets them);
5. for a stream connect, the adaptive policy when the config has an
   ``[adaptive]`` section (:mod:`dmm.adaptive`);
6. the default route (the first stack declared).

Within an answer the stacks that cannot carry the socket are skipped; if
none can, the next source is asked. A listener whose answer comes from a
hook or from ``[listen]`` listens on *every* stack of the answer that can
carry it (``Outcome.stacks``). For a connect, with more than one stack
configured, every capable stack of a hook's or a rule's answer is a
*candidate* (``Outcome.candidates``), ordered by what L-RD knows and raced
by the socket (:mod:`dmm.negotiate`, :mod:`dmm.race`); otherwise the first
capable stack carries the socket.

Connections a listener accepts are admitted by :meth:`Runtime.admit`: hooks
registered for the ``accept`` role, then rules with ``role = "accept"``
matched on the client's address; no answer admits the client.
"""

from __future__ import annotations

import errno
import socket as _socket
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

from . import _core, policy
from .adaptive import Adaptive
from .conditions import holds
from .config import AdaptiveSpec, Config, ConfigError, RDSpec, RouteSpec, load
from .negotiate import Negotiator
from .rd.paths import Estimate
from .stacks import StackInstance, UserSpaceInstance, make_instance

__all__ = ["Outcome", "Runtime", "Table", "configure", "get", "reset"]

_STREAM = 1
#: Decisions kept by :meth:`Runtime.decision` before the memo starts over.
_MEMO_MAX = 4096
_KIND = {1: "stream", 2: "dgram"}


@dataclass
class Outcome:
    """The result of one decision, with the reasoning for ``route explain``."""

    stack: str
    source: str
    reason: str
    trace: list[str] = field(default_factory=list)
    #: Every stack a listener listens on (the chosen one first); else ``(stack,)``.
    stacks: tuple[str, ...] = ()
    #: For a connect: the stacks to try, in order, raced when more than one
    #: (see :mod:`dmm.negotiate`); else ``(stack,)``.
    candidates: tuple[str, ...] = ()
    #: Whether the candidates race (``False``: the next starts only when the
    #: previous failed; ``race = false`` on the route).
    race: bool = True
    #: How many candidates are first choices; the others are last resorts,
    #: tried only when those failed (L-RD says the peer does not speak them).
    first_choices: int = 0

    def __post_init__(self) -> None:
        if not self.stacks:
            self.stacks = (self.stack,)
        if not self.candidates:
            self.candidates = (self.stack,)
        if not self.first_choices:
            self.first_choices = len(self.candidates)


class Table:
    """The rules in force: the routes (a central policy's first, then the
    file's), the Rust table built from them and the adaptive policy. A live
    policy change swaps the whole table at once, so a decision reads one
    table from start to end."""

    def __init__(self, routes: tuple[RouteSpec, ...], adaptive: Optional[Adaptive], order: list[str],
                 generation: int = 0):
        self.routes = routes
        self.adaptive = adaptive
        self.generation = generation
        ids = {name: i for i, name in enumerate(order)}
        self.router = _core.Router()
        for r in routes:
            for prefix in (r.to,) if r.to is not None else ("0.0.0.0/0", "::/0"):
                self.router.add(prefix, [ids[s] for s in r.stacks], ports=r.ports, kind=r.type, role=r.role,
                                priority=r.priority, tag=r.index)
        self.router.set_default([0])
        #: Whether accepted connections need an admission check at all.
        self.accept_rules = any(r.role == "accept" for r in routes)
        #: Rules with conditions: the table's best match may not apply.
        self.conditional = any(r.when for r in routes)

    def label(self, tag: int) -> str:
        """How decisions name rule ``tag``: ``route[2]``, and where a
        central rule came from."""
        route = self.routes[tag]
        return f"route[{tag}] of {route.origin}" if route.origin else f"route[{tag}]"

    def where(self, tag: int) -> str:
        route = self.routes[tag]
        return f" (line {route.line})" if route.line else ""


class Runtime:
    """Stack instances plus the routing table built from one ``Config``."""

    def __init__(self, config: Config):
        self.config = config
        self.stacks: dict[str, StackInstance] = {}
        for i, spec in enumerate(config.stacks):
            try:
                self.stacks[spec.name] = make_instance(spec)
            except OSError as exc:
                for inst in self.stacks.values():
                    inst.core.stop()  # the ones opened so far: their devices and threads go now
                raise _open_error(config, i, spec, exc) from exc
        self.order = [spec.name for spec in config.stacks]
        #: User-space instances a listener may move to: a port the kernel
        #: picks for bind(port 0) must be free on them too (see
        #: dmm.socket.socket.bind).
        self.user_space = [inst for inst in self.stacks.values() if isinstance(inst, UserSpaceInstance)]
        # With one stack, no rules and no [listen], every answer is that stack
        # unless a hook or an override says otherwise: skip the table.
        self.only = self.order[0] if len(self.order) == 1 and not config.routes and not config.listen else None
        # The built-in default: one plain kernel TCP instance with syscalls.
        # Then no socket can ever change protocol or leave the kernel, so
        # sockets need neither an option log nor an attach step.
        first = self.stacks[self.order[0]]
        self.plain_kernel = first if self.only is not None and first.passthrough else None
        # Candidates and racing need more than one stack; L-RD is on then
        # too, unless [rd] enabled = false.
        self.negotiator = (Negotiator(self.stacks, config.rd or RDSpec(), config.paths)
                           if len(self.order) > 1 else None)
        #: Where closing connections leave their path samples (L-RD), or None.
        self.paths = (self.negotiator.rd if self.negotiator is not None and config.paths.enabled else None)
        adaptive = Adaptive(config.adaptive, self.stacks, self.order) if config.adaptive else None
        if adaptive is not None and adaptive.problem():
            raise ConfigError(config.path, config.adaptive.line, "adaptive", adaptive.problem())
        #: The rules in force (replaced whole by a central policy change).
        self.table = Table(config.routes, adaptive, self.order)
        self._file_adaptive = adaptive
        # Decisions without hooks or overrides depend only on the socket's
        # role, family, type and destination, on what L-RD knows and on the
        # table: kept here, a routed connect costs a dict lookup instead of
        # a decision.
        self._memo: dict[tuple, tuple[Any, Outcome]] = {}
        # Destinations a connect reaches on a passthrough kernel stack as the
        # socket stands (see direct()): such a connect skips the decision.
        self._direct: dict[tuple, tuple[Any, Optional[str], Table, Any]] = {}
        #: Central RD (etcd), when ``[rd] central`` names endpoints.
        self.central = None
        if self.negotiator is not None and self.negotiator.rd is not None and config.rd and config.rd.central:
            from .rd.central import get_central  # needs the etcd client: only then

            self.central = get_central(config.rd, self.negotiator.rd)
            self.central.attach(self)

    # The table's parts, as they read before policies could change.

    @property
    def router(self) -> Any:
        return self.table.router

    @property
    def adaptive(self) -> Optional[Adaptive]:
        return self.table.adaptive

    @property
    def accept_rules(self) -> bool:
        return self.table.accept_rules

    @property
    def routes(self) -> tuple[RouteSpec, ...]:
        """The routes in force: a central policy's, then the file's."""
        return self.table.routes

    def path_dependent(self, table: Table) -> bool:
        """Whether decisions under ``table`` depend on path estimates."""
        return self.paths is not None and (table.conditional or table.adaptive is not None)

    def apply_policy(self, routes: tuple[RouteSpec, ...], adaptive: Optional[AdaptiveSpec], origin: str) -> None:
        """Puts a central policy in force: its routes ahead of the file's,
        its ``[adaptive]`` (if it has one) instead of the file's. Raises
        :class:`ConfigError` (and changes nothing) if it cannot apply here."""
        policy_adaptive = self._file_adaptive if adaptive is None else Adaptive(adaptive, self.stacks, self.order)
        if adaptive is not None and policy_adaptive.problem():
            raise ConfigError(origin, adaptive.line, "adaptive", policy_adaptive.problem())
        merged = [replace(r, index=i, origin=origin) for i, r in enumerate(routes)]
        merged += [replace(r, index=len(merged) + i) for i, r in enumerate(self.config.routes)]
        self.table = Table(tuple(merged), policy_adaptive, self.order, self.table.generation + 1)

    def decision(self, role: str, family: int, type: int, address: str, port: int, host: Optional[str],
                 properties: dict, override: Optional[str], hook_limit: Optional[float] = None) -> Outcome:
        """:meth:`decide` for a socket, from the memo when nothing can make
        the answer differ (no hook, no override, L-RD unchanged);
        ``hook_limit`` bounds the hooks (seconds)."""
        if override is not None or policy._hooks:
            request = policy.Request(role=role, family=family, type=type, address=address, port=port, host=host,
                                     properties=dict(properties), path=self.path_for(address))
            return self.decide(request, override, hook_limit=hook_limit)
        key = (role, family, type, address, port)
        table = self.table
        version: Any = (self.negotiator.version() if self.negotiator is not None else 0, table.generation)
        if self.path_dependent(table):
            version = (version, self.paths.paths_version)
        hit = self._memo.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        outcome = self.decide(policy.Request(role=role, family=family, type=type, address=address, port=port,
                                             host=host, properties=dict(properties)))
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = (version, outcome)
        return outcome

    def _direct_version(self) -> Any:
        """What a remembered direct route depends on besides the table: what
        L-RD knows, and the path estimates if the table reads them."""
        version = self.negotiator.version() if self.negotiator is not None else 0
        if self.paths is not None and (self.table.conditional or self.table.adaptive is not None):
            return (version, self.paths.paths_version)
        return version

    def direct(self, family: int, type: int, proto: int, address: Any) -> Optional[tuple[Any, Optional[str]]]:
        """``(instance, sample_to)`` if the last decision for a connect to
        ``address`` was a passthrough kernel instance with the socket as it
        is (one candidate, no hook, no override) and neither the table, L-RD
        nor the path estimates it read changed since; ``sample_to`` is the
        host to leave a path sample for (None: none). Else ``None``: decide."""
        try:
            hit = self._direct.get((family, type, proto, address))
        except TypeError:  # an unhashable (malformed) address: the slow path reports it
            return None
        if hit is None or hit[2] is not self.table or hit[3] != self._direct_version():
            return None
        return hit[0], hit[1]

    def remember_direct(self, family: int, type: int, proto: int, address: Any, inst: Any,
                        sample_to: Optional[str]) -> None:
        """Notes that a connect to ``address`` went to ``inst`` unchanged (see :meth:`direct`)."""
        if len(self._direct) >= _MEMO_MAX:
            self._direct.clear()
        self._direct[(family, type, proto, address)] = (inst, sample_to, self.table, self._direct_version())

    def path_for(self, address: str) -> Optional[Estimate]:
        """What was measured on the way to ``address`` (or its prefix)."""
        return self.paths.path_estimate(address) if self.paths is not None else None

    def decide(self, request: policy.Request, override: Optional[str] = None, explain: bool = False,
               hook_limit: Optional[float] = None) -> Outcome:
        """Chooses the stack for ``request``; the hooks get ``hook_limit``
        seconds at most (see :func:`dmm.policy.ask`). Raises ``OSError`` if
        no stack can carry it."""
        trace: list[str] = []
        if explain and self.paths is not None:
            est = self.path_for(request.address)
            trace.append(f"path: {est.describe()}" if est else f"path: nothing measured toward {request.address} yet")
        if override is not None:
            if override not in self.stacks:
                raise OSError(errno.EINVAL, f"dmm: no stack is named {override!r} (known: {', '.join(self.order)})")
            why = self.stacks[override].can_carry(request.family, request.type)
            if why is not None:
                raise OSError(errno.EPROTONOSUPPORT, f"dmm: stack {override!r} cannot carry this socket: {why}")
            return Outcome(override, "override", "the socket asked for it", trace)

        if policy.hooks():
            answer = policy.ask(request, hook_limit)
            if answer is not None:
                label, decision = answer
                unknown = [n for n in decision.stacks if n not in self.stacks]
                if unknown:
                    policy.log.error("dmm policy hook %s named %s, which no configured stack is (known: %s); "
                                     "skipping %s", label, ", ".join(map(repr, unknown)), ", ".join(self.order),
                                     "it" if len(unknown) == 1 else "them")
                capable = self._capable(decision.stacks, request, trace, f"hook {label}")
                if capable:
                    reason = decision.reason or "the hook chose it"
                    if request.role == "listen":
                        return Outcome(capable[0], f"hook {label}", reason, trace, self._listeners(capable, trace))
                    return self._connect_outcome(capable, request, f"hook {label}", reason, trace, True, explain)
            elif explain:
                trace.append("hooks: every hook returned None")

        if self.only is not None:
            return Outcome(self.only, "default", "the only stack configured", trace)

        if request.role == "listen" and self.config.listen:
            capable = self._capable(self.config.listen, request, trace, "[listen]")
            if capable:
                return Outcome(capable[0], "[listen]", "the [listen] section of the config", trace,
                               self._listeners(capable, trace))

        table = self.table
        tag = self._matching_rule(table, request, trace, explain)
        if tag is not None:
            route = table.routes[tag]
            label, where = table.label(tag), table.where(tag)
            if request.role == "connect" and self.negotiator is not None:
                capable = self._capable(route.stacks, request, trace, label)
                if capable:
                    return self._connect_outcome(capable, request, label, f"{route.describe()}{where}",
                                                 trace, route.race, explain)
            chosen = self._first_capable(route.stacks, request, trace, label)
            if chosen is not None:
                return Outcome(chosen, label, f"{route.describe()}{where}", trace)
        elif explain:
            trace.append("no route matched")

        if table.adaptive is not None and request.role == "connect" and request.type == _STREAM:
            outcome = self._adaptive_outcome(table.adaptive, request, trace, explain)
            if outcome is not None:
                return outcome

        chosen = self._first_capable(self.order, request, trace, "default route")
        if chosen is not None:
            return Outcome(chosen, "default", "no rule matched: the first capable stack declared", trace)
        raise OSError(errno.EPROTONOSUPPORT, "dmm: no configured stack can carry this socket")

    def _matching_rule(self, table: Table, request: policy.Request, trace: list[str], explain: bool) -> Optional[int]:
        """The tag of the rule of ``table`` that decides ``request``: the
        best match whose conditions hold (``None``: no rule)."""
        kind = _KIND.get(request.type, "stream")
        if not table.conditional and not explain:
            return table.router.lookup(request.address, request.port, kind, request.role)[0]
        chosen = None
        est: Optional[Estimate] = None
        measured = False  # est looked up (once, and only if a rule has conditions)
        for t in table.router.candidates(request.address, request.port, kind, request.role):
            route = table.routes[t]
            if chosen is not None:
                if explain:
                    trace.append(f"also matched route[{t}] ({route.describe()}), less specific or lower priority")
                continue
            if route.when:
                if not measured:
                    est, measured = self.path_for(request.address), True
                if not holds(route.when, est):
                    if explain:
                        why = "nothing measured" if est is None else f"measured {est.describe()}"
                        trace.append(f"route[{t}] ({route.describe()}): conditions not met ({why}); next")
                    continue
            chosen = t
        return chosen

    def _adaptive_outcome(self, adaptive: Adaptive, request: policy.Request, trace: list[str],
                          explain: bool) -> Optional[Outcome]:
        """The adaptive policy's answer for a stream connect."""
        est = self.path_for(request.address)
        spoken = None
        if self.negotiator is not None:
            fact = self.negotiator.facts(request.address, request.port).get("fillp")
            spoken = None if fact is None else fact.speaks
        choice = adaptive.choose(est, spoken)
        capable = self._capable(choice.stacks, request, trace, "adaptive")
        if not capable:
            return None
        return self._connect_outcome(capable, request, "adaptive", choice.reason, trace, True, explain)

    def _connect_outcome(self, capable: tuple[str, ...], request: policy.Request, source: str, reason: str,
                         trace: list[str], race: bool, explain: bool = False) -> Outcome:
        """A connect's outcome: the candidates that may reach the peer, in
        order, with what L-RD knows applied."""
        names, first = capable, len(capable)
        if self.negotiator is not None and len(capable) > 1:
            names, first = self.negotiator.candidates(capable, request, trace if explain else None)
        return Outcome(names[0], source, reason, trace, candidates=names, race=race, first_choices=first)

    def admit(self, request: policy.Request) -> Optional[Outcome]:
        """Which stacks may serve an accepted client (``request.role`` is
        ``"accept"``, ``request.stack`` where it arrived). ``None`` when no
        hook or rule has an opinion: the client is admitted."""
        if policy.accept_hooks:
            answer = policy.ask(request)
            if answer is not None:
                label, decision = answer
                return Outcome(decision.stacks[0], f"hook {label}", decision.reason or "the hook chose it",
                               stacks=tuple(decision.stacks))
        table = self.table
        if table.accept_rules:
            tag, ids = table.router.lookup(request.address, request.port, _KIND.get(request.type, "stream"), "accept")
            if tag is not None:
                names = tuple(self.order[i] for i in ids)
                return Outcome(names[0], table.label(tag), table.routes[tag].describe(), stacks=names)
        return None

    def admits(self, family: int, type: int, address: str, port: int, stack: str) -> bool:
        """Whether a client at ``address`` that reached a listener on ``port``
        through ``stack`` may be served there (counts a refusal)."""
        request = policy.Request(role="accept", family=family, type=type, address=address, port=port, stack=stack)
        outcome = self.admit(request)
        if outcome is None or stack in outcome.stacks:
            return True
        inst = self.stacks.get(stack)
        if inst is not None:
            inst.count_refused()
        return False

    def _first_capable(self, names, request: policy.Request, trace: list[str], source: str) -> Optional[str]:
        return next(self._capable_iter(names, request, trace, source), None)

    def _capable_iter(self, names, request: policy.Request, trace: list[str], source: str):
        """The stacks of ``names`` that can carry the socket, lazily; the
        ones skipped on the way are explained in ``trace``."""
        for name in names:
            inst = self.stacks.get(name)
            if inst is None:
                trace.append(f"{source}: no stack is named {name!r}; skipped")
                continue
            why = inst.can_carry(request.family, request.type)
            if why is None:
                yield name
            else:
                trace.append(f"{source}: {name} cannot carry it ({why}); next")

    def _listeners(self, names: tuple[str, ...], trace: list[str]) -> tuple[str, ...]:
        """The stacks a listener spans: at most one kernel instance (the first
        named; a kernel port has one listener, and an MPTCP listener accepts
        plain TCP too), and every user-space one."""
        kernel = [n for n in names if self.stacks[n].keeps_fd]
        for extra in kernel[1:]:
            trace.append(f"listen: {extra} skipped, {kernel[0]} is the kernel listener for this port")
        return tuple(n for n in names if n == kernel[0] or not self.stacks[n].keeps_fd) if kernel else names

    def _capable(self, names, request: policy.Request, trace: list[str], source: str) -> tuple[str, ...]:
        """Every stack of ``names`` that can carry the socket, in order."""
        return tuple(self._capable_iter(names, request, trace, source))


_lock = threading.Lock()
_runtime: Optional[Runtime] = None


def get() -> Runtime:
    """The current runtime, built from the default config on first use."""
    rt = _runtime
    if rt is None:
        with _lock:
            rt = _runtime
            if rt is None:
                rt = _install(Runtime(load()))
    return rt


def _install(rt: Runtime) -> Runtime:
    global _runtime
    _runtime = rt
    return rt


def _open_error(config: Config, i: int, spec: Any, exc: OSError) -> ConfigError:
    """The error for ``[[stack]]`` entry ``i`` that could not be opened
    (a missing privilege or device), naming the file and line; its
    ``errno`` is the cause's."""
    field = f"stack[{i}].device" if spec.kind == "smoltcp" else f"stack[{i}]"
    err = ConfigError(config.path, spec.line, field,
                      f"stack {spec.name!r} ({spec.kind}) cannot be opened: {exc.strerror or exc}")
    err.errno = exc.errno
    return err


def configure(source: Union[Config, str, "os.PathLike[str]", None] = None) -> Runtime:
    """Replaces the runtime: from a ``Config``, a config file path, or the
    default lookup when ``None``. Sockets already routed keep their stack."""
    cfg = source if isinstance(source, Config) else load(source)
    with _lock:
        return _install(Runtime(cfg))


def reset() -> None:
    """Forgets the runtime; the next decision loads the config again."""
    global _runtime
    with _lock:
        _runtime = None


def is_ip(host: str) -> bool:
    """Whether ``host`` is a numeric IPv4 or IPv6 address (zone allowed)."""
    # inet_pton, not ipaddress: this runs on every create_connection, and
    # the C parser is some twenty times faster (same strict forms).
    try:
        _socket.inet_pton(_socket.AF_INET, host)
        return True
    except (OSError, TypeError, ValueError):
        pass
    try:
        _socket.inet_pton(_socket.AF_INET6, host.partition("%")[0])
        return True
    except (OSError, TypeError, ValueError, AttributeError):
        return False
