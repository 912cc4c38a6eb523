"""Configuration: which stack instances exist and how sockets are routed.

The file is TOML. dmm reads ``$DMM_CONFIG`` if set, else ``./dmm.toml`` if it
exists, else uses the built-in default: the kernel stack alone, so that
``import dmm.socket`` changes nothing until you configure it.

Example::

    [[stack]]
    name = "kernel"
    kind = "kernel"          # kernel | smoltcp | fillp | memory
    protocol = "tcp"         # tcp | mptcp
    io = "syscall"           # syscall | uring

    [[stack]]
    name = "mptcp"
    kind = "kernel"
    protocol = "mptcp"

    [[stack]]
    name = "lan0"
    kind = "smoltcp"         # user-space TCP/IP over a TAP device
    device = "tap:dmm0"      # created if absent ("dmm0" works too)
    address = ["10.77.0.2/24", "fd00:77::2/64"]   # one or several
    gateway = "10.77.0.1"    # optional, one per family
    mtu = 1500               # optional (jumbo frames allowed)

    [[stack]]
    name = "wan"
    kind = "fillp"           # reliable transport over UDP
    rate_control = "bbr"     # bbr | fillp | fixed
    # fixed_rate = "100mbit" # rate_control = "fixed" only: the sending rate,
                             # "<number>kbit|mbit|gbit" (per second, decimal)
                             # or an integer of bits/s; default 10 Mbit/s
    datagram_size = "auto"   # UDP payload per datagram: "auto" sizes it from
                             # the route to each peer (the route MTU less
                             # headers above 1500, else 1400), or 512-65507
    max_connections = 4096   # a listener's limit; clients beyond are refused
    client_port = "per-connection"  # or "shared": client connections share one
                             # UDP socket (fewer fds; one local port for all)
    resumption = true        # reconnects within 30 s skip a round trip with the
                             # server's ticket (false: no tickets either way)

    [[route]]
    to = "10.0.0.0/8"        # destination prefix, IPv4 or IPv6
    ports = "8000-8999"      # optional: a port or a range
    type = "stream"          # optional: stream | dgram
    role = "connect"         # optional: connect | listen | sendto | accept
    priority = 10            # optional: breaks ties between equal prefixes
    stacks = ["mptcp", "kernel"]   # candidates, in preference order

    [listen]
    stacks = ["kernel", "lan0"]   # one listening socket spans all of these

    [[route]]
    role = "accept"          # which stacks may serve clients from 10.77/16
    to = "10.77.0.0/16"
    stacks = ["lan0"]

    [[route]]                # no "to": every destination
    when = { rtt_ms = ">= 30", loss = ">= 0.5%" }   # measured path state
    stacks = ["wan", "kernel"]

    [paths]                  # path knowledge (all optional)
    half_life_s = 600        # how fast old measurements fade
    prefix_v4 = 24           # estimates are kept per address and per prefix
    prefix_v6 = 64
    sample_every_s = 10      # long connections leave a sample this often (0: at close only)

    [adaptive]               # the built-in adaptive policy (dmm.adaptive)
    kernel = "kernel"        # optional: the stack for good paths
    lossy = "wan"            # optional: the stack for long, lossy paths
    congestion = "auto"      # the kernel's TCP congestion control: auto | bbr | cubic | ...

    [rd]                     # resource discovery (all optional)
    central = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]   # etcd: central RD
    prefix = "/dmm/"         # the keys dmm uses in etcd
    user = "host-a"          # etcd auth (with password), one user per host
    password = "..."
    host = "host-a"          # this host's name there (default: the host name)
    lease_ttl_s = 10         # advertisements vanish this long after their process
    timeout_ms = 50          # the longest a connect waits for the first sync

Rules match on the destination (the bind address for listeners, the
client's address for ``role = "accept"``); the longest prefix wins, then the
larger priority, then the earlier rule. A socket that no rule matches goes
to the first stack declared (or, with ``[adaptive]``, to the stack the
adaptive policy picks). A rule with ``when`` matches only while the path's
measured state meets every condition (:mod:`dmm.conditions`); with no
measurement it does not match. Rules without a role never match accepts; an
accepted connection that arrived on a stack its accept rule does not list
is refused. Every error names the file, the line, the field and what was
expected.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import _core
from .adaptive import AdaptiveSpec
from .conditions import Condition, ConditionError, parse_when

__all__ = [
    "AdaptiveSpec",
    "Config",
    "ConfigError",
    "PathsSpec",
    "RDSpec",
    "RouteSpec",
    "StackSpec",
    "DEFAULT_TOML",
    "load",
    "parse",
    "parse_policy",
]

#: The built-in configuration: the kernel stack alone.
DEFAULT_TOML = """\
[[stack]]
name = "kernel"
kind = "kernel"
protocol = "tcp"
"""

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class ConfigError(ValueError, OSError):
    """A configuration file is malformed; the message says where and why.

    Also an ``OSError``: dmm reads its config at a program's first socket
    call, and unmodified programs catch ``OSError`` around those.
    """

    def __init__(self, path: str, line: int | None, field: str, message: str):
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field}: {message}")


class ConfigErrors(ConfigError):
    """Several errors in one file: ``errors`` holds each (a
    :class:`ConfigError`) in the order of their lines, and the message
    lists them, one per line; the other attributes are the first one's."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = sorted(errors, key=lambda e: (e.line is None, e.line or 0))
        first = self.errors[0]
        super().__init__(first.path, first.line, first.field, first.message)
        self.args = ("\n".join(str(e) for e in self.errors),)


