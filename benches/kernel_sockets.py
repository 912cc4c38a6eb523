"""dmm's kernel route against the stdlib socket module, side by side.

Each contender runs both ends of every test with the same socket module:

* ``stdlib``     -- ``import socket``
* ``dmm``        -- ``import dmm.socket`` on the built-in config (kernel, syscalls)
* ``dmm-uring``  -- ``import dmm.socket`` with a kernel instance ``io = "uring"``
* ``dmm-fillp``  -- ``import dmm.socket`` routed to a FillP instance (UDP)
* ``dmm-routed`` -- ``import dmm.socket`` with a kernel and a FillP instance
  and the adaptive policy, path knowledge off: every socket is routed (the
  table and the policy decide; connections go to the kernel, since loopback
  is a clean path): the cost of routing
* ``dmm-adaptive`` -- the same with path knowledge on: closing connections
  leave path samples (``TCP_INFO``, written to an L-RD store by the RD
  thread): ``adaptive/routed`` is the cost of path knowledge

Tests, over loopback between two processes:

* ``bulk``: one connection, 1 GiB (``--bulk-mib``) sent with ``sendall`` in
  256 KiB chunks, received with ``recv_into``; Gbit/s.
* ``pingpong``: 1-byte request, 1-byte reply, round trips per second.
* ``connect``: connect + accept + close, connections per second. A
  connect takes ~35 us here and this VM's speed drifts by up to 30% within
  seconds, more than the few percent between contenders; so each round keeps
  one client and one server process per contender alive and alternates short
  bursts (``--connections`` connects, a tenth of that for FillP) between the
  contenders ``--bursts`` times. Every burst of a contender is paired with the
  stdlib's burst next to it: the median of those ratios is the figure.

Every sample runs both ends in fresh processes; rounds interleave the
contenders so machine noise hits all of them alike; the median of the rounds
is reported, with ratios to the stdlib. Results go
to ``benches/results/kernel.md`` and ``kernel.json``.

    python benches/kernel_sockets.py [--rounds 5] [--bulk-mib 1024]

``DMM_BENCH_FILLP_CLIENT_PORT=shared`` runs the FillP contender with its
client connections on one shared UDP socket (FillP's ``client_port``).
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from publish import publish

HERE = Path(__file__).resolve().parent
CONTENDERS = ("stdlib", "dmm", "dmm-uring", "dmm-fillp", "dmm-routed", "dmm-adaptive")
CHUNK = 256 * 1024
URING_TOML = '[[stack]]\nname = "kernel"\nkind = "kernel"\nio = "uring"\n'
FILLP_TOML = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"

[[route]]
to = "127.0.0.0/8"
stacks = ["wan"]

[listen]
stacks = ["wan"]
"""
ADAPTIVE_TOML = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"

