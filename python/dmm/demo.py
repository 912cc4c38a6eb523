"""``dmm demo``: one server, clients routed to three stack instances.

Needs no set-up: everything runs over loopback in this process. The demo
configures two kernel instances, plain TCP (``kernel``) and Multipath TCP
(``mptcp``), and a FillP instance over UDP (``wan``), with routes that send
127.0.0.2 to MPTCP and 127.0.0.3 to FillP. One listening socket serves them
all: its kernel member is MPTCP (which accepts plain TCP too), and its FillP
member takes the same port number on UDP.
Each client sends the same amount of data; the table shows which stack
carried each connection, who decided, and how fast it went.
"""

from __future__ import annotations

import hashlib
import socket as _std
import threading
import time
from typing import Optional

from . import config as _config
from . import policy, runtime
from . import socket as dsocket

DEMO_TOML = """\
[[stack]]
name = "kernel"
kind = "kernel"
protocol = "tcp"

[[stack]]
name = "mptcp"
kind = "kernel"
protocol = "mptcp"

[[stack]]
name = "wan"
kind = "fillp"
rate_control = "bbr"

[[route]]
to = "127.0.0.2/32"
stacks = ["mptcp", "kernel"]

[[route]]
to = "127.0.0.3/32"
stacks = ["wan", "kernel"]

[listen]
stacks = ["mptcp", "wan"]
"""

_CHUNK = 256 * 1024


def _mptcp_works() -> Optional[str]:
    try:
        _std.socket(_std.AF_INET, _std.SOCK_STREAM, 262).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _serve(listener: dsocket.socket, count: int, results: dict) -> None:
    for _ in range(count):
        conn, peer = listener.accept()
        with conn:
            digest = hashlib.sha256()
            total = 0
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                digest.update(view[:n])
                total += n
            conn.sendall(digest.digest())
            results[peer[1]] = (conn.dmm_stack, total)


def run_demo(size_mib: int = 64, config: Optional[str] = None) -> int:
    """Runs the demo and prints its table; returns a process exit code."""
    if config:
        cfg = _config.load(config)
        targets = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    else:
        why = _mptcp_works()
        toml = DEMO_TOML if why is None else DEMO_TOML.replace('protocol = "mptcp"', 'protocol = "tcp"')
        if why is not None:
            print(f"note: MPTCP is not available here ({why}); the 'mptcp' instance uses plain TCP")
        cfg = _config.parse(toml, "<demo config>")
        targets = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    runtime.configure(cfg)
    print(f"config: {cfg.path}")
    for spec in cfg.stacks:
        print(f"  stack {spec.name}: {runtime.get().stacks[spec.name].describe()}")
    for r in cfg.routes:
        print(f"  route[{r.index}]: {r.describe()}")

    # One listening socket spans every stack [listen] names: the kernel
    # (an MPTCP listener also takes plain TCP) and FillP on the same port.
    listener = dsocket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    print(f"server: one listening socket on port {port}, stacks {', '.join(listener.dmm_stacks)}")
    results: dict = {}
    server = threading.Thread(target=_serve, args=(listener, len(targets), results), daemon=True)
    server.start()

    payload = bytes(range(256)) * (_CHUNK // 256)
    total = size_mib * 1024 * 1024
    expected = hashlib.sha256()
    for _ in range(total // _CHUNK):
        expected.update(payload)
    rows = []
    for dest in targets:
        rt = runtime.get()
        outcome = rt.decide(policy.Request("connect", _std.AF_INET, _std.SOCK_STREAM, dest, port))
        start = time.perf_counter()
        with dsocket.create_connection((dest, port)) as sock:
            sent = 0
            while sent < total:
                sock.sendall(payload)
                sent += len(payload)
            sock.shutdown(_std.SHUT_WR)
            digest = b""
            while len(digest) < 32:
                part = sock.recv(32 - len(digest))
                if not part:
                    break
                digest += part
            elapsed = time.perf_counter() - start
            kind = runtime.get().stacks[sock.dmm_stack].kind
            proto = "FillP" if kind == "fillp" else (
                "MPTCP" if sock.getsockopt(_std.SOL_SOCKET, _std.SO_PROTOCOL) == 262 else "TCP")
            local_port = sock.getsockname()[1]
            counters = sock.dmm_counters()
            rows.append((dest, sock.dmm_stack, outcome.source, proto,
                         sent, elapsed, counters.get("rtt_us"), digest == expected.digest(), local_port))
    server.join(timeout=30)
    listener.close()

    print()
    header = f"{'client -> server':<22} {'stack':<8} {'decided by':<12} {'proto':<6} {'MiB':>5} {'seconds':>8} {'Gbit/s':>7} {'rtt us':>7} {'sha256':>7} {'server saw':<12}"
    print(header)
    print("-" * len(header))
    ok = True
    for dest, stack, source, proto, sent, elapsed, rtt, good, local_port in rows:
        seen = results.get(local_port, ("?", 0))[0]
        gbit = sent * 8 / elapsed / 1e9
        ok &= good
        print(f"{dest + ':' + str(port):<22} {stack:<8} {source:<12} {proto:<6} {sent // 2**20:>5} {elapsed:>8.3f} "
              f"{gbit:>7.2f} {rtt if rtt is not None else '-':>7} {'ok' if good else 'BAD':>7} {seen:<12}")
    print()
    print("stack counters:", {k: v for k, v in dsocket.stack_counters().items()})
    return 0 if ok else 1
