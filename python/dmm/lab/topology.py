"""Network namespaces joined by emulated links: the plan and the :class:`Lab`.

Every lab is a star: one ``server`` namespace and one or more client
namespaces, each client behind its own emulated link (two TAP devices and a
``dmm._core.Linkem`` relaying between them). One link per client instead of a
bridge keeps each client's impairments independent and needs no bridge
device. Addresses:

* the server has ``10.201.0.1/32`` and ``fd00:201::1/128`` on its loopback,
  reachable from every client, so ``lab.address("server")`` is the same for
  all of them;
* link ``i`` (1-based) is ``10.201.i.0/24`` and ``fd00:201::i:0/112``:
  ``.1``/``::i:1`` on the server's side, ``.2``/``::i:2`` on the client's;
  the client routes the server's loopback addresses via the server's side.
  Neighbour entries are static (no ARP/ND through lossy links), IPv6 has
  no link-local addresses, DAD or router solicitation.

Link ``up`` is client -> server (the emulator's ``ab``), ``down`` the reverse.
"""

from __future__ import annotations

import atexit
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import netns as nsu
from .profiles import LINK_PROFILES, TOPOLOGIES

__all__ = ["Lab", "LinkPlan", "Topology", "SERVER"]

#: Name of the server node in every topology.
SERVER = "server"
SERVER_ADDRESS = "10.201.0.1"
SERVER_ADDRESS6 = "fd00:201::1"

_DIRECTIONS = {"up": "ab", "down": "ba", "both": "both"}


@dataclass(frozen=True)
class LinkPlan:
    """One client's link: its name (also the client node's name) and params."""

    name: str
    index: int
    params: str

    @property
    def client_address(self) -> str:
        """The client's address on this link."""
        return f"10.201.{self.index}.2"

    @property
    def client_address6(self) -> str:
        """The client's IPv6 address on this link."""
        return f"fd00:201::{self.index}:2"

    @property
    def server_address6(self) -> str:
        """The server's IPv6 address on this link."""
        return f"fd00:201::{self.index}:1"

    @property
    def server_address(self) -> str:
        """The server's address on this link."""
        return f"10.201.{self.index}.1"


@dataclass(frozen=True)
class Topology:
    """What a lab consists of, before anything is created."""

    profile: str
    links: tuple[LinkPlan, ...]

    @property
    def nodes(self) -> list[str]:
        """The server first, then the clients."""
        return [SERVER] + [link.name for link in self.links]

    @classmethod
    def from_profile(cls, profile: str | None, params: str | None = None) -> "Topology":
        """Resolves a profile name (link or topology) plus extra parameters.

        ``params`` is appended to every link's parameters (later keys win),
        so ``("internet", "loss=0")`` is the internet profile without loss;
        ``(None, "delay=5ms")`` is a custom point-to-point link.
        """
        def merged(base: str) -> str:
            return ",".join(p for p in (base, params or "") if p)

        if profile in TOPOLOGIES:
            clients = TOPOLOGIES[profile]
            links = tuple(
                LinkPlan(name, i + 1, merged(LINK_PROFILES[p].params))
                for i, (name, p) in enumerate(clients.items())
            )
            return cls(profile, links)
        if profile is None or profile == "custom":
            return cls("custom", (LinkPlan("client", 1, merged("")),))
        if profile in LINK_PROFILES:
            return cls(profile, (LinkPlan("client", 1, merged(LINK_PROFILES[profile].params)),))
        known = ", ".join([*LINK_PROFILES, *TOPOLOGIES, "custom"])
        raise ValueError(f"unknown lab profile {profile!r} (known: {known})")

    def check(self) -> None:
        """Validates every link's parameters with the emulator's parser.

        Raises ValueError naming the link and the bad field.
        """
        Linkem = _core_linkem()
        for plan in self.links:
            try:
                Linkem.parse_params(plan.params)
            except ValueError as exc:
                raise ValueError(f"link {plan.name!r}: {exc}") from None


def _core_linkem() -> Any:
    try:
        from dmm._core import Linkem
    except ImportError as exc:  # pragma: no cover - depends on the build
        raise nsu.LabError("dmm._core.Linkem is missing: build the extension (maturin develop)") from exc
    return Linkem


