"""Negotiation costs, side by side in one run: racing, knowing, the kernel.

Contenders connect to two servers over loopback, each in its own process:

* ``plain``: a stdlib TCP server (it knows nothing of dmm);
* ``dmm``: a dmm server listening on the kernel and FillP.

Measured (medians of interleaved rounds, each sample in a fresh process
with an empty L-RD unless it says "known"):

* ``first connect``, ms: the first connect to each server through the route
  ``["wan", "kernel"]``, against the same connect on a config that names
  the winner alone (``kernel`` for the plain server, ``wan`` for the dmm
  one). Targets: plain within the attempt delay plus one RTT; dmm with no
  extra delay.
* ``connect rate``, connect+accept+close per second to the plain server:
  the stdlib; dmm on the built-in config; dmm through ``["wan", "kernel"]``
  once L-RD knows the server (the first connect, not counted, teaches it);
  dmm on a kernel-only config of the same stacks. Targets: built-in >= 0.95x
  the stdlib, known >= 0.95x kernel-only.
The blackholed-UDP case (netfilter in a namespace) is
``tests/test_negotiation_netns.py``; its connect times are in the closing
note of the negotiation issue.

Results go to ``benches/results/negotiation.md``.

    python benches/negotiation.py [--rounds 5] [--connections 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from publish import publish

HERE = Path(__file__).resolve().parent

STACKS = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"
address = "127.0.0.1"
"""
CONFIGS = {
    "race": STACKS + '[[route]]\nto = "127.0.0.0/8"\nstacks = ["wan", "kernel"]\n',
    "kernel-only": STACKS + '[[route]]\nto = "127.0.0.0/8"\nstacks = ["kernel"]\n',
    "fillp-only": STACKS + '[[route]]\nto = "127.0.0.0/8"\nstacks = ["wan"]\n',
    "builtin": None,
}

PLAIN_SERVER = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096)
print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept(); c.close()
"""

DMM_SERVER = """
import dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse('''%s
[listen]
stacks = ["kernel", "wan"]
'''))
srv = s.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(4096)
print(srv.getsockname()[1], flush=True)
while True:
    c, _ = srv.accept(); c.close()
""" % STACKS

CLIENT = """
import json, os, sys, time
mode, config, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "stdlib":
    import socket as sk
else:
    import dmm.runtime, dmm.socket as sk
    from dmm import config as dconfig
    dmm.runtime.configure(dconfig.parse(open(config).read()) if config != "-" else dconfig.parse(dconfig.DEFAULT_TOML))
def one():
    s = sk.socket(); s.connect(("127.0.0.1", port)); stack = getattr(s, "dmm_stack", "stdlib"); s.close()
    return stack
if mode == "first":
    t = time.perf_counter(); stack = one(); ms = (time.perf_counter() - t) * 1000
    print(json.dumps({"ms": ms, "stack": stack}))
else:
    if mode == "known":
        one(); time.sleep(0.3)  # learn the server, let L-RD settle
    for _ in range(200):
        one()  # warm up
    t = time.perf_counter()
    for _ in range(count):
        one()
    print(json.dumps({"rate": count / (time.perf_counter() - t)}))