[adaptive]
"""
ROUTED_TOML = ADAPTIVE_TOML + "\n[paths]\nenabled = false\n"


def load_module(contender: str):
    if contender == "stdlib":
        import socket

        return socket
    import dmm.runtime
    import dmm.socket
    from dmm import config

    if contender in ("dmm-routed", "dmm-adaptive"):
        # A store of its own per process, so no run sees another's samples.
        os.environ["DMM_RD_DIR"] = tempfile.mkdtemp(prefix="dmm-bench-lrd-")
    fillp = FILLP_TOML
    if os.environ.get("DMM_BENCH_FILLP_CLIENT_PORT"):
        # FillP's client_port ("shared" or "per-connection", the default).
        fillp = fillp.replace('kind = "fillp"', f'kind = "fillp"\nclient_port = "{os.environ["DMM_BENCH_FILLP_CLIENT_PORT"]}"')
    toml = {"dmm-uring": URING_TOML, "dmm-fillp": fillp, "dmm-routed": ROUTED_TOML,
            "dmm-adaptive": ADAPTIVE_TOML}.get(contender, config.DEFAULT_TOML)
    dmm.runtime.configure(config.parse(toml, f"<{contender}>"))
    return dmm.socket


def page_buffer(size: int) -> mmap.mmap:
    """A buffer from its own anonymous mapping.

    With bytes or bytearray, where a 256 KiB buffer lands depends on glibc's
    dynamic mmap threshold, i.e. on what the process allocated and freed
    before (importing more modules moves it); that alone changed loopback
    bulk throughput by up to 1.8x between otherwise identical runs. A mapping
    of its own puts every contender on the same footing.
    """
    return mmap.mmap(-1, size)


# -- the child process: the passive end of each test ------------------------------


def child(contender: str, test: str, port_file: str) -> None:
    sk = load_module(contender)
    srv = sk.socket(sk.AF_INET, sk.SOCK_STREAM)
    srv.setsockopt(sk.SOL_SOCKET, sk.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    Path(port_file).write_text(str(srv.getsockname()[1]))
    if test == "bulk":
        conn, _ = srv.accept()
        buf = page_buffer(CHUNK)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        conn.sendall(total.to_bytes(8, "big"))
        conn.close()
    elif test == "pingpong":
        conn, _ = srv.accept()
        conn.setsockopt(sk.IPPROTO_TCP, sk.TCP_NODELAY, 1)
        while True:
            b = conn.recv(1)
            if not b:
                break
            conn.send(b)
        conn.close()
    elif test == "connect":
        # Accepts until the bench ends it (it runs every burst of a round).
        while True:
            conn, _ = srv.accept()
            conn.close()
    srv.close()


def start_child(contender: str, test: str, env: dict) -> tuple[subprocess.Popen, int]:
    fd, port_file = tempfile.mkstemp()
    os.close(fd)
    os.unlink(port_file)
    proc = subprocess.Popen([sys.executable, __file__, "--child", contender, test, port_file], env=env)
    deadline = time.monotonic() + 20
    while not os.path.exists(port_file) or not Path(port_file).read_text():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{contender} {test} server did not start")
        time.sleep(0.005)
    time.sleep(0.01)
    port = int(Path(port_file).read_text())
    os.unlink(port_file)
    return proc, port


# -- the active end -----------------------------------------------------------------


def bulk(sk, port: int, mib: int) -> float:
    payload = page_buffer(CHUNK)
    payload[:] = os.urandom(CHUNK)
    total = mib * 1024 * 1024
    s = sk.create_connection(("127.0.0.1", port))
    start = time.perf_counter()
    sent = 0
    while sent < total:
        s.sendall(payload)
        sent += CHUNK
    s.shutdown(sk.SHUT_WR)
    ack = b""
    while len(ack) < 8:
        ack += s.recv(8 - len(ack))
    elapsed = time.perf_counter() - start
    s.close()
    assert int.from_bytes(ack, "big") == total
    return total * 8 / elapsed / 1e9


def pingpong(sk, port: int, count: int) -> float:
    s = sk.create_connection(("127.0.0.1", port))
    s.setsockopt(sk.IPPROTO_TCP, sk.TCP_NODELAY, 1)
    for _ in range(200):  # warm up
        s.send(b"x")
        s.recv(1)
    start = time.perf_counter()
    send, recv = s.send, s.recv
    for _ in range(count):
        send(b"x")
        recv(1)
    elapsed = time.perf_counter() - start
    s.close()
    return count / elapsed


def connect_rate(sk, port: int, count: int) -> float:
    import struct

    linger = struct.pack("ii", 1, 0)  # RST on close: no TIME_WAIT pile-up, same for all
    start = time.perf_counter()
    for _ in range(count):
        s = sk.socket(sk.AF_INET, sk.SOCK_STREAM)
        s.setsockopt(sk.SOL_SOCKET, sk.SO_LINGER, linger)
        s.connect(("127.0.0.1", port))
        s.close()
    return count / (time.perf_counter() - start)


def connect_client(contender: str, port: int) -> None:
    """A client that stays up for a round: each line on stdin is a burst size;
    it answers with that burst's rate."""
    sk = load_module(contender)
    connect_rate(sk, port, 500)  # warm-up: first calls, caches, the route memo
    print("ready", flush=True)
    for line in sys.stdin:
        print(connect_rate(sk, port, int(line)), flush=True)