class Lab:
    """Namespaces joined by emulated links, torn down on exit.

    >>> with Lab("internet") as lab:                     # doctest: +SKIP
    ...     lab.exec("client", ["ping", "-c1", lab.address("server")])

    ``profile`` is a link profile (``internet``, ``inter-dc``, ``intra-dc``,
    ``perfect``; nodes ``server`` and ``client``), a topology (``filesync``:
    nodes ``server``, ``internet``, ``inter-dc``, ``intra-dc``) or
    ``custom``/None (only ``params``). ``params`` is added to every link.
    ``realtime`` > 0 (default 10) runs the relay threads under SCHED_FIFO
    at that priority: on a busy 2-CPU machine this raised the emulator's
    ceiling from ~1.1 to ~2.8 Gbit/s and cut its p99 delay error from
    milliseconds to tens of microseconds (benches/results/linkem.md); 0
    leaves them under normal scheduling. ``device`` is ``tap`` or
    ``veth`` (see ``dmm._core.Linkem.start``). Needs root (CAP_NET_ADMIN).
    """

    def __init__(
        self,
        profile: str | None = "internet",
        params: str | None = None,
        *,
        tag: str | None = None,
        mtu: int = 1500,
        realtime: int = 10,
        device: str = "tap",
    ) -> None:
        self.topology = Topology.from_profile(profile, params)
        self.tag = tag or secrets.token_hex(3)
        if not (self.tag.isalnum() and len(self.tag) <= 8):
            raise ValueError(f"tag must be at most 8 letters or digits, got {self.tag!r}")
        self.mtu = mtu
        self.realtime = realtime
        self.device = device
        self._links: dict[str, Any] = {}
        self._netns: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._started = False

    # -- building and tearing down ------------------------------------------------

    def netns(self, node: str) -> str:
        """The ``ip netns`` name of ``node``."""
        self._check_node(node)
        return f"dmmlab-{self.tag}-{node}"

    def devices(self, link: str) -> tuple[str, str]:
        """The TAP devices of ``link``: (client side, server side)."""
        plan = self._plan(link)
        # At most 14 bytes: the veth backend appends 'r' for its own end.
        return f"lk{self.tag}{plan.index}c", f"lk{self.tag}{plan.index}s"

    def start(self) -> "Lab":
        """Creates the namespaces and links. On failure, undoes what it did."""
        if self._started:
            return self
        Linkem = _core_linkem()
        self.topology.check()
        self._started = True
        atexit.register(self.close)
        try:
            for node in self.topology.nodes:
                name = self.netns(node)
                self._netns.append(name)
                nsu.add_netns(name)
                # Devices moved in later get no link-local address, no DAD
                # and no router solicitations: the links carry only what the
                # lab's users send (plus a few MLD reports at start).
                nsu.sysctl(name, "net.ipv6.conf.default.addr_gen_mode", "1")
                nsu.sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
                nsu.sysctl(name, "net.ipv6.conf.default.router_solicitations", "0")
            server_ns = self.netns(SERVER)
            nsu.ip("addr", "add", f"{SERVER_ADDRESS}/32", "dev", "lo", netns=server_ns)
            nsu.ip("-6", "addr", "add", f"{SERVER_ADDRESS6}/128", "dev", "lo", netns=server_ns)
            for plan in self.topology.links:
                client_ns = self.netns(plan.name)
                dev_c, dev_s = self.devices(plan.name)
                self._links[plan.name] = Linkem.start(
                    dev_c, dev_s, netns_a=client_ns, netns_b=server_ns, params=plan.params, mtu=self.mtu,
                    realtime=self.realtime, device=self.device,
                )
                nsu.ip("addr", "add", f"{plan.client_address}/24", "dev", dev_c, netns=client_ns)
                nsu.ip("addr", "add", f"{plan.server_address}/24", "dev", dev_s, netns=server_ns)
                nsu.ip("route", "add", f"{SERVER_ADDRESS}/32", "via", plan.server_address, netns=client_ns)
                nsu.ip("-6", "addr", "add", f"{plan.client_address6}/112", "dev", dev_c, "nodad",
                       netns=client_ns)
                nsu.ip("-6", "addr", "add", f"{plan.server_address6}/112", "dev", dev_s, "nodad",
                       netns=server_ns)
                nsu.ip("-6", "route", "add", f"{SERVER_ADDRESS6}/128", "via", plan.server_address6,
                       netns=client_ns)
                # Static neighbours: ARP through a lossy link would make the
                # first packets' timing depend on luck.
                mac_c, mac_s = nsu.mac_address(client_ns, dev_c), nsu.mac_address(server_ns, dev_s)
                nsu.ip("neigh", "replace", plan.server_address, "lladdr", mac_s, "dev", dev_c,
                       "nud", "permanent", netns=client_ns)
                nsu.ip("neigh", "replace", plan.client_address, "lladdr", mac_c, "dev", dev_s,
                       "nud", "permanent", netns=server_ns)
                nsu.ip("-6", "neigh", "replace", plan.server_address6, "lladdr", mac_s, "dev", dev_c,
                       "nud", "permanent", netns=client_ns)
                nsu.ip("-6", "neigh", "replace", plan.client_address6, "lladdr", mac_c, "dev", dev_s,
                       "nud", "permanent", netns=server_ns)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Ends the lab's processes, stops the links, deletes the namespaces.

        Safe to call twice; keeps going past errors and raises the first.
        """
        first: BaseException | None = None
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        for link in self._links.values():
            link.stop()
        self._links.clear()
        for name in reversed(self._netns):
            try:
                nsu.delete_netns(name)
            except nsu.LabError as exc:
                first = first or exc
        self._netns.clear()
        if self._started:
            atexit.unregister(self.close)
            self._started = False
        if first:
            raise first

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- using it -------------------------------------------------------------------

    @property
    def nodes(self) -> list[str]:
        """Node names, the server first."""
        return self.topology.nodes

    @property
    def links(self) -> list[str]:
        """Link names (each is also its client's node name)."""
        return [plan.name for plan in self.topology.links]

    def address(self, node: str, family: int = 4) -> str:
        """The address of ``node`` that every other node can reach.

        ``family`` is 4 (10.201.x.x) or 6 (fd00:201::...).
        """
        self._check_node(node)
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {family!r}")
        if node == SERVER:
            return SERVER_ADDRESS if family == 4 else SERVER_ADDRESS6
        plan = self._plan(node)
        return plan.client_address if family == 4 else plan.client_address6

    def server_address(self, link: str, family: int = 4) -> str:
        """The server's own address on ``link`` (``10.201.i.1``): reachable
        from that link's client only through that link, so a destination
        prefix tells the clients' traffic apart."""
        plan = self._plan(link)
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, got {family!r}")
        return plan.server_address if family == 4 else plan.server_address6

    def exec(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Runs ``argv`` in ``node`` and waits: ``subprocess.run`` arguments apply."""
        return subprocess.run(nsu.exec_argv(self.netns(node), argv), **kwargs)

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Starts ``argv`` in ``node``; the lab kills it on close if still running."""
        proc = subprocess.Popen(nsu.exec_argv(self.netns(node), argv), **kwargs)
        self._procs.append(proc)
        return proc

    def set_params(self, link: str, params: str, direction: str = "both", *, replace: bool = False) -> None:
        """Changes the parameters of ``link`` (compact form) while it runs.

        ``direction`` is ``up`` (client to server), ``down`` or ``both``. The
        keys given are applied on top of the current values; with
        ``replace=True`` the others go back to their defaults.
        """
        if direction not in _DIRECTIONS:
            raise ValueError(f"direction must be up, down or both, got {direction!r}")
        self._link(link).set_params(_DIRECTIONS[direction], params, replace=replace)

    def params(self, link: str) -> dict[str, str]:
        """The parameters in force on ``link``: ``{"up": ..., "down": ...}``."""
        lk = self._link(link)
        return {"up": lk.params("ab"), "down": lk.params("ba")}

    def stats(self) -> dict[str, dict[str, dict[str, float]]]:
        """Counters per link and direction: ``{link: {"up": {...}, "down": {...}}}``."""
        out = {}
        for name, lk in self._links.items():
            s = lk.stats()
            out[name] = {"up": s["ab"], "down": s["ba"]}
        return out

    def device_drops(self) -> dict[str, dict[str, int]]:
        """Frames the kernel dropped at each link's devices, before the relay.

        ``{link: {"client": n, "server": n}}``: the device's rx/tx drop
        counters plus its qdisc's drops. The relay's own counters
        (:meth:`stats`) cannot see these: a relay too slow to drain a TAP
        device shows up here, not there. Counters are cumulative.
        """
        out = {}
        for plan in self.topology.links:
            sides = zip(("client", "server"), (plan.name, SERVER), self.devices(plan.name))
            out[plan.name] = {side: nsu.device_drops(self.netns(node), dev) for side, node, dev in sides}
        return out

    def reset_stats(self) -> None:
        """Zeroes every link's counters."""
        for lk in self._links.values():
            lk.reset_stats()

    def describe(self) -> dict[str, Any]:
        """What was built: for the CLI's state file and ``lab status``."""
        return {
            "profile": self.topology.profile,
            "tag": self.tag,
            "nodes": {n: {"netns": self.netns(n), "address": self.address(n), "address6": self.address(n, 6)}
                      for n in self.nodes},
            "links": {p.name: {"params": p.params, "devices": list(self.devices(p.name))}
                      for p in self.topology.links},
        }

    # -- helpers --------------------------------------------------------------------

    def _check_node(self, node: str) -> None:
        if node not in self.topology.nodes:
            raise KeyError(f"no node {node!r} in this lab (nodes: {', '.join(self.topology.nodes)})")

    def _plan(self, link: str) -> LinkPlan:
        for plan in self.topology.links:
            if plan.name == link:
                return plan
        raise KeyError(f"no link {link!r} in this lab (links: {', '.join(self.links)})")

    def _link(self, link: str) -> Any:
        self._plan(link)
        if link not in self._links:
            raise nsu.LabError("the lab is not running")
        return self._links[link]