def _together(errors: list[ConfigError]) -> ConfigError:
    """One error as it is; several as :class:`ConfigErrors`."""
    return errors[0] if len(errors) == 1 else ConfigErrors(errors)


@dataclass(frozen=True)
class StackSpec:
    """One ``[[stack]]`` entry, checked by its kind's parser in the core.

    The kind's fields read as attributes (``spec.protocol``, ``spec.mtu``),
    with the value in force: defaults filled in, ``None`` for an optional
    field left out, lists as tuples.
    """

    name: str
    kind: str
    #: Every field of the kind with the value in force.
    options: dict[str, Any] = field(default_factory=dict)
    line: int | None = None
    #: The checked options as the core holds them (``_core.StackConfig``).
    core: Any = field(default=None, compare=False, repr=False)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__"):
            options = self.__dict__.get("options", {})
            if name in options:
                return options[name]
        raise AttributeError(f"a {self.__dict__.get('kind')} stack has no field {name!r}")


@dataclass(frozen=True)
class RouteSpec:
    """One ``[[route]]`` entry, in file order (``index`` counts from 0)."""

    index: int
    #: The destination prefix, or ``None``: every destination.
    to: Optional[str]
    stacks: tuple[str, ...]
    ports: tuple[int, int] = (0, 65535)
    type: str | None = None
    role: str | None = None
    priority: int = 0
    line: int | None = None
    #: Race the candidates (``race = false``: the next starts only when the
    #: previous one failed).
    race: bool = True
    #: Path conditions that must all hold (``when``); ``()``: always.
    when: tuple[Condition, ...] = ()
    #: Where the rule came from when not from the config file (a central
    #: policy: its etcd key and revision); ``""``: the file.
    origin: str = field(default="", compare=False)

    def describe(self) -> str:
        """A one-line summary, as ``dmm routes`` prints it."""
        parts = [f"to {self.to}" if self.to else "to any"]
        if self.ports != (0, 65535):
            lo, hi = self.ports
            parts.append(f"ports {lo}" if lo == hi else f"ports {lo}-{hi}")
        if self.type:
            parts.append(self.type)
        if self.role:
            parts.append(self.role)
        if self.priority:
            parts.append(f"priority {self.priority}")
        if self.when:
            parts.append("when " + ", ".join(c.describe() for c in self.when))
        return " ".join(parts) + " -> " + ", ".join(self.stacks)


