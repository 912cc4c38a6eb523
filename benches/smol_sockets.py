"""dmm on smoltcp against dmm on the kernel, between two namespaces.

Topology, built by this script (root needed) and removed at the end::

    this namespace                              namespace "peer"
    dmm client --kernel TCP-- veth 10.79.N.1 ===== veth 10.79.N.2  server
    dmm client --smoltcp----- TAP (smoltcp .2) ===== TAP 10.77.N.1  server

The server is plain CPython in the peer namespace. The client is a fresh
process per sample using ``dmm.socket`` with a config naming one kernel
instance and one smoltcp instance, and a route that sends 10.77.N.0/24 to
smoltcp; so the only difference between the contenders is the stack the
client's socket is on (and the link it takes: a veth for the kernel, the
TAP for smoltcp). Each client process creates its own TAP device and moves
its host side into the peer namespace.

Tests:

* ``bulk``: one connection, ``--bulk-mib`` MiB with ``sendall`` of 256 KiB,
  client to server; Gbit/s measured at the client until the server's
  one-byte acknowledgement of the last byte.
* ``download``: the same amount server to client, measured at the client
  until its last byte arrived (the direction where the kernel hands the
  TAP merged super-frames).
* ``pingpong``: 1-byte request and reply, round trips per second.

Rounds interleave the contenders; medians and the ratio smoltcp/kernel go to
``benches/results/smoltcp.md`` and ``smoltcp.json``. CPU time of the client
process (user + system, all threads) per GB is reported beside throughput.

    python benches/smol_sockets.py [--rounds 5] [--bulk-mib 512] [--pings 20000] [--peer-cc cubic]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from publish import publish

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

N = 91
PEER_NS = f"dmmbench{os.getpid()}"
VETH = f"dmmbv{os.getpid() % 10000}"
KERNEL_SERVER = f"10.79.{N}.2"
SMOL_SERVER = f"10.77.{N}.1"
PORT = 5201
#: smoltcp contenders: (MTU, per-socket buffer). Jumbo frames are what a
#: TAP link between namespaces can carry; the kernel's veth uses 64 KiB TSO
#: segments whatever its MTU, which is most of the bulk gap at 1500.
#: The first contender is the default config: MTU 1500 with the TAP's
#: segmentation and checksum offloads; "-nooffload" is the same without
#: them (a read/write per 1,500-byte frame).
SMOL = {
    "smoltcp": (1500, 262144, True),
    "smoltcp-nooffload": (1500, 262144, False),
    "smoltcp-1m": (1500, 1 << 20, True),
    "smoltcp-9000": (9000, 1 << 20, False),
    "smoltcp-64k": (65521, 4 << 20, False),
}
CONTENDERS = ("kernel", *SMOL)
TESTS = ("bulk", "download", "pingpong")
#: The server's congestion control ("-": the system's default).
PEER_CC = "-"

SERVER = r"""
import socket, sys
test = sys.argv[1]
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[2])))
srv.listen(4)
print("ready", flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
if sys.argv[4] != "-":
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[4].encode())
if test == "bulk":
    buf = bytearray(1 << 20)
    want = int(sys.argv[3])
    got = 0
    while got < want:
        n = conn.recv_into(buf)
        if not n:
            break
        got += n
    conn.sendall(b"k")
elif test == "download":
    block = memoryview(bytes(range(256)) * 1024)
    sent, want = 0, int(sys.argv[3])
    while sent < want:
        conn.sendall(block)
        sent += len(block)
    conn.close()
else:
    while True:
        b = conn.recv(1)
        if not b:
            break
        conn.sendall(b)
"""

CLIENT = r"""
import json, mmap, os, subprocess, sys, time, resource
import dmm.runtime, dmm.socket as socket
from dmm import config
test, toml, host, port, amount, device, peer_ns, n = sys.argv[1:9]
dmm.runtime.configure(config.parse(toml, "<bench>"))
if device != "-":
    ip = lambda *a: subprocess.run(["ip", *a], check=True)
    ip("link", "set", "dev", device, "netns", peer_ns)
    ip("-n", peer_ns, "addr", "add", f"10.77.{n}.1/24", "dev", device)
    ip("-n", peer_ns, "link", "set", "dev", device, "up")
