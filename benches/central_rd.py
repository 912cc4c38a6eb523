"""Central RD (etcd) benchmark: policy propagation, connect cost, a large store.

    python benches/central_rd.py [--pushes 40] [--connects 20000] [--rounds 11]

Starts its own etcd (Debian's etcd-server) on loopback and measures:

* **propagation**: three running dmm processes on three hosts (lab
  namespaces, etcd on a management network; as root) watch the central
  policy; the bench pushes a new one ``--pushes`` times and each process
  reports when its next decision changed. p50 / p99 / max over all pushes
  and processes, in ms, from the moment before the put. Without root (or
  with ``--one-host``) the three processes share the root namespace.
* **connect cost**: connects per second to a kernel listener over loopback
  with ``[rd] central`` configured and without (the same two-stack config
  otherwise), in pairs of fresh processes, the pairs' order alternating;
  the ratio is the median of the pairs' ratios (the target: >= 0.95).
* **large store**: 1,000 advertisements and 10,000 path entries in etcd;
  a fresh process's time from ``configure()`` to a warm cache and its
  resident memory against the same process without central RD.

Connect cost and the large store run on one host. Writes
``benches/results/central_rd.{md,json}``.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from etcd_cluster import Cluster  # noqa: E402  (the tests' etcd launcher)

TWO = """
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "wan"
kind = "fillp"
"""

ROUTE = '[[route]]\nto = "10.9.0.0/16"\nstacks = ["{stack}"]\n'


def rd_section(urls, host):
    quoted = ", ".join(f'"{u}"' for u in urls)
    return f'\n[rd]\ncentral = [{quoted}]\nhost = "{host}"\ntimeout_ms = 2000\n'


# A watcher: prints "ready", then one line per decision change seen
# (wall-clock ns, the stack now chosen), until stdin closes.
WATCHER = r"""
import sys, threading, time, dmm.runtime, dmm.policy
from dmm import config
rt = dmm.runtime.configure(config.parse(sys.argv[1], "<watcher>"))
rt.central.synced.wait(10)
req = dmm.policy.Request(role="connect", family=2, type=1, address="10.9.3.4", port=80)
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
last = rt.decide(req).stack
print("ready", last, flush=True)
while not done.is_set():
    now = rt.decide(req).stack
    if now != last:
        print(time.time_ns(), now, flush=True)
        last = now
    time.sleep(0.0005)
"""

# Connect loop: prints connections per second.
CONNECTS = r"""
import sys, time, dmm.runtime, dmm.socket as s
from dmm import config
rt = dmm.runtime.configure(config.parse(sys.argv[1], "<connects>"))
if rt.central is not None:
    rt.central.synced.wait(10)
port, n = int(sys.argv[2]), int(sys.argv[3])
for _ in range(200):
    c = s.create_connection(("127.0.0.1", port)); c.close()
t0 = time.perf_counter()
for _ in range(n):
    c = s.create_connection(("127.0.0.1", port)); c.close()
print(n / (time.perf_counter() - t0))
"""

# Warm-up of a large store: prints seconds to a warm cache and RSS growth.
STARTUP = r"""
import sys, time, json, dmm.runtime
from dmm import config
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
t0 = time.perf_counter()
rt = dmm.runtime.configure(config.parse(sys.argv[1], "<startup>"))
if rt.central is not None:
    rt.central.synced.wait(30)
