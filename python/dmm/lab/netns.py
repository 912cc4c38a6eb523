"""Thin wrappers over iproute2 for the namespaces and devices of a lab.

Everything goes through the ``ip`` command (and ``ip netns exec``) so that
what the lab does can be repeated by hand. Errors carry ip's own message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Sequence

__all__ = [
    "LabError",
    "add_netns",
    "delete_netns",
    "device_drops",
    "exec_argv",
    "ip",
    "kill_netns_pids",
    "list_netns",
    "mac_address",
    "route_congctl",
    "sysctl",
]


class LabError(RuntimeError):
    """A lab could not be built, used or torn down."""


def ip(*args: str, netns: str | None = None) -> str:
    """Runs ``ip [-n NETNS] ARGS...`` and returns its output.

    Raises :class:`LabError` with ip's message when it fails.
    """
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise LabError("the 'ip' command (iproute2) is not installed") from exc
    if done.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def exec_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` inside ``netns``."""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a sequence of arguments, not a string")
    return ["ip", "netns", "exec", netns, *map(str, argv)]


def list_netns() -> list[str]:
    """Names of the namespaces ``ip netns`` knows."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def add_netns(name: str) -> None:
    """Creates namespace ``name`` with its loopback up."""
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", netns=name)


def sysctl(netns: str, key: str, value: str) -> None:
    """Sets one sysctl inside ``netns``."""
    argv = exec_argv(netns, ["sysctl", "-qw", f"{key}={value}"])
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise LabError(f"sysctl {key}={value} in {netns}: {done.stderr.strip()}")


def mac_address(netns: str, dev: str) -> str:
    """The MAC address of ``dev`` in ``netns``."""
    fields = ip("-br", "link", "show", "dev", dev, netns=netns).split()
    if len(fields) < 3:
        raise LabError(f"no MAC address for {dev} in {netns}")
    return fields[2]


def device_drops(netns: str, dev: str) -> int:
    """Frames dropped at ``dev`` in ``netns``: rx + tx drops plus its qdisc's."""
    link = json.loads(ip("-s", "-j", "link", "show", "dev", dev, netns=netns))[0]["stats64"]
    total = link["rx"]["dropped"] + link["tx"]["dropped"]
    argv = ["tc", "-n", netns, "-s", "-j", "qdisc", "show", "dev", dev]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode == 0 and done.stdout.strip():
        total += sum(q.get("drops", 0) for q in json.loads(done.stdout))
    return total


def route_congctl(netns: str, algo: str) -> None:
    """Makes kernel TCP in ``netns`` use congestion control ``algo`` on every
    IPv4 route of the main table (``ip route ... congctl``).

    The per-namespace default (``net.ipv4.tcp_congestion_control``) cannot
    be set to a restricted algorithm such as cubic here (EPERM); a route
    attribute can, and wins over the default for connections it carries.
    """
    for r in json.loads(ip("-j", "-4", "route", "show", netns=netns)):
        argv = ["route", "change", r["dst"]]
        if "gateway" in r:
            argv += ["via", r["gateway"]]
        argv += ["dev", r["dev"]]
        if "prefsrc" in r:
            argv += ["src", r["prefsrc"]]
        ip(*argv, "congctl", algo, netns=netns)


def kill_netns_pids(netns: str, grace: float = 2.0) -> None:
    """Ends the processes still running in ``netns``: SIGTERM, then SIGKILL."""
    def pids() -> list[int]:
        try:
            return [int(p) for p in ip("netns", "pids", netns).split()]
        except LabError:
            return []

    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = pids()
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pids():
            time.sleep(0.05)


def delete_netns(name: str) -> None:
    """Ends what runs in namespace ``name`` and deletes it (no error if gone)."""
    if name not in list_netns():
        return
    kill_netns_pids(name)
    ip("netns", "delete", name)
