"""Configuration: which stack instances exist and how sockets are routed.

The file is TOML. dmm reads ``$DMM_CONFIG`` if set, else ``./dmm.toml`` if it
exists, else uses the built-in default: the kernel stack alone, so that
``import dmm.socket`` changes nothing until you configure it.

Example::

    [[stack]]
    name = "kernel"
    kind = "kernel"          # kernel | smoltcp | fillp
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

    [[route]]
    to = "10.0.0.0/8"        # destination prefix, IPv4 or IPv6
    ports = "8000-8999"      # optional: a port or a range
    type = "stream"          # optional: stream | dgram
    role = "connect"         # optional: connect | listen | sendto | accept
    priority = 10            # optional: breaks ties between equal prefixes
    stacks = ["mptcp", "kernel"]   # preference order

    [listen]
    stacks = ["kernel", "lan0"]   # one listening socket spans all of these

    [[route]]
    role = "accept"          # which stacks may serve clients from 10.77/16
    to = "10.77.0.0/16"
    stacks = ["lan0"]

Rules match on the destination (the bind address for listeners, the
client's address for ``role = "accept"``); the longest prefix wins, then the
larger priority, then the earlier rule. A socket that no rule matches goes
to the first stack declared. Rules without a role never match accepts; an
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
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "RouteSpec",
    "StackSpec",
    "DEFAULT_TOML",
    "load",
    "parse",
]

#: The built-in configuration: the kernel stack alone.
DEFAULT_TOML = """\
[[stack]]
name = "kernel"
kind = "kernel"
protocol = "tcp"
"""

_KINDS = ("kernel", "smoltcp", "fillp")
# Fields each kind takes besides name and kind.
_FIELDS = {
    "kernel": ("protocol", "io"),
    "fillp": ("rate_control", "address", "fixed_rate", "datagram_size"),
    "smoltcp": ("device", "address", "gateway", "mtu", "mac", "buffer_size"),
}
_RATE_CONTROLS = ("bbr", "fillp", "fixed")
# fixed_rate: "<number><unit>" with a unit of bits per second.
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(kbit|mbit|gbit)\s*$", re.IGNORECASE)
_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# Bounds of fixed_rate, bits/s: above the core's floor of 4 packets per
# 100 ms, below what one connection could be paced at.
_MIN_RATE, _MAX_RATE = 500_000, 100 * 10**9
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,31}$")


class ConfigError(ValueError):
    """A configuration file is malformed; the message says where and why."""

    def __init__(self, path: str, line: int | None, field: str, message: str):
        self.path = path
        self.line = line
        self.field = field
        self.message = message
        where = f"{path}:{line}" if line else path
        super().__init__(f"{where}: {field}: {message}")


@dataclass(frozen=True)
class StackSpec:
    """One ``[[stack]]`` entry."""

    name: str
    kind: str
    protocol: str = "tcp"
    io: str = "syscall"
    #: FillP: rate control mode (bbr, fillp or fixed).
    rate_control: str = "bbr"
    #: FillP: the ``fixed`` mode's sending rate in bits/s (None: the core's
    #: default, 10 Mbit/s).
    fixed_rate: int | None = None
    #: FillP: UDP payload bytes per datagram (None: "auto", from the route
    #: to each peer).
    datagram_size: int | None = None
    #: FillP: the local address its UDP sockets bind to.
    address: str = "0.0.0.0"
    #: smoltcp: the TAP device's name.
    device: str = ""
    #: smoltcp: the instance's addresses with prefix length ("10.77.0.2/24").
    addresses: tuple[str, ...] = ()
    #: smoltcp: default gateways, at most one per family.
    gateways: tuple[str, ...] = ()
    #: smoltcp: the device MTU.
    mtu: int = 1500
    #: smoltcp: the MAC address ("02:..."); derived from the name if empty.
    mac: str = ""
    #: smoltcp: receive and send buffer per TCP socket, in bytes.
    buffer_size: int = 262144
    line: int | None = None


@dataclass(frozen=True)
class RouteSpec:
    """One ``[[route]]`` entry, in file order (``index`` counts from 0)."""

    index: int
    to: str
    stacks: tuple[str, ...]
    ports: tuple[int, int] = (0, 65535)
    type: str | None = None
    role: str | None = None
    priority: int = 0
    line: int | None = None

    def describe(self) -> str:
        """A one-line summary, as ``dmm routes`` prints it."""
        parts = [f"to {self.to}"]
        if self.ports != (0, 65535):
            lo, hi = self.ports
            parts.append(f"ports {lo}" if lo == hi else f"ports {lo}-{hi}")
        if self.type:
            parts.append(self.type)
        if self.role:
            parts.append(self.role)
        if self.priority:
            parts.append(f"priority {self.priority}")
        return " ".join(parts) + " -> " + ", ".join(self.stacks)


@dataclass(frozen=True)
class Config:
    """A validated configuration."""

    path: str
    stacks: tuple[StackSpec, ...]
    routes: tuple[RouteSpec, ...] = ()
    listen: tuple[str, ...] = ()
    builtin: bool = field(default=False, compare=False)

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
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), None, "file", f"cannot be read: {exc.strerror or exc}") from exc
    return parse(text, str(path))


def parse(text: str, path: str = "<string>") -> Config:
    """Parses and validates TOML text; ``path`` is only used in errors."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = getattr(exc, "lineno", None) or _line_from_message(str(exc))
        raise ConfigError(path, line, "syntax", f"not valid TOML ({exc})") from exc
    return _Validator(text, path).config(doc)


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
        for key in doc:
            if key not in ("stack", "route", "listen"):
                raise self.error(self._find_top(key), key, "unknown section (expected [[stack]], [[route]] or [listen])")
        raw_stacks = doc.get("stack")
        if raw_stacks is None:
            raise self.error(None, "stack", "at least one [[stack]] is required")
        if not isinstance(raw_stacks, list):
            raise self.error(self._simple_table_line("stack"), "stack", "must be an array of tables: write [[stack]]")
        stacks = tuple(self.stack(i, s) for i, s in enumerate(raw_stacks))
        names = [s.name for s in stacks]
        for i, s in enumerate(stacks):
            if s.name in names[:i]:
                raise self.error(s.line, f"stack[{i}].name", f"{s.name!r} is already the name of another stack")

        raw_routes = doc.get("route", [])
        if not isinstance(raw_routes, list):
            raise self.error(self._simple_table_line("route"), "route", "must be an array of tables: write [[route]]")
        routes = tuple(self.route(i, r, names) for i, r in enumerate(raw_routes))

        listen: tuple[str, ...] = ()
        raw_listen = doc.get("listen")
        if raw_listen is not None:
            line = self._simple_table_line("listen")
            if not isinstance(raw_listen, dict):
                raise self.error(line, "listen", "must be a table: write [listen]")
            for key in raw_listen:
                if key != "stacks":
                    raise self.error(self._key_line(line, key), f"listen.{key}", "unknown field (expected: stacks)")
            listen = self.stack_list(raw_listen.get("stacks"), "listen.stacks", self._key_line(line, "stacks"), names)
        return Config(self.path, stacks, routes, listen)

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
        allowed = {"name", "kind"}.union(*_FIELDS.values())
        for key in raw:
            if key not in allowed:
                raise self.error(self._key_line(start, key), f"{where}.{key}", "unknown field (expected one of: " + ", ".join(sorted(allowed)) + ")")
        name = raw.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise self.error(self._key_line(start, "name") if "name" in raw else start, f"{where}.name",
                             f"expected a name of letters, digits, '_', '-', '.' (at most 32, starting with a letter), got {name!r}")
        kind = raw.get("kind")
        if kind not in _KINDS:
            raise self.error(self._key_line(start, "kind") if "kind" in raw else start, f"{where}.kind",
                             f"expected one of {', '.join(_KINDS)}, got {kind!r}")
        for key in raw:
            if key not in ("name", "kind") and key not in _FIELDS[kind]:
                raise self.error(self._key_line(start, key), f"{where}.{key}",
                                 f"does not apply to a {kind} stack (it takes: {', '.join(_FIELDS[kind])})")
        protocol = raw.get("protocol", "tcp")
        if protocol not in ("tcp", "mptcp"):
            raise self.error(self._key_line(start, "protocol"), f"{where}.protocol", f"expected 'tcp' or 'mptcp', got {protocol!r}")
        io = raw.get("io", "syscall")
        if io not in ("syscall", "uring"):
            raise self.error(self._key_line(start, "io"), f"{where}.io", f"expected 'syscall' or 'uring', got {io!r}")
        rate = raw.get("rate_control", "bbr")
        if rate not in _RATE_CONTROLS:
            raise self.error(self._key_line(start, "rate_control"), f"{where}.rate_control",
                             f"expected one of {', '.join(_RATE_CONTROLS)}, got {rate!r}")
        if kind == "smoltcp":
            return self.smoltcp(raw, start, where, name)
        address = raw.get("address", "0.0.0.0")
        try:
            if kind == "fillp":
                ipaddress.ip_address(address)
        except (ValueError, TypeError):
            raise self.error(self._key_line(start, "address"), f"{where}.address",
                             f"expected an IP address to bind to, got {address!r}") from None
        fixed_rate = None
        if "fixed_rate" in raw:
            fixed_rate = self.fixed_rate(raw["fixed_rate"], rate, self._key_line(start, "fixed_rate"), f"{where}.fixed_rate")
        size = raw.get("datagram_size", "auto")
        if size == "auto":
            size = None
        elif not isinstance(size, int) or isinstance(size, bool) or not 512 <= size <= 65507:
            raise self.error(self._key_line(start, "datagram_size"), f"{where}.datagram_size",
                             f"expected \"auto\" or bytes of UDP payload from 512 to 65507, got {size!r}")
        return StackSpec(name=name, kind=kind, protocol=protocol, io=io, rate_control=rate, fixed_rate=fixed_rate,
                         datagram_size=size, address=address, line=start)

    def fixed_rate(self, raw: Any, rate_control: str, line: int | None, fld: str) -> int:
        """A FillP ``fixed_rate`` in bits/s, from "100mbit" or an integer."""
        if rate_control != "fixed":
            raise self.error(line, fld, f"applies only with rate_control = \"fixed\" (this stack has {rate_control!r})")
        expected = "a rate such as \"100mbit\", \"2.5gbit\" or \"800kbit\", or an integer of bits/s"
        if isinstance(raw, int) and not isinstance(raw, bool):
            bits = raw
        elif isinstance(raw, str) and (m := _RATE.match(raw)):
            bits = round(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])
        else:
            raise self.error(line, fld, f"expected {expected}, got {raw!r}")
        if not _MIN_RATE <= bits <= _MAX_RATE:
            raise self.error(line, fld, f"expected from 500 kbit/s to 100 gbit/s, got {raw!r}")
        return bits

    def smoltcp(self, raw: dict[str, Any], start: int | None, where: str, name: str) -> StackSpec:
        line = lambda key: self._key_line(start, key) if key in raw else start  # noqa: E731
        device = raw.get("device")
        if isinstance(device, str) and device.startswith("tap:"):
            device = device[4:]
        if not isinstance(device, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", device):
            raise self.error(line("device"), f"{where}.device",
                             f"expected a TAP device name such as \"tap:dmm0\" (at most 15 characters), got {raw.get('device')!r}")
        addrs = raw.get("address")
        addrs = [addrs] if isinstance(addrs, str) else addrs
        if not isinstance(addrs, list) or not addrs:
            raise self.error(line("address"), f"{where}.address",
                             f"expected an address with prefix length such as \"10.77.0.2/24\", or a list of them, got {raw.get('address')!r}")
        families = set()
        for a in addrs:
            try:
                iface = ipaddress.ip_interface(a)
            except (ValueError, TypeError):
                iface = None
            if iface is None or not isinstance(a, str) or "/" not in a:
                raise self.error(line("address"), f"{where}.address",
                                 f"expected an address with prefix length such as \"10.77.0.2/24\", got {a!r}")
            families.add(iface.version)
        gws = raw.get("gateway", [])
        gws = [gws] if isinstance(gws, str) else gws
        seen = set()
        for g in gws if isinstance(gws, list) else [gws]:
            try:
                version = ipaddress.ip_address(g).version
            except (ValueError, TypeError):
                version = None
            if version is None or version not in families or version in seen:
                raise self.error(line("gateway"), f"{where}.gateway",
                                 f"expected at most one gateway address per family the instance has an address in, got {raw.get('gateway')!r}")
            seen.add(version)
        mtu = raw.get("mtu", 1500)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 1280 <= mtu <= 65521:
            raise self.error(line("mtu"), f"{where}.mtu", f"expected an integer from 1280 (IPv6 needs it) to 65521 (the TAP maximum), got {mtu!r}")
        mac = raw.get("mac", "")
        if not isinstance(mac, str) or (mac and not re.fullmatch(r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", mac)):
            raise self.error(line("mac"), f"{where}.mac", f"expected a MAC address like \"02:00:00:00:00:01\", got {mac!r}")
        size = raw.get("buffer_size", 262144)
        if not isinstance(size, int) or isinstance(size, bool) or not 4096 <= size <= 1 << 30:
            raise self.error(line("buffer_size"), f"{where}.buffer_size", f"expected bytes from 4096 to 1 GiB, got {size!r}")
        return StackSpec(name=name, kind="smoltcp", device=device, addresses=tuple(addrs), gateways=tuple(gws),
                         mtu=mtu, mac=mac, buffer_size=size, line=start)

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
        allowed = {"to", "stacks", "ports", "type", "role", "priority", "when"}
        for key in raw:
            if key not in allowed:
                raise self.error(self._key_line(start, key), f"{where}.{key}", "unknown field (expected one of: " + ", ".join(sorted(allowed)) + ")")
        line = lambda key: self._key_line(start, key) if key in raw else start  # noqa: E731
        to = raw.get("to")
        if not isinstance(to, str):
            raise self.error(line("to"), f"{where}.to", f"expected a prefix such as \"10.0.0.0/8\" or \"::/0\", got {to!r}")
        try:
            net = ipaddress.ip_network(to, strict=True)
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
        if "when" in raw:
            raise self.error(line("when"), f"{where}.when",
                             "path conditions need measured path state, which this version does not collect yet; "
                             "use a Python policy hook (dmm.policy.register) instead")
        return RouteSpec(index=i, to=str(net), stacks=stacks, ports=ports, type=typ, role=role, priority=priority, line=start)

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