@dataclass(frozen=True)
class RDSpec:
    """The ``[rd]`` section: resource discovery and racing (all optional)."""

    #: Whether this process uses L-RD at all (default: with more than one stack).
    enabled: bool = True
    #: Directory of the host's store (``None``: ``$DMM_RD_DIR``,
    #: ``$XDG_RUNTIME_DIR/dmm``, ``/run/dmm`` for root, ``/tmp/dmm-<uid>``).
    store: str | None = None
    #: Happy Eyeballs connection-attempt delay, seconds (RFC 8305's 250 ms).
    attempt_delay: float = 0.25
    #: Lower bound of the delay once the path's RTT is known (RFC 8305: 10 ms).
    min_attempt_delay: float = 0.01
    #: How long "the peer speaks it" is remembered, seconds.
    ttl: float = 600.0
    #: How long "it does not" (refused, unanswered) is remembered, seconds.
    negative_ttl: float = 120.0
    #: Ask a peer's FillP port what it accepts on while a TCP candidate connects.
    discovery: bool = True
    #: How long to wait for that answer, seconds.
    discovery_timeout: float = 2.0
    #: Central RD: etcd endpoints (``host:port``), empty for none.
    central: tuple[str, ...] = ()
    #: Every key dmm writes or reads in etcd starts with this.
    prefix: str = "/dmm/"
    #: etcd user and password (auth on), or ``None``.
    user: str | None = None
    password: str | None = None
    #: The longest a connect waits for central RD's first sync, seconds.
    timeout: float = 0.05
    #: Advertisements vanish this long after their process died, seconds.
    lease_ttl: int = 10
    #: This host's name in central RD (default: the system's host name).
    host: str | None = None
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PathsSpec:
    """The ``[paths]`` section: how path knowledge is kept."""

    #: Whether closing connections leave measurements at all.
    enabled: bool = True
    #: A measurement weighs half as much after this many seconds.
    half_life: float = 600.0
    #: Estimates are kept per address and per network of this many bits.
    prefix_v4: int = 24
    prefix_v6: int = 64
    #: Estimates with no measurement for this long are dropped, seconds.
    max_age: float = 6 * 3600.0
    #: A connection open longer than this leaves a sample every this many
    #: seconds, not only at close (0: only at close).
    sample_every: float = 10.0
    line: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Config:
    """A validated configuration."""

    path: str
    stacks: tuple[StackSpec, ...]
    routes: tuple[RouteSpec, ...] = ()
    listen: tuple[str, ...] = ()
    builtin: bool = field(default=False, compare=False)
    #: The ``[rd]`` section, or ``None`` when the file has none.
    rd: RDSpec | None = None
    #: The ``[paths]`` section (defaults when the file has none).
    paths: PathsSpec = PathsSpec()
    #: The ``[adaptive]`` section, or ``None``: no adaptive policy.
    adaptive: AdaptiveSpec | None = None

    def stack(self, name: str) -> StackSpec:
        """The stack named ``name`` (``KeyError`` if there is none)."""
        for spec in self.stacks:
            if spec.name == name:
                return spec
        raise KeyError(name)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Loads the configuration dmm would use.

    With ``path``, that file. Otherwise ``$DMM_CONFIG``, then ``./dmm.toml``,
    then the built-in default.
    """
    if path is None:
        path = os.environ.get("DMM_CONFIG") or None
        if path is None and Path("dmm.toml").is_file():
            path = "dmm.toml"
    if path is None:
        cfg = parse(DEFAULT_TOML, "<built-in default>")
        return Config(cfg.path, cfg.stacks, cfg.routes, cfg.listen, builtin=True)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), None, "file", f"cannot be read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(str(path), line, "file", f"is not UTF-8 (byte {data[exc.start]:#04x} at offset "
                          f"{exc.start}); TOML files are UTF-8") from None
    return parse(text, str(path))


def parse(text: str, path: str = "<string>") -> Config:
    """Parses and validates TOML text; ``path`` is only used in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ConfigError(path, line, "syntax", f"not valid TOML ({exc})") from exc
    return _Validator(text, path).config(doc)