"""


#: Servers on one CPU, clients on another (with two or more): left to the
#: scheduler, a launch that puts both on one CPU runs ~30% slower, and which
#: contender gets such launches is luck (seen: 21k vs 29k connections/s for
#: the same build and config, no other thread running).
PIN = len(os.sched_getaffinity(0)) >= 2
SERVER_CPU, CLIENT_CPU = (sorted(os.sched_getaffinity(0))[:2] if PIN else (None, None))


def pinned(cpu):
    return (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None


def start(code: str, env: dict) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env,
                         preexec_fn=pinned(SERVER_CPU))
    return p, int(p.stdout.readline())


def client(mode: str, config: str, port: int, count: int, env: dict, netns_argv=()) -> dict:
    argv = [*netns_argv, sys.executable, "-c", CLIENT, mode, config, str(port), str(count)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, preexec_fn=pinned(CLIENT_CPU))
    if out.returncode != 0:
        raise SystemExit(f"client {mode} {config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=2000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dmm-neg-"))
    paths = {}
    for name, text in CONFIGS.items():
        if text is not None:
            paths[name] = tmp / f"{name}.toml"
            paths[name].write_text(text)
    base_env = dict(os.environ, PYTHONUNBUFFERED="1")
    plain, plain_port = start(PLAIN_SERVER, dict(base_env, DMM_RD_DIR=str(tmp / "srv")))
    dmms, dmm_port = start(DMM_SERVER, dict(base_env, DMM_RD_DIR=str(tmp / "srv")))
    first: dict[str, list[float]] = {k: [] for k in ("plain race", "plain kernel-only", "dmm race", "dmm fillp-only")}
    stacks: dict[str, set] = {k: set() for k in first}
    rates: dict[str, list[float]] = {k: [] for k in ("stdlib", "dmm builtin", "dmm race, known", "dmm kernel-only")}
    try:
        for r in range(args.rounds):
            for key, (port, cfg) in {"plain race": (plain_port, "race"), "plain kernel-only": (plain_port, "kernel-only"),
                                     "dmm race": (dmm_port, "race"), "dmm fillp-only": (dmm_port, "fillp-only")}.items():
                env = dict(base_env, DMM_RD_DIR=str(tmp / f"rd-first-{r}-{key.replace(' ', '-')}"))
                res = client("first", str(paths[cfg]), port, 1, env)
                first[key].append(res["ms"])
                stacks[key].add(res["stack"])
            for key, (mode, cfg) in {"stdlib": ("stdlib", "-"), "dmm builtin": ("rate", "-"),
                                     "dmm race, known": ("known", str(paths["race"])),
                                     "dmm kernel-only": ("rate", str(paths["kernel-only"]))}.items():
                env = dict(base_env, DMM_RD_DIR=str(tmp / f"rd-rate-{r}"))
                rates[key].append(client(mode, cfg, plain_port, args.connections, env)["rate"])
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        plain.kill()
        dmms.kill()

    lines = ["# Negotiation: racing, knowing, and the kernel route", "",
             f"One run, {args.rounds} interleaved rounds, medians (min-max). Loopback; "
             f"attempt delay 250 ms (the default). "
             + (f"Servers pinned to CPU {SERVER_CPU}, clients to CPU {CLIENT_CPU}. " if PIN else "")
             + f"`{' '.join(sys.argv)}`", "",
             "## First connect (fresh process, empty L-RD)", "",
             "| server | config | stack used | ms, median (min-max) | ratio to the winner alone |", "|---|---|---|---|---|"]
    for server, alone in (("plain", "kernel-only"), ("dmm", "fillp-only")):
        base = statistics.median(first[f"{server} {alone}"])
        for cfg in ("race", alone):
            m, lo, hi = median_spread(first[f"{server} {cfg}"])
            lines.append(f"| {server} | {cfg} | {', '.join(sorted(stacks[f'{server} {cfg}']))} | {m:.2f} ({lo:.2f}-{hi:.2f}) "
                         f"| {m / base:.2f} |")
    lines += ["", f"## connect + accept + close to the plain server ({args.connections} per sample)", "",
              "| contender | connections/s, median (min-max) | ratio |", "|---|---|---|"]
    std = statistics.median(rates["stdlib"])
    kern = statistics.median(rates["dmm kernel-only"])
    for key, vals in rates.items():
        m, lo, hi = median_spread(vals)
        ratio = f"{m / std:.3f}x stdlib" if key in ("stdlib", "dmm builtin") else f"{m / kern:.3f}x dmm kernel-only"
        lines.append(f"| {key} | {m:,.0f} ({lo:,.0f}-{hi:,.0f}) | {ratio} |")
    paired = [k / o for k, o in zip(rates["dmm race, known"], rates["dmm kernel-only"])]
    m, lo, hi = median_spread(paired)
    lines += ["", f"Known / kernel-only paired by round: median {m:.3f} (min {lo:.3f}, max {hi:.3f})."]
    lines += ["", "Targets: plain-server first connect within the attempt delay + 1 RTT; dmm-server first connect "
              "on FillP with no extra delay; built-in >= 0.95x stdlib; known >= 0.95x kernel-only.", ""]
    publish("negotiation", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