c = socket.create_connection((host, int(port)), timeout=60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
amount = int(amount)
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
if test == "bulk":
    buf = mmap.mmap(-1, 256 * 1024)
    buf.write(bytes(range(256)) * 1024)
    view = memoryview(buf)
    sent = 0
    while sent < amount:
        c.sendall(view)
        sent += len(view)
    assert c.recv(1) == b"k"
elif test == "download":
    buf = bytearray(1 << 20)
    got = 0
    while got < amount:
        n = c.recv_into(buf)
        if not n:
            raise SystemExit(f"EOF after {got} of {amount} bytes")
        got += n
else:
    one = b"x"
    for _ in range(amount):
        c.sendall(one)
        if c.recv(1) != one:
            raise SystemExit("bad echo")
elapsed = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(json.dumps({"stack": c.dmm_stack, "elapsed": elapsed, "cpu": cpu}), flush=True)
c.close()
"""


def config(device: str, mtu: int = 1500, buffer: int = 262144, offload: bool = True) -> str:
    return textwrap.dedent(f"""
        [[stack]]
        name = "kernel"
        kind = "kernel"

        [[stack]]
        name = "lan0"
        kind = "smoltcp"
        device = "tap:{device}"
        address = "10.77.{N}.2/24"
        mtu = {mtu}
        buffer_size = {buffer}
        offload = {"true" if offload else "false"}

        [[route]]
        to = "10.77.{N}.0/24"
        stacks = ["lan0"]
    """)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def setup() -> None:
    ip("netns", "add", PEER_NS)
    ip("-n", PEER_NS, "link", "set", "lo", "up")
    ip("link", "add", VETH, "type", "veth", "peer", "name", VETH + "p", "netns", PEER_NS)
    ip("addr", "add", f"10.79.{N}.1/24", "dev", VETH)
    ip("link", "set", VETH, "up")
    ip("-n", PEER_NS, "addr", "add", f"{KERNEL_SERVER}/24", "dev", VETH + "p")
    ip("-n", PEER_NS, "link", "set", VETH + "p", "up")


def teardown() -> None:
    subprocess.run(["ip", "link", "del", VETH], capture_output=True)
    subprocess.run(["ip", "netns", "pids", PEER_NS], capture_output=True)
    subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)


def sample(contender: str, test: str, amount: int, round_no: int) -> dict:
    port = PORT + round_no * 24 + TESTS.index(test) * 8 + CONTENDERS.index(contender)
    server = subprocess.Popen(["ip", "netns", "exec", PEER_NS, sys.executable, "-c", SERVER, test, str(port),
                               str(amount), PEER_CC], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        smol = contender in SMOL
        device = f"dmmbt{round_no}{test[0]}{CONTENDERS.index(contender)}" if smol else "-"
        host = SMOL_SERVER if smol else KERNEL_SERVER
        toml = config(device, *SMOL[contender]) if smol else config("dmmbunused")
        done = subprocess.run([sys.executable, "-c", CLIENT, test, toml,
                               host, str(port), str(amount), device, PEER_NS, str(N)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{contender} {test} client failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        want = "lan0" if smol else "kernel"
        if result["stack"] != want:
            raise RuntimeError(f"{contender}: the socket was on {result['stack']}, not {want}")
        return result
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:  # the client failed before connecting
            server.kill()
            server.wait()


def main() -> int:
    global CONTENDERS, PEER_CC
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bulk-mib", type=int, default=512)
    p.add_argument("--pings", type=int, default=20000)
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated subset of: " + ", ".join(CONTENDERS) + " (kernel always runs)")
    p.add_argument("--peer-cc", default="-",
                   help="the server's congestion control (TCP_CONGESTION), e.g. cubic; results then go to"
                        " smoltcp-peer-<cc>.md")
    args = p.parse_args()
    PEER_CC = args.peer_cc
    CONTENDERS = tuple(c for c in CONTENDERS if c == "kernel" or c in args.contenders.split(","))
    if os.geteuid() != 0:
        raise SystemExit("needs root: it creates a namespace, a veth pair and TAP devices")
    teardown()
    setup()
    bulk_bytes = args.bulk_mib << 20
    runs: dict = {(c, t): [] for c in CONTENDERS for t in TESTS}
    try:
        for r in range(args.rounds):
            for test in TESTS:
                amount = args.pings if test == "pingpong" else bulk_bytes
                order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
                for contender in order:
                    res = sample(contender, test, amount, r)
                    if test != "pingpong":
                        value = amount * 8 / res["elapsed"] / 1e9
                        cpu = res["cpu"] / (amount / 1e9)
                    else:
                        value = amount / res["elapsed"]
                        cpu = res["cpu"] / amount * 1e6
                    runs[(contender, test)].append((value, cpu))
                    print(f"round {r + 1}/{args.rounds} {test:<8} {contender:<8} {value:12.2f}"
                          f" {'rt/s' if test == 'pingpong' else 'Gbit/s'}", file=sys.stderr, flush=True)
    finally:
        teardown()

    def med(c, t, i=0):
        return statistics.median(v[i] for v in runs[(c, t)])

    def cell(c, t, fmt):
        """Median and (min-max) of the throughput or round-trip rate."""
        vals = [v[0] for v in runs[(c, t)]]
        return f"{fmt.format(med(c, t))} ({fmt.format(min(vals))}-{fmt.format(max(vals))})"

    out = {"rounds": args.rounds, "bulk_mib": args.bulk_mib, "pings": args.pings, "samples": {
        f"{c}/{t}": runs[(c, t)] for (c, t) in runs}}
    lines = [
        "# dmm on smoltcp vs dmm on the kernel, between two namespaces",
        "",
        f"`python benches/smol_sockets.py --rounds {args.rounds} --bulk-mib {args.bulk_mib} --pings {args.pings}"
        + ("" if PEER_CC == "-" else f" --peer-cc {PEER_CC}") + "`;"
        " fresh client and server processes per sample, contenders interleaved (order reversed every other round),"
        " median (min-max).",
        "Kernel path: veth (MTU 1500, TSO); smoltcp path: TAP at the MTU named, per-socket buffer as named."
        " Client CPU is the client process's user+system time, all threads (the smoltcp driver thread included).",
        "Server congestion control: " + (f"`{PEER_CC}` (TCP_CONGESTION on its socket)" if PEER_CC != "-" else
                                         "the system's default (" + Path("/proc/sys/net/ipv4/tcp_congestion_control")
                                         .read_text().strip() + ")") + "; the client's is the system's default.",
        f"Machine: 2 vCPUs shared with other work (load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| contender | bulk Gbit/s | bulk / kernel | client CPU s/GB | download Gbit/s | download / kernel"
        " | client CPU s/GB | ping-pong rt/s | ping-pong / kernel | client CPU us/rt |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kb, kd, kp = med("kernel", "bulk"), med("kernel", "download"), med("kernel", "pingpong")
    out["ratios"] = {}
    for c in CONTENDERS:
        b, d, pp = med(c, "bulk"), med(c, "download"), med(c, "pingpong")
        off = ", offloads" if c != "kernel" and SMOL[c][2] else ""
        label = c if c == "kernel" else f"{c} (MTU {SMOL[c][0]}{off}, buffer {SMOL[c][1] >> 10} KiB)"
        lines.append(f"| {label} | {cell(c, 'bulk', '{:.2f}')} | {b / kb:.2f} | {med(c, 'bulk', 1):.2f}"
                     f" | {cell(c, 'download', '{:.2f}')} | {d / kd:.2f} | {med(c, 'download', 1):.2f}"
                     f" | {cell(c, 'pingpong', '{:,.0f}')} | {pp / kp:.2f} | {med(c, 'pingpong', 1):.1f} |")
        out["ratios"][c] = {"bulk": b / kb, "download": d / kd, "pingpong": pp / kp}
    lines += ["", "Targets (issue 19): smoltcp at MTU 1500 (the default config) >= 0.5x the kernel's bulk rate;"
              " ping-pong >= 0.85x the kernel's."]
    publish("smoltcp" if PEER_CC == "-" else f"smoltcp-peer-{PEER_CC}", lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