def _etcd_endpoint(text: str, error: Any) -> str:
    """``http://host:port`` (or ``host:port``) as ``host:port``; ``error``
    makes the exception for a bad one."""
    rest = text
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme == "https":
            raise error(f"{text!r}: TLS is not supported (the etcd client dmm uses, aetcd, speaks plain gRPC); "
                        "use http on a trusted network, or a local TLS proxy")
        if scheme != "http":
            raise error(f"{text!r}: expected an http:// endpoint")
    host, _, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise error(f"{text!r}: expected http://HOST:PORT")
    return f"{host}:{int(port)}"


def parse_policy(text: str, path: str, stack_names: list[str]) -> tuple[tuple["RouteSpec", ...], "AdaptiveSpec | None"]:
    """Parses a central policy: the ``[[route]]`` entries and ``[adaptive]``
    section of a dmm.toml (nothing else), checked against this host's
    stacks. Raises :class:`ConfigError` naming ``path`` (the etcd key)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ConfigError(path, line, "syntax", f"not valid TOML ({exc})") from exc
    v = _Validator(text, path)
    for key in doc:
        if key not in ("route", "adaptive"):
            raise v.error(v._find_top(key), key, "a central policy has only [[route]] and [adaptive]")
    raw_routes = doc.get("route", [])
    if not isinstance(raw_routes, list):
        raise v.error(v._simple_table_line("route"), "route", "must be an array of tables: write [[route]]")
    routes = tuple(v.route(i, r, stack_names) for i, r in enumerate(raw_routes))
    adaptive = v.adaptive(doc["adaptive"], stack_names) if "adaptive" in doc else None
    return routes, adaptive


def _line_from_message(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None


class _Validator:
    """Turns a parsed TOML document into a ``Config``, or raises with the line."""

    def __init__(self, text: str, path: str):
        self.path = path
        self.lines = text.splitlines()

    # -- locating fields in the text, for error messages ------------------------

    def _table_line(self, array: str, index: int) -> int | None:
        """Line of the ``index``-th ``[[array]]`` header (1-based)."""
        header = re.compile(r"^\s*\[\[\s*" + re.escape(array) + r"\s*\]\]")
        seen = -1
        for no, line in enumerate(self.lines, 1):
            if header.match(line):
                seen += 1
                if seen == index:
                    return no
        return None

    def _key_line(self, start: int | None, key: str) -> int | None:
        """Line of ``key = ...`` in the table that starts at ``start``."""
        if start is None:
            return None
        pattern = re.compile(r"^\s*" + re.escape(key) + r"\s*=")
        for no in range(start + 1, len(self.lines) + 1):
            line = self.lines[no - 1]
            if re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return no
        return start

    def _simple_table_line(self, name: str) -> int | None:
        header = re.compile(r"^\s*\[\s*" + re.escape(name) + r"\s*\]")
        for no, line in enumerate(self.lines, 1):
            if header.match(line):
                return no
        return None

    def error(self, line: int | None, fld: str, message: str) -> ConfigError:
        return ConfigError(self.path, line, fld, message)

    # -- validation -------------------------------------------------------------

    def config(self, doc: dict[str, Any]) -> Config:
        """The checked config; every table's first error at once (a
        :class:`ConfigErrors` when there are several)."""
        errors: list[ConfigError] = []

        def checked(check: Callable[..., Any], *args: Any, default: Any = None) -> Any:
            try:
                return check(*args)
            except ConfigError as exc:
                errors.append(exc)
                return default

        for key in doc:
            if key not in ("stack", "route", "listen", "rd", "paths", "adaptive"):
                errors.append(self.error(self._find_top(key), key,
                                         "unknown section (expected [[stack]], [[route]], [listen], [rd], [paths] "
                                         "or [adaptive])"))
        raw_stacks = doc.get("stack")
        if raw_stacks is None:
            raise _together(errors + [self.error(None, "stack", "at least one [[stack]] is required")])
        if not isinstance(raw_stacks, list):
            raise _together(errors + [self.error(self._simple_table_line("stack"), "stack",
                                                 "must be an array of tables: write [[stack]]")])
        stacks = tuple(s for i, r in enumerate(raw_stacks) if (s := checked(self.stack, i, r)) is not None)
        # A stack that failed its check still has its name: routes naming it
        # are not reported for that.
        names = [r["name"] for r in raw_stacks if isinstance(r, dict) and isinstance(r.get("name"), str)]
        for i, s in enumerate(stacks):
            if s.name in [t.name for t in stacks[:i]]:
                errors.append(self.error(s.line, f"stack[{i}].name", f"{s.name!r} is already the name of another "
                                         "stack"))

        raw_routes = doc.get("route", [])
        routes: tuple[RouteSpec, ...] = ()
        if not isinstance(raw_routes, list):
            errors.append(self.error(self._simple_table_line("route"), "route",
                                     "must be an array of tables: write [[route]]"))
        else:
            routes = tuple(r for i, raw in enumerate(raw_routes) if (r := checked(self.route, i, raw, names)))
        listen = checked(self.listen, doc["listen"], names, default=()) if "listen" in doc else ()
        rd = checked(self.rd, doc["rd"]) if "rd" in doc else None
        paths = checked(self.paths, doc["paths"], default=PathsSpec()) if "paths" in doc else PathsSpec()
        adaptive = checked(self.adaptive, doc["adaptive"], names) if "adaptive" in doc else None
        if errors:
            raise _together(errors)
        return Config(self.path, stacks, routes, listen, rd=rd, paths=paths, adaptive=adaptive)

    def listen(self, raw: Any, names: list[str]) -> tuple[str, ...]:
        line = self._simple_table_line("listen")
        if not isinstance(raw, dict):
            raise self.error(line, "listen", "must be a table: write [listen]")
        for key in raw:
            if key != "stacks":
                raise self.error(self._key_line(line, key), f"listen.{key}", "unknown field (expected: stacks)")
        return self.stack_list(raw.get("stacks"), "listen.stacks", self._key_line(line, "stacks"), names)

    def paths(self, raw: Any) -> PathsSpec:
        start = self._simple_table_line("paths")
        if not isinstance(raw, dict):
            raise self.error(start, "paths", "must be a table: write [paths]")
        known = {"enabled": (bool,), "half_life_s": (1, 30 * 86400), "max_age_s": (1, 365 * 86400),
                 "sample_every_s": (0, 86400), "prefix_v4": (8, 32), "prefix_v6": (16, 128)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            line = self._key_line(start, key)
            if key not in known:
                raise self.error(line, f"paths.{key}", "unknown field (expected one of: " + ", ".join(known) + ")")
            if key == "enabled":
                if not isinstance(value, bool):
                    raise self.error(line, "paths.enabled", f"expected true or false, got {value!r}")
                values[key] = value
                continue
            lo, hi = known[key]
            integral = key.startswith("prefix")
            kinds = (int,) if integral else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
                what = "an integer" if integral else "a number of seconds"
                raise self.error(line, f"paths.{key}", f"expected {what} from {lo} to {hi}, got {value!r}")
            values[key.removesuffix("_s")] = value
        return PathsSpec(line=start, **values)

    def adaptive(self, raw: Any, names: list[str]) -> AdaptiveSpec:
        start = self._simple_table_line("adaptive")
        if not isinstance(raw, dict):
            raise self.error(start, "adaptive", "must be a table: write [adaptive]")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            line = self._key_line(start, key)
            if key in ("kernel", "lossy"):
                if value not in names:
                    raise self.error(line, f"adaptive.{key}",
                                     f"no stack is named {value!r} (declared: {', '.join(names)})")
            elif key == "congestion":
                if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9_]{1,15}", value):
                    raise self.error(line, "adaptive.congestion",
                                     f"expected \"auto\" or a congestion control name such as \"cubic\", got {value!r}")
            else:
                raise self.error(line, f"adaptive.{key}", "unknown field (expected one of: kernel, lossy, congestion)")
            values[key] = value
        return AdaptiveSpec(line=start, **values)

    def rd(self, raw: Any) -> RDSpec:
        start = self._simple_table_line("rd")
        if not isinstance(raw, dict):
            raise self.error(start, "rd", "must be a table: write [rd]")
        # field: (parser, what is expected)
        seconds = ("attempt_delay_ms", "min_attempt_delay_ms", "ttl_s", "negative_ttl_s", "discovery_timeout_ms",
                   "timeout_ms")
        central = ("central", "prefix", "user", "password", "lease_ttl_s", "host")
        known = ("enabled", "store", "discovery", *seconds, *central)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            line = self._key_line(start, key)
            if key not in known:
                raise self.error(line, f"rd.{key}", "unknown field (expected one of: " + ", ".join(known) + ")")
            if key in central:
                values[key.removesuffix("_s")] = self._central_field(key, value, line)
            elif key in ("enabled", "discovery"):
                if not isinstance(value, bool):
                    raise self.error(line, f"rd.{key}", f"expected true or false, got {value!r}")
                values[key] = value
            elif key == "store":
                if not isinstance(value, str) or not value:
                    raise self.error(line, "rd.store", f"expected a directory path, got {value!r}")
                values[key] = value
            else:
                unit, scale = ("ms", 1000) if key.endswith("_ms") else ("s", 1)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400 * scale:
                    raise self.error(line, f"rd.{key}", f"expected a positive number of {'milliseconds' if unit == 'ms' else 'seconds'}, got {value!r}")
                values[key.rsplit("_", 1)[0]] = value / scale
        spec = RDSpec(line=start, **values)
        if (spec.user is None) != (spec.password is None):
            raise self.error(self._key_line(start, "user" if spec.user is None else "password"),
                             "rd.user" if spec.user is None else "rd.password",
                             "etcd authentication needs both user and password")
        if spec.min_attempt_delay > spec.attempt_delay:
            raise self.error(self._key_line(start, "min_attempt_delay_ms"), "rd.min_attempt_delay_ms",
                             "must not be larger than attempt_delay_ms")
        return spec

    def _central_field(self, key: str, value: Any, line: int | None) -> Any:
        """One central-RD field of ``[rd]``, checked."""
        fld = f"rd.{key}"
        if key == "central":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise self.error(line, fld, f"expected a list of etcd endpoints such as [\"http://10.0.0.1:2379\"], "
                                            f"got {value!r}")
            return tuple(_etcd_endpoint(v, lambda m: self.error(line, fld, m)) for v in value)
        if key == "lease_ttl_s":
            if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 3600:
                raise self.error(line, fld, f"expected a whole number of seconds from 2 to 3600, got {value!r}")
            return value
        if not isinstance(value, str) or not value:
            raise self.error(line, fld, f"expected a non-empty string, got {value!r}")
        if key == "prefix" and (not value.startswith("/") or not value.endswith("/")):
            raise self.error(line, fld, f"expected a key prefix that starts and ends with '/', got {value!r}")
        if key == "host" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", value):
            raise self.error(line, fld, f"expected a host name of letters, digits, '_', '-', '.', got {value!r}")
        return value

    def _find_top(self, key: str) -> int | None:
        for no, line in enumerate(self.lines, 1):
            if re.match(r"^\s*\[*\s*" + re.escape(key) + r"\b", line):
                return no
        return None

    def stack(self, i: int, raw: Any) -> StackSpec:
        start = self._table_line("stack", i)
        where = f"stack[{i}]"
        if not isinstance(raw, dict):
            raise self.error(start, where, "must be a table")
        kinds = {name: fields for name, _summary, fields in _core.stack_kinds()}
        allowed = {"name", "kind"}.union(*kinds.values())
        for key in raw:
            if key not in allowed:
                raise self.error(self._key_line(start, key), f"{where}.{key}", "unknown field (expected one of: " + ", ".join(sorted(allowed)) + ")")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.error(self._key_line(start, "name") if "name" in raw else start, f"{where}.name",
                             f"expected a name of letters, digits, '_', '-', '.' (at most 32, starting with a letter), got {name!r}")
        kind = raw.get("kind")
        if kind not in kinds:
            raise self.error(self._key_line(start, "kind") if "kind" in raw else start, f"{where}.kind",
                             f"expected one of {', '.join(kinds)}, got {kind!r}")
        fields = {k: v for k, v in raw.items() if k not in ("name", "kind")}
        try:
            checked = _core.parse_stack(kind, fields)
        except _core.OptionError as exc:
            line = self._key_line(start, exc.field) if exc.field in raw else start
            raise self.error(line, f"{where}.{exc.field}", exc.message) from None
        return StackSpec(name=name, kind=kind, options=dict(checked.values()), line=start, core=checked)

    def stack_list(self, raw: Any, fld: str, line: int | None, names: list[str]) -> tuple[str, ...]:
        if not isinstance(raw, list) or not raw or not all(isinstance(s, str) for s in raw):
            raise self.error(line, fld, f"expected a non-empty list of stack names, got {raw!r}")
        for s in raw:
            if s not in names:
                raise self.error(line, fld, f"no stack is named {s!r} (declared: {', '.join(names)})")
        return tuple(raw)

    def route(self, i: int, raw: Any, names: list[str]) -> RouteSpec:
        start = self._table_line("route", i)
        where = f"route[{i}]"
        if not isinstance(raw, dict):
            raise self.error(start, where, "must be a table")
        allowed = {"to", "stacks", "ports", "type", "role", "priority", "when", "race"}
        for key in raw:
            if key not in allowed:
                raise self.error(self._key_line(start, key), f"{where}.{key}", "unknown field (expected one of: " + ", ".join(sorted(allowed)) + ")")
        line = lambda key: self._key_line(start, key) if key in raw else start  # noqa: E731
        to = raw.get("to")
        if to is not None and not isinstance(to, str):
            raise self.error(line("to"), f"{where}.to", f"expected a prefix such as \"10.0.0.0/8\" or \"::/0\", got {to!r}")
        try:
            net = ipaddress.ip_network(to, strict=True) if to is not None else None
        except ValueError as exc:
            raise self.error(line("to"), f"{where}.to", f"expected a prefix such as \"10.0.0.0/8\" or \"::/0\": {exc}") from None
        stacks = self.stack_list(raw.get("stacks"), f"{where}.stacks", line("stacks"), names)
        ports = self.ports(raw.get("ports"), f"{where}.ports", line("ports"))
        typ = raw.get("type")
        if typ not in (None, "stream", "dgram"):
            raise self.error(line("type"), f"{where}.type", f"expected 'stream' or 'dgram', got {typ!r}")
        role = raw.get("role")
        if role not in (None, "connect", "listen", "sendto", "accept"):
            raise self.error(line("role"), f"{where}.role",
                             f"expected 'connect', 'listen', 'sendto' or 'accept', got {role!r}")
        priority = raw.get("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**31) <= priority < 2**31:
            raise self.error(line("priority"), f"{where}.priority", f"expected an integer, got {priority!r}")
        when: tuple[Condition, ...] = ()
        if "when" in raw:
            try:
                when = parse_when(raw["when"])
            except ConditionError as exc:
                fld = f"{where}.when.{exc.field}" if exc.field else f"{where}.when"
                raise self.error(line("when"), fld, exc.message) from None
        race = raw.get("race", True)
        if not isinstance(race, bool):
            raise self.error(line("race"), f"{where}.race", f"expected true or false, got {race!r}")
        return RouteSpec(index=i, to=str(net) if net is not None else None, stacks=stacks, ports=ports, type=typ,
                         role=role, priority=priority, line=start, race=race, when=when)

    def ports(self, raw: Any, fld: str, line: int | None) -> tuple[int, int]:
        if raw is None:
            return (0, 65535)
        lo = hi = None
        if isinstance(raw, int) and not isinstance(raw, bool):
            lo = hi = raw
        elif isinstance(raw, str):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", raw)
            if m:
                lo = int(m.group(1))
                hi = int(m.group(2)) if m.group(2) else lo
        if lo is None or hi is None or not (0 <= lo <= hi <= 65535):
            raise self.error(line, fld, f"expected a port or a range like \"8000-8999\" within 0-65535, got {raw!r}")
        return (lo, hi)