warm = time.perf_counter() - t0
facts = len(rt.central._ads) if rt.central is not None else 0
paths = sum(len(v) for v in rt.central._paths.values()) if rt.central is not None else 0
print(json.dumps({"warm_s": warm, "rss_growth": rss() - base, "ads": facts, "paths": paths}))
"""


def run_py(code, *args, **kw):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


async def _client(endpoint):
    import aetcd

    host, port = endpoint.rsplit(":", 1)
    client = aetcd.Client(host=host, port=int(port))
    await client.connect()
    return client


def propagation(cluster, env, pushes, spawn=subprocess.Popen):
    """``spawn(i, argv, **popen_args)`` starts watcher ``i`` (in a namespace
    of its own, in the multi-host run)."""
    toml = TWO + rd_section(cluster.urls(), "w")
    procs = [spawn(i, [sys.executable, "-c", WATCHER, toml.replace('"w"', f'"w{i}"')],
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for i in range(3)]
    lines = {i: [] for i in range(3)}
    for i, p in enumerate(procs):
        first = p.stdout.readline()
        if not first.startswith("ready"):
            raise RuntimeError(f"watcher {i} did not start: {first!r}")

    def reader(i, p):
        for line in p.stdout:
            lines[i].append(line.split())

    threads = [threading.Thread(target=reader, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    delays = []
    loop = asyncio.new_event_loop()
    client = loop.run_until_complete(_client(cluster.endpoints[0]))
    for n in range(pushes):
        stack = "wan" if n % 2 == 0 else "kernel"
        seen = [len(lines[i]) for i in range(3)]
        t0 = time.time_ns()
        loop.run_until_complete(client.put(b"/dmm/policy", ROUTE.format(stack=stack).encode()))
        deadline = time.monotonic() + 5
        while any(len(lines[i]) == seen[i] for i in range(3)) and time.monotonic() < deadline:
            time.sleep(0.002)
        for i in range(3):
            if len(lines[i]) == seen[i]:
                raise RuntimeError(f"watcher {i} never saw push {n}")
            ns, got = lines[i][seen[i]]
            assert got == stack, (got, stack)
            delays.append((int(ns) - t0) / 1e6)
        time.sleep(0.1)
    loop.run_until_complete(client.close())
    loop.close()
    for p in procs:
        p.stdin.close()
        p.wait(10)
    delays.sort()
    return {"samples": len(delays), "p50_ms": statistics.median(delays),
            "p99_ms": delays[min(len(delays) - 1, int(len(delays) * 0.99))], "max_ms": delays[-1]}


def connect_cost(cluster, env, n, rounds):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1024)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    port = srv.getsockname()[1]
    # A route names the kernel for loopback: the question is what central RD
    # adds to a routed connect, not which stack wins.
    base = TWO + '[[route]]\nto = "127.0.0.0/8"\nstacks = ["kernel"]\n'
    runs = {"without": [], "with": []}
    configs = {"without": base, "with": base + rd_section(cluster.urls(), "c")}
    ratios = []
    for i in range(rounds):
        # Pairs in alternating order (ABBA...): drift in the machine's speed
        # over the run falls on both sides alike.
        order = ("without", "with") if i % 2 == 0 else ("with", "without")
        got = {}
        for name in order:
            out = run_py(CONNECTS, configs[name], port, n, env=env)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            got[name] = float(out.stdout)
            runs[name].append(got[name])
        ratios.append(got["with"] / got["without"])
    stop.set()
    srv.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"without_per_s": med["without"], "with_per_s": med["with"], "ratio": statistics.median(ratios),
            "ratios": ratios, "spread": {k: [min(v), max(v)] for k, v in runs.items()}}


async def _fill(endpoint, ads, paths):
    from dmm.rd.central_schema import Advertisement, ad_key, ad_value, path_key, path_value
    from dmm.rd.paths import Aggregate

    client = await _client(endpoint)
    try:
        for i in range(ads):
            h = f"h{i % 100}"
            addr = f"10.{i // 250 % 250}.{i % 250}.1"
            ad = Advertisement(h, (addr,), 8000 + i % 1000, (("tcp", 8000 + i % 1000), ("fillp", 9000)),
                               ("kernel", "wan"), 100 + i)
            await client.put(ad_key("/dmm/", h, addr, ad.port, ad.pid).encode(), ad_value(ad))
        now = time.time()
        for i in range(paths):
            h = f"h{i % 100}"
            dest = f"10.{i // 250 % 250}.{i % 250}.0/24"
            agg = Aggregate(40.0, 1.0, 0.01, 1.0, 100.0, 1.0, 5, now)
            await client.put(path_key("/dmm/", h, dest).encode(), path_value(agg))
    finally:
        await client.close()


def large_store(cluster, env, ads, paths):
    t0 = time.perf_counter()
    asyncio.run(_fill(cluster.endpoints[0], ads, paths))
    fill_s = time.perf_counter() - t0
    outs = {}
    for name, toml in (("without", TWO), ("with", TWO + rd_section(cluster.urls(), "s"))):
        runs = []
        for _ in range(3):
            out = run_py(STARTUP, toml, env=env)
            if out.returncode != 0:
                raise RuntimeError(out.stderr)
            runs.append(json.loads(out.stdout))
        outs[name] = sorted(runs, key=lambda r: r["warm_s"])[1]
    return {"ads": ads, "paths": paths, "fill_s": fill_s, "cached_ads": outs["with"]["ads"],
            "cached_paths": outs["with"]["paths"],
            "warm_s": outs["with"]["warm_s"], "warm_s_without": outs["without"]["warm_s"],
            "rss_growth_mib": outs["with"]["rss_growth"] / 2**20,
            "rss_growth_mib_without": outs["without"]["rss_growth"] / 2**20}


def multi_host_propagation(tmp, env, pushes):
    """Propagation to three lab namespaces as hosts, etcd in the root
    namespace on the management network (no emulated link in between)."""
    from dmm.lab import Lab
    from dmm.lab.management import ManagementNetwork
    from dmm.lab.profiles import LINK_PROFILES
    from dmm.lab.topology import LinkPlan, Topology

    internet = LINK_PROFILES["internet"].params
    lab = Lab(None)
    lab.topology = Topology("central", (LinkPlan("b", 1, internet), LinkPlan("c", 2, internet)))
    (tmp / "hosts").mkdir()
    with lab, ManagementNetwork(lab) as mgmt, Cluster(tmp / "hosts", host=mgmt.address) as cluster:
        nodes = list(lab.nodes)
        prop = propagation(cluster, env, pushes, spawn=lambda i, argv, **kw: lab.popen(nodes[i], argv, **kw))
    prop["hosts"] = nodes
    return prop


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=40)
    ap.add_argument("--connects", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--ads", type=int, default=1000)
    ap.add_argument("--paths", type=int, default=10000)
    ap.add_argument("--one-host", action="store_true", help="propagation without namespaces (the default without root)")
    args = ap.parse_args()
    hosts = not args.one_host and os.geteuid() == 0
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, DMM_RD_DIR=os.path.join(tmp, "lrd"))
        prop = multi_host_propagation(Path(tmp), env, args.pushes) if hosts else None
        with Cluster(Path(tmp)) as cluster:
            if prop is None:
                prop = propagation(cluster, env, args.pushes, spawn=lambda i, argv, **kw: subprocess.Popen(argv, **kw))
            cost = connect_cost(cluster, env, args.connects, args.rounds)
            big = large_store(cluster, env, args.ads, args.paths)
    result = {"run": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
              "cpus": os.cpu_count(), "propagation": prop, "connect": cost, "large_store": big}
    out = HERE / "results"
    (out / "central_rd.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# Central RD (etcd) benchmark",
        "",
        f"Run {result['run']}, Python {result['python']}, {result['cpus']} CPUs, one etcd 3.4 member. "
        + (f"Propagation: one process in each of {len(prop['hosts'])} namespaces ({', '.join(prop['hosts'])}),"
           " etcd in the root namespace over a management veth; "
           if prop.get("hosts") else "Propagation: three processes in one namespace; ")
        + "connect cost and the large store: one host, loopback. `python benches/central_rd.py`.",
        "",
        "| measure | value | target |",
        "|---|---:|---:|",
        f"| policy propagation to 3 processes, p50 ({prop['samples']} samples) | {prop['p50_ms']:.1f} ms | < 1000 ms |",
        f"| policy propagation, p99 | {prop['p99_ms']:.1f} ms | < 1000 ms |",
        f"| policy propagation, max | {prop['max_ms']:.1f} ms | |",
        f"| connects/s, kernel route, without central RD | {cost['without_per_s']:,.0f} | |",
        f"| connects/s, kernel route, with central RD | {cost['with_per_s']:,.0f} | |",
        f"| with / without, median of {len(cost['ratios'])} pairs | {cost['ratio']:.3f} "
        f"(pairs {min(cost['ratios']):.3f}-{max(cost['ratios']):.3f}) | >= 0.95 |",
        f"| store: {big['ads']:,} ads + {big['paths']:,} path entries, time to a warm cache | "
        f"{big['warm_s'] * 1000:.0f} ms (configure without central: {big['warm_s_without'] * 1000:.0f} ms) | |",
        f"| entries cached (ads, host-prefix paths) | {big['cached_ads']:,}, {big['cached_paths']:,} | |",
        f"| resident memory added by configure() | {big['rss_growth_mib']:.1f} MiB "
        f"(without central: {big['rss_growth_mib_without']:.1f} MiB) | |",
        "",
        f"Connect spread (min-max of {args.rounds} rounds): without {cost['spread']['without'][0]:,.0f}-"
        f"{cost['spread']['without'][1]:,.0f}, with {cost['spread']['with'][0]:,.0f}-{cost['spread']['with'][1]:,.0f}.",
        "",
    ]
    (out / "central_rd.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
