"""Many idle smoltcp connections in one process, through ``dmm.socket``.

Topology as in ``smol_sockets.py``: this process runs a smoltcp instance
whose TAP's host side is moved into a namespace ("peer"), where kernel TCP
runs the other ends. Two cases, each with ``--n`` connections:

* ``connect``: this process opens N connections to a kernel listener in the
  namespace, which accepts and holds them;
* ``accept``: kernel clients in the namespace open N connections to a
  ``dmm.socket`` listener on smoltcp here, which accepts and holds them.

After every connection carried one byte each way, all stay idle for
``--settle`` seconds. Per connection, on this (the smoltcp) side: growth of
fds (``/proc/self/fd``), of RSS (``VmRSS``: touched memory, socket buffers
only as far as data went through them), of virtual size (``VmSize``: the
socket buffers smoltcp allocates whole), the process's CPU time while idle
(share of one core: the driver's timer turns) and the time to open them.
Then one byte each way on every connection again, so a lost one fails the
run. Writes ``benches/results/smol_scale.md`` and ``.json``. Needs root.

    python benches/smol_scale.py [--n 1000] [--settle 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from publish import publish

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

N_SUBNET = 93
PEER_NS = f"dmmscale{os.getpid()}"
DEVICE = f"dmmsc{os.getpid() % 10000}"
PEER = f"10.77.{N_SUBNET}.1"
ME = f"10.77.{N_SUBNET}.2"
PORT = 5301

#: Kernel side in the namespace: a listener that accepts N and echoes one
#: byte per connection per round (``serve``), or N clients that connect to
#: us and echo likewise (``connect``). Prints "ready" when listening and
#: "done" after each round.
PEER_CODE = r"""
import selectors, socket, sys
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conns = []
if mode == "serve":
    srv = socket.create_server((host, port), backlog=n)
    print("ready", flush=True)
    while len(conns) < n:
        conns.append(srv.accept()[0])
else:
    print("ready", flush=True)
    for _ in range(n):
        conns.append(socket.create_connection((host, port), timeout=30))
sel = selectors.DefaultSelector()
for c in conns:
    sel.register(c, selectors.EVENT_READ)
for line in sys.stdin:
    left = set(conns)
    while left:
        for key, _ in sel.select(30):
            c = key.fileobj
            if c in left and c.recv(1) == b"x":
                c.sendall(b"y")
                left.discard(c)
    print("done", flush=True)
"""


def config(device: str) -> str:
    return textwrap.dedent(f"""
        [[stack]]
        name = "lan0"
        kind = "smoltcp"
        device = "tap:{device}"
        address = "{ME}/24"

        [[route]]
        to = "10.77.{N_SUBNET}.0/24"
        stacks = ["lan0"]

        [listen]
        stacks = ["lan0"]
    """)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def status(field: str) -> int:
    """A ``/proc/self/status`` size, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def snapshot() -> dict:
    return {"fds": fds(), "rss": status("VmRSS"), "vm": status("VmSize"), "cpu": cpu(), "t": time.monotonic()}


def ping_all(socks, peer) -> None:
    """One byte each way on every connection."""
    for s in socks:
        s.sendall(b"x")
    peer.stdin.write("go\n")
    peer.stdin.flush()
    for s in socks:
        if s.recv(1) != b"y":
            raise SystemExit("a connection lost its echo")
    if peer.stdout.readline().strip() != "done":
        raise SystemExit("the peer did not finish its round")


def run_case(case: str, n: int, settle: float) -> dict:
    import dmm.socket as dsocket

    if case == "connect":
        peer_args = ["serve", PEER, str(PORT), str(n)]
    else:
        peer_args = ["connect", ME, str(PORT + 1), str(n)]
    listener = None
    if case == "accept":
        listener = dsocket.socket()
        listener.bind(("0.0.0.0", PORT + 1))
        listener.listen(n)
        assert listener.dmm_stack == "lan0"
    peer = subprocess.Popen(["ip", "netns", "exec", PEER_NS, sys.executable, "-c", PEER_CODE, *peer_args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().strip() == "ready"
        before = snapshot()
        socks = []
        if case == "connect":
            for _ in range(n):
                s = dsocket.create_connection((PEER, PORT), timeout=30)
                assert s.dmm_stack == "lan0"
                socks.append(s)
        else:
            listener.settimeout(30)
            while len(socks) < n:
                socks.append(listener.accept()[0])
        opened = snapshot()
        ping_all(socks, peer)
        time.sleep(settle)
        idle = snapshot()
        ping_all(socks, peer)
        idle_cpu = (idle["cpu"] - opened["cpu"]) / (idle["t"] - opened["t"])
        for s in socks:
            s.close()
        return {
            "case": case, "n": n,
            "open_s": opened["t"] - before["t"],
            "fds_per_conn": (idle["fds"] - before["fds"]) / n,
            "rss_per_conn": (idle["rss"] - before["rss"]) / n,
            "vm_per_conn": (idle["vm"] - before["vm"]) / n,
            "idle_cpu": idle_cpu,
        }
    finally:
        peer.kill()
        peer.wait()
        if listener is not None:
            listener.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--settle", type=float, default=7.0)
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates a namespace and a TAP device")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import dmm.runtime
    from dmm import config as dconfig

    subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)
    ip("netns", "add", PEER_NS)
    results = []
    try:
        ip("-n", PEER_NS, "link", "set", "lo", "up")
        dmm.runtime.configure(dconfig.parse(config(DEVICE), "<bench>"))
        # configure() opened the instance, which created the TAP; its host
        # side moves into the namespace.
        ip("link", "set", "dev", DEVICE, "netns", PEER_NS)
        ip("-n", PEER_NS, "addr", "add", f"{PEER}/24", "dev", DEVICE)
        ip("-n", PEER_NS, "link", "set", "dev", DEVICE, "up")
        for case in ("connect", "accept"):
            res = run_case(case, args.n, args.settle)
            results.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    finally:
        subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)

    lines = [
        "# Idle smoltcp connections in one process, through dmm.socket",
        "",
        f"`python benches/smol_scale.py --n {args.n} --settle {args.settle:g}`; smoltcp over a TAP at MTU 1500"
        " (default config, 256 KiB buffers per direction), the kernel ends in a namespace.",
        "Per connection, on the smoltcp side; after one byte each way, idle for the settle time;"
        " every connection answered again at the end.",
        f"Machine: 2 vCPUs shared with other work (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| case | N | open s | fds per connection | RSS per connection, B | virtual per connection, B | idle CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['case']} | {r['n']} | {r['open_s']:.2f} | {r['fds_per_conn']:.2f} |"
                     f" {r['rss_per_conn']:,.0f} | {r['vm_per_conn']:,.0f} | {r['idle_cpu']:.1%} |")
    publish("smol_scale", lines, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
