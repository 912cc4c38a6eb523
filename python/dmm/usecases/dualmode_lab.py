"""Use case 2 of DESIGN.md section 7: one web server, two stacks, one socket.

An unmodified ``http.server`` runs under ``dmm run`` in a ``server``
namespace with one listening socket that spans the kernel and a smoltcp
instance. The smoltcp instance owns a TAP device whose other end is handed
to a ``lan`` namespace; a ``wan`` namespace reaches the server's kernel over
a veth pair. Accept rules admit LAN clients (10.77.x.0/24) on smoltcp only
and everyone else on the kernel. Clients in both namespaces fetch a page
with ``urllib``; the server's ``--stats`` file shows which stack accepted
what. Needs root.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from dmm.lab import netns

__all__ = ["config_toml", "run"]

_ids = itertools.count()

#: Fetches ``url`` ``count`` times; prints status, body size and each
#: request's seconds as JSON.
FETCH = r"""
import json, sys, time, urllib.request
url, count = sys.argv[1], int(sys.argv[2])
times, status, size = [], None, 0
for _ in range(count):
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=20) as r:
        body = r.read()
    times.append(time.perf_counter() - t)
    status, size = r.status, len(body)
print(json.dumps({"status": status, "bytes": size, "seconds": times}), flush=True)
"""


def config_toml(device: str, n: int) -> str:
    """The server's config: kernel + smoltcp on ``device`` (10.77.n.2/24),
    one listening socket on both, LAN clients admitted on smoltcp only."""
    return f"""
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "lan0"
kind = "smoltcp"
device = "tap:{device}"
address = "10.77.{n}.2/24"

[listen]
stacks = ["kernel", "lan0"]

[[route]]
role = "accept"
to = "10.77.{n}.0/24"
stacks = ["lan0"]

[[route]]
role = "accept"
to = "0.0.0.0/0"
stacks = ["kernel"]
"""


def _unique(prefix: str) -> str:
    return f"{prefix}{os.getpid() % 1000}x{next(_ids)}"


def _wait_for_device(server: subprocess.Popen, ns: str, device: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            netns.ip("link", "show", "dev", device, netns=ns)
            return
        except netns.LabError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.communicate()[1][-2000:]}") from None
            if time.monotonic() > deadline:
                raise RuntimeError("the smoltcp instance did not create its TAP device") from None
            time.sleep(0.05)


def _fetch(ns: str, url: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        done = subprocess.run(netns.exec_argv(ns, [sys.executable, "-c", FETCH, url, str(count)]),
                              capture_output=True, text=True, timeout=120)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        if time.monotonic() > deadline:
            return {"status": None, "error": done.stderr.strip()[-2000:]}
        time.sleep(0.2)  # the server may still be starting


def _stop(server: subprocess.Popen) -> str:
    # SIGINT, as Ctrl-C would; SIGTERM if it is still up (both write --stats).
    for sig in (signal.SIGINT, signal.SIGTERM):
        server.send_signal(sig)
        try:
            return server.communicate(timeout=15)[1]
        except subprocess.TimeoutExpired:
            continue
    server.kill()
    return server.communicate()[1]


def run(workdir: Path, requests: int = 5, page_bytes: int = 10_000,
        progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Runs the use case; returns each client's fetch results, the server's
    per-stack counters (``stats``) and the addresses used."""
    say = progress or (lambda text: None)
    n = os.getpid() % 200 + 20
    device, veth = _unique("dmmh"), _unique("dmmv")
    srv_ns, lan_ns, wan_ns = _unique("dmmsrv"), _unique("dmmlan"), _unique("dmmwan")
    for ns in (srv_ns, lan_ns, wan_ns):
        netns.add_netns(ns)
    server = None
    out: dict[str, Any] = {"lan_url": f"http://10.77.{n}.2:8080/index.html",
                           "wan_url": f"http://10.78.{n}.1:8080/index.html"}
    stats = workdir / "stats.json"
    try:
        # The WAN client reaches the server's kernel over a veth pair.
        netns.ip("link", "add", veth, "netns", srv_ns, "type", "veth", "peer", "name", veth + "p", "netns", wan_ns)
        netns.ip("addr", "add", f"10.78.{n}.1/24", "dev", veth, netns=srv_ns)
        netns.ip("link", "set", veth, "up", netns=srv_ns)
        netns.ip("addr", "add", f"10.78.{n}.2/24", "dev", veth + "p", netns=wan_ns)
        netns.ip("link", "set", veth + "p", "up", netns=wan_ns)
        www = workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_bytes(b"dual mode\n" * (page_bytes // 10))
        config = workdir / "dmm.toml"
        config.write_text(config_toml(device, n))
        out["config"] = config.read_text()
        say("server: python -m http.server under dmm run, one socket on kernel + smoltcp")
        server = subprocess.Popen(
            netns.exec_argv(srv_ns, [sys.executable, "-m", "dmm", "--config", str(config), "run", "--stats",
                                     str(stats), "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory",
                                     str(www)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The smoltcp instance made its TAP in the server's namespace: hand
        # the host side to the LAN namespace.
        _wait_for_device(server, srv_ns, device)
        netns.ip("link", "set", "dev", device, "netns", lan_ns, netns=srv_ns)
        netns.ip("addr", "add", f"10.77.{n}.1/24", "dev", device, netns=lan_ns)
        netns.ip("link", "set", "dev", device, "up", netns=lan_ns)
        say(f"lan client: {requests} x GET {out['lan_url']}")
        out["lan"] = _fetch(lan_ns, out["lan_url"], requests)
        say(f"wan client: {requests} x GET {out['wan_url']}")
        out["wan"] = _fetch(wan_ns, out["wan_url"], requests)
    finally:
        out["server_stderr"] = _stop(server) if server is not None else ""
        for ns in (srv_ns, lan_ns, wan_ns):
            netns.delete_netns(ns)
    out["stats"] = json.loads(stats.read_text()) if stats.exists() else None
    return out
