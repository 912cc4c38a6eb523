"""Central RD's keys and values in etcd: the layout, and the checks every
value read back passes before it counts (sans-IO: no client here).

Under the configured prefix (``/dmm/`` by default)::

    policy                                   the central policy (TOML text:
                                             [[route]] and [adaptive])
    hosts/<host>/ads/<address>:<port>:<pid>  a listener's advertisement
                                             (JSON), on its process's lease
    hosts/<host>/paths/<prefix>              the host's path estimate toward
                                             a destination prefix (JSON)

Everything a host writes lives under ``hosts/<host>/``, so with etcd auth a
host's role needs write access to that range only (and read access to the
prefix); the policy key is the operator's.

A value that fails its check is *malformed*: the reader ignores it and
counts it, as a config file's error would be reported, and no process ever
fails because of what another wrote.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from .paths import Aggregate

__all__ = ["Advertisement", "Key", "Malformed", "ad_key", "ad_value", "parse_ad", "parse_key", "parse_path",
           "path_key", "path_value", "policy_key"]

_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PROTO = re.compile(r"[a-z][a-z0-9_]{0,15}")
#: The largest value dmm reads (an advertisement or estimate is ~200 bytes).
MAX_VALUE = 16 * 1024


class Malformed(ValueError):
    """A key or value in etcd that dmm cannot use; the message says why."""


@dataclass(frozen=True)
class Key:
    """What a key under the prefix names: ``kind`` is ``"policy"``,
    ``"ad"`` or ``"path"``; ``host`` and ``name`` (the ad's
    ``address:port:pid`` or the path's prefix) for the last two."""

    kind: str
    host: str = ""
    name: str = ""


@dataclass(frozen=True)
class Advertisement:
    """A listener as central RD lists it: where (every address it is
    reached at, its port), the protocols it accepts there with their ports,
    the stacks behind it and the process."""

    host: str
    addresses: tuple[str, ...]
    port: int
    protocols: tuple[tuple[str, int], ...]
    stacks: tuple[str, ...]
    pid: int


def policy_key(prefix: str) -> str:
    """The key of the central policy."""
    return prefix + "policy"


def ad_key(prefix: str, host: str, address: str, port: int, pid: int) -> str:
    """The key of a listener's advertisement."""
    return f"{prefix}hosts/{host}/ads/{address}:{port}:{pid}"


def path_key(prefix: str, host: str, dest: str) -> str:
    """The key of ``host``'s estimate toward prefix ``dest``."""
    return f"{prefix}hosts/{host}/paths/{dest}"


def parse_key(prefix: str, key: str) -> Key:
    """Which entry ``key`` is (:class:`Malformed` if none dmm knows)."""
    if not key.startswith(prefix):
        raise Malformed(f"{key!r} is outside the prefix {prefix!r}")
    rest = key[len(prefix):]
    if rest == "policy":
        return Key("policy")
    parts = rest.split("/", 3)
    if len(parts) == 4 and parts[0] == "hosts" and _HOST.fullmatch(parts[1]) and parts[2] in ("ads", "paths"):
        return Key("ad" if parts[2] == "ads" else "path", parts[1], parts[3])
    raise Malformed(f"{key!r} is not a key dmm writes")


def ad_value(ad: Advertisement) -> bytes:
    """An advertisement as stored."""
    return json.dumps({"host": ad.host, "addresses": list(ad.addresses), "port": ad.port,
                       "protocols": [list(p) for p in ad.protocols], "stacks": list(ad.stacks),
                       "pid": ad.pid}, separators=(",", ":")).encode()


def parse_ad(key: Key, value: bytes) -> Advertisement:
    """The advertisement stored under ``key``, checked field by field."""
    doc = _json_object(value)
    host = doc.get("host")
    if host != key.host:
        raise Malformed(f"host {host!r} differs from the key's {key.host!r}")
    addresses = doc.get("addresses")
    if not isinstance(addresses, list) or not 0 < len(addresses) <= 64:
        raise Malformed("addresses: expected a list of 1 to 64 addresses")
    for a in addresses:
        _check_ip(a, "addresses")
    port = _int(doc.get("port"), "port", 1, 65535)
    protocols = doc.get("protocols")
    if not isinstance(protocols, list) or not 0 < len(protocols) <= 16:
        raise Malformed("protocols: expected a list of 1 to 16 [protocol, port] pairs")
    protos = []
    for p in protocols:
        if not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _PROTO.fullmatch(p[0])):
            raise Malformed(f"protocols: expected [protocol, port], got {p!r}")
        protos.append((p[0], _int(p[1], "protocols port", 1, 65535)))
    stacks = doc.get("stacks")
    if not isinstance(stacks, list) or not all(isinstance(s, str) and len(s) <= 32 for s in stacks):
        raise Malformed("stacks: expected a list of stack names")
    pid = _int(doc.get("pid"), "pid", 1, 2**31)
    return Advertisement(host, tuple(addresses), port, tuple(protos), tuple(stacks), pid)


def path_value(agg: Aggregate) -> bytes:
    """A path aggregate as stored (its decayed sums, so that readers can
    merge several hosts' as one)."""
    return json.dumps({"rtt_sum": agg.rtt_sum, "rtt_w": agg.rtt_w, "loss_sum": agg.loss_sum, "loss_w": agg.loss_w,
                       "rate_sum": agg.rate_sum, "rate_w": agg.rate_w, "samples": agg.samples,
                       "updated": agg.updated}, separators=(",", ":")).encode()


def parse_path(key: Key, value: bytes) -> Aggregate:
    """The aggregate stored under ``key``; its prefix must be a network."""
    try:
        net = ipaddress.ip_network(key.name, strict=True)
    except ValueError as exc:
        raise Malformed(f"{key.name!r} is not a network prefix: {exc}") from None
    if net.num_addresses == 1:
        raise Malformed(f"{key.name!r}: estimates are shared per prefix, not per address")
    doc = _json_object(value)
    fields = {}
    for name in ("rtt_sum", "rtt_w", "loss_sum", "loss_w", "rate_sum", "rate_w", "updated"):
        v = doc.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise Malformed(f"{name}: expected a finite number >= 0, got {v!r}")
        fields[name] = float(v)
    if fields["loss_w"] and not fields["loss_sum"] <= fields["loss_w"] * (1 + 1e-9):
        raise Malformed("loss_sum: the mean loss would exceed 100%")
    samples = _int(doc.get("samples"), "samples", 0, 2**53)
    return Aggregate(samples=samples, **fields)


def _json_object(value: bytes) -> dict[str, Any]:
    if len(value) > MAX_VALUE:
        raise Malformed(f"the value is {len(value)} bytes (at most {MAX_VALUE})")
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise Malformed("expected a JSON object")
    return doc


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise Malformed(f"{name}: expected an integer from {lo} to {hi}, got {v!r}")
    return v


def _check_ip(v: Any, name: str) -> Optional[str]:
    if not isinstance(v, str):
        raise Malformed(f"{name}: expected an IP address, got {v!r}")
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise Malformed(f"{name}: {v!r} is not an IP address") from None
    return v