def burst_size(contender: str, args) -> int:
    # FillP connects ~10x slower: a tenth keeps its bursts as short as the others'.
    return max(args.connections // 10, 200) if contender == "dmm-fillp" else args.connections


def connect_round(args, r: int) -> dict[str, list[float]]:
    """One round of the connect test: a server and a client per contender,
    alive for the round, taking turns at ``args.bursts`` bursts each."""
    procs, clients = [], {}
    try:
        for c in CONTENDERS:
            server, port = start_child(c, "connect", dict(os.environ))
            procs.append(server)
            client = subprocess.Popen([sys.executable, __file__, "--connect-client", c, str(port)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            procs.append(client)
            clients[c] = client
        for c, client in clients.items():
            if client.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{c} connect client did not start")
        rates = {c: [] for c in CONTENDERS}
        for b in range(args.bursts):
            order = CONTENDERS if (r + b) % 2 == 0 else tuple(reversed(CONTENDERS))
            for c in order:
                clients[c].stdin.write(f"{burst_size(c, args)}\n")
                clients[c].stdin.flush()
                line = clients[c].stdout.readline()
                if not line:
                    raise RuntimeError(f"{c} connect client died")
                rates[c].append(float(line))
        return rates
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def active(contender: str, test: str, port: int, args) -> float:
    """The active end of one test, in its own process."""
    sk = load_module(contender)
    if test == "bulk":
        return bulk(sk, port, args.bulk_mib)
    if test == "pingpong":
        return pingpong(sk, port, args.pingpong)
    return connect_rate(sk, port, args.connections)


def run_one(contender: str, test: str, args) -> float:
    # Both ends run in fresh processes, so nothing one contender leaves
    # behind (threads, lingering connections, heap layout) touches the next.
    env = dict(os.environ, BENCH_CONNECTIONS=str(args.connections))
    proc, port = start_child(contender, test, env)
    try:
        out = subprocess.run([sys.executable, __file__, "--client", contender, test, str(port),
                              "--bulk-mib", str(args.bulk_mib), "--pingpong", str(args.pingpong),
                              "--connections", str(args.connections)],
                             capture_output=True, text=True, timeout=600, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"{contender} {test} client failed: {out.stderr[-2000:]}")
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        proc.wait(60)


UNITS = {"bulk": "Gbit/s", "pingpong": "round trips/s", "connect": "connections/s"}
TARGETS = {"bulk": 0.97, "pingpong": 0.95, "connect": 0.95}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bulk-mib", type=int, default=1024)
    p.add_argument("--pingpong", type=int, default=20000)
    p.add_argument("--connections", type=int, default=5000,
                   help="connects per burst (a tenth for FillP)")
    p.add_argument("--bursts", type=int, default=8, help="connect bursts per contender and round")
    p.add_argument("--tests", default="bulk,pingpong,connect")
    p.add_argument("--child", nargs=3, metavar=("CONTENDER", "TEST", "PORTFILE"), help=argparse.SUPPRESS)
    p.add_argument("--client", nargs=3, metavar=("CONTENDER", "TEST", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--connect-client", nargs=2, metavar=("CONTENDER", "PORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.connect_client:
        connect_client(args.connect_client[0], int(args.connect_client[1]))
        return 0
    if args.client:
        contender, test, port = args.client
        print(active(contender, test, int(port), args))
        return 0

    tests = args.tests.split(",")
    samples = {(t, c): [] for t in tests for c in CONTENDERS}
    for r in range(args.rounds):
        for t in tests:
            if t == "connect":
                for c, rates in connect_round(args, r).items():
                    samples[(t, c)].extend(rates)
                continue
            order = CONTENDERS if r % 2 == 0 else tuple(reversed(CONTENDERS))
            for c in order:
                samples[(t, c)].append(run_one(c, t, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    import dmm
    from dmm import _core

    lines = [
        "# dmm kernel route vs the stdlib socket module",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, dmm {dmm.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, kernel {os.uname().release}. Median of {args.rounds} interleaved rounds; "
        f"bulk {args.bulk_mib} MiB, ping-pong {args.pingpong} round trips; connect: {args.bursts} alternating "
        f"bursts a round of {args.connections} connects ({burst_size('dmm-fillp', args)} for FillP), "
        "so its medians are over rounds x bursts.",
        f"io_uring: {'available' if _core.uring_available() is None else 'refused: ' + str(_core.uring_available())}.",
        "",
        "| test | unit | stdlib | dmm (syscalls) | dmm/stdlib | target | dmm (io_uring) | uring/stdlib | dmm (FillP) | "
        "FillP/stdlib | dmm (routed) | routed/stdlib | dmm (routed, path samples) | adaptive/routed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out = {}
    for t in tests:
        med = {c: statistics.median(samples[(t, c)]) for c in CONTENDERS}
        out[t] = {c: {"median": med[c], "samples": samples[(t, c)]} for c in CONTENDERS}
        fmt = (lambda v: f"{v:.2f}") if t == "bulk" else (lambda v: f"{v:,.0f}")
        lines.append(f"| {t} | {UNITS[t]} | {fmt(med['stdlib'])} | {fmt(med['dmm'])} | {med['dmm'] / med['stdlib']:.3f} | "
                     f">= {TARGETS[t]} | {fmt(med['dmm-uring'])} | {med['dmm-uring'] / med['stdlib']:.3f} | "
                     f"{fmt(med['dmm-fillp'])} | {med['dmm-fillp'] / med['stdlib']:.3f} | "
                     f"{fmt(med['dmm-routed'])} | {med['dmm-routed'] / med['stdlib']:.3f} | "
                     f"{fmt(med['dmm-adaptive'])} | {med['dmm-adaptive'] / med['dmm-routed']:.3f} |")
    lines.append("")
    # Each round runs every contender back to back, so a ratio within a
    # round sees the same machine state; on a VM whose speed drifts between
    # rounds, the median of these is steadier than a ratio of medians.
    pairs = (("dmm", "stdlib"), ("dmm-uring", "stdlib"), ("dmm-fillp", "stdlib"), ("dmm-routed", "stdlib"),
             ("dmm-adaptive", "dmm-routed"))
    for t in tests:
        parts = []
        for a, b in pairs:
            ratios = [x / y for x, y in zip(samples[(t, a)], samples[(t, b)])]
            parts.append(f"{a}/{b} {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})")
        lines.append(f"Paired {t} ratios (median of the rounds' own ratios, min-max): " + "; ".join(parts))
    lines.append("")
    lines.append("Spread (min-max of the rounds): " + "; ".join(
        f"{t}/{c} {min(samples[(t, c)]):.4g}-{max(samples[(t, c)]):.4g}" for t in tests for c in CONTENDERS))
    publish("kernel", lines, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
