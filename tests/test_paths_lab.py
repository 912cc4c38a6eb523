"""Path knowledge over emulated links, and the adaptive policy end to end.

A dmm server in the lab's ``server`` namespace listens on the kernel and
FillP; unmodified stdlib clients run under ``dmm run`` in the client
namespaces, each with an L-RD store of its own. What the clients measured
(``dmm paths --json``) is checked against what the emulator was set to, and
the stacks the server saw connections arrive on show what the adaptive
policy chose. Needs root (namespaces, TAP devices).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from dmm.lab import Lab
from dmm.lab.netns import route_congctl

pytestmark = pytest.mark.needs_root("network namespaces and TAP devices")

SERVER_TOML = """
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "wan"
kind = "fillp"
[listen]
stacks = ["kernel", "wan"]
"""

# Reads a 4-byte length and that many bytes, answers the stack it came on.
SERVER = """
import threading, dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse('''%s'''))
l = s.socket(); l.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1); l.bind(("0.0.0.0", 7100)); l.listen(64)
print("ready", flush=True)
def serve(c):
    want, got = None, 0
    buf = b""
    while want is None or got < want:
        part = c.recv(1 << 16)
        if not part:
            break
        if want is None:
            buf += part
            if len(buf) >= 4:
                want, got = int.from_bytes(buf[:4], "big"), len(buf) - 4
        else:
            got += len(part)
    c.sendall(c.dmm_stack.encode())
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
""" % SERVER_TOML

# A plain stdlib client: COUNT connections of SIZE bytes each, prints what
# the server said about each, and (under ``dmm run``) the negotiation
# counters, which say whether a race was lost by a slow handshake.
CLIENT = """
import json, socket, sys
addr, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = []
for _ in range(count):
    c = socket.create_connection((addr, 7100), timeout=60)
    c.sendall(size.to_bytes(4, "big") + bytes(size))
    reply = b""
    while part := c.recv(64):
        reply += part
    c.close()
    seen.append(reply.decode())
runtime = sys.modules.get("dmm.runtime")
counts = runtime.get().negotiator.counts() if runtime else {}
print(json.dumps({"seen": seen, "counts": counts}))
"""


def client_toml(extra):
    return SERVER_TOML.replace('[listen]\nstacks = ["kernel", "wan"]\n', "") + extra


def run_client(lab, node, tmp_path, extra, count, size, congctl=None):
    """Runs CLIENT under ``dmm run`` in ``node``; returns (stacks, paths,
    negotiation counters)."""
    home = tmp_path / node
    home.mkdir(exist_ok=True)
    cfg = home / "dmm.toml"
    cfg.write_text(client_toml(extra))
    if congctl:
        route_congctl(lab.netns(node), congctl)
    env = dict(os.environ, DMM_CONFIG=str(cfg), DMM_RD_DIR=str(home / "lrd"))
    script = home / "client.py"
    script.write_text(CLIENT)
    out = lab.exec(node, [sys.executable, "-m", "dmm", "run", str(script), lab.address("server"), str(count),
                          str(size)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    time.sleep(0.3)  # the RD thread writes the last sample
    paths = lab.exec(node, [sys.executable, "-m", "dmm", "paths", "--json"], capture_output=True, text=True,
                     env=env, check=True, timeout=60)
    by_key = {e["key"]: e for e in json.loads(paths.stdout)}
    report = json.loads(out.stdout)
    return report["seen"], by_key.get(lab.address("server")), report["counts"]


def start_server(lab, tmp_path):
    env = dict(os.environ, DMM_RD_DIR=str(tmp_path / "server-lrd"))
    proc = lab.popen("server", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("stack", ["kernel", "wan"])
def test_each_stack_measures_the_emulated_path(tmp_path, stack):
    # 80 ms RTT, 1% loss each way at 100 Mbit/s (the internet profile).
    with Lab("internet") as lab:
        start_server(lab, tmp_path)
        route = f'[[route]]\nto = "{lab.address("server")}/32"\nstacks = ["{stack}"]\n'
        seen, path, _ = run_client(lab, "client", tmp_path, route, count=2, size=4 << 20)
    assert seen == [stack, stack]
    assert path["samples"] == 2
    assert 80 * 0.9 <= path["rtt_ms"] <= 80 * 1.1, path
    assert 0.005 <= path["loss"] <= 0.02, path
    # A delivery rate the path can carry. Not a speed floor: the kernel
    # reports its last rate sample, which after a loss recovery on this path
    # was 0.98 Mbit/s in one run of ten.
    assert 0 < path["rate_mbit"] <= 100 * 1.1, path


def learned(stacks, counts):
    """How many kernel connections came before the first FillP one (``None``:
    never learned). After it every connection is on FillP, but for races
    FillP lost by a slow handshake (one lost handshake packet on a 1% path,
    then a second one): those are served by the kernel without unlearning
    FillP, so the last connection is on FillP again."""
    if "wan" not in stacks:
        return None
    first = stacks.index("wan")
    assert set(stacks[:first]) == {"kernel"}, stacks
    served_by_race = stacks[first:].count("kernel")
    assert served_by_race <= counts.get("races_lost_by_known", 0), (stacks, counts)
    assert stacks[-1] == "wan", (stacks, counts)
    return first


def test_the_adaptive_policy_on_the_three_lab_profiles(tmp_path):
    """With CUBIC (set per route, as most distributions default to it), the
    first connections to the server go to the kernel and measure; once a
    connection has measured loss, the next ones go where the measurement
    says: FillP on the internet and inter-DC links, the kernel within the
    data centre. (A connection can see no loss at all: then it takes one more
    connection to learn.)"""
    with Lab("filesync") as lab:
        start_server(lab, tmp_path)
        adaptive = '[adaptive]\ncongestion = "cubic"\n'
        # 1 MB at 100 Mbit/s and 1% loss, 4 MB at 1 Gbit/s and 0.1%: each
        # connection meets a few losses on average.
        sizes = {"internet": 1 << 20, "inter-dc": 4 << 20, "intra-dc": 4 << 20}
        results = {node: run_client(lab, node, tmp_path, adaptive, count=4, size=size, congctl="cubic")
                   for node, size in sizes.items()}
    for node in ("internet", "inter-dc"):
        stacks, path, counts = results[node]
        assert learned(stacks, counts) in (1, 2), (node, stacks, path)
        assert path["loss"] > 0
    assert results["intra-dc"][0] == ["kernel"] * 4, results
    assert results["intra-dc"][1]["loss"] == 0.0
    assert results["internet"][1]["rtt_ms"] == pytest.approx(80, rel=0.1)


def test_the_adaptive_policy_with_bbr(tmp_path):
    """With BBR, FillP is chosen only where it beat BBR in this project's
    measurements: the internet link (80 ms, 1% loss) learns FillP, the
    inter-DC link (20 ms, 0.1%) stays on the kernel."""
    with Lab("filesync") as lab:
        start_server(lab, tmp_path)
        adaptive = '[adaptive]\ncongestion = "bbr"\n'
        sizes = {"internet": 1 << 20, "inter-dc": 4 << 20}
        results = {node: run_client(lab, node, tmp_path, adaptive, count=4, size=size, congctl="bbr")
                   for node, size in sizes.items()}
    stacks, path, counts = results["internet"]
    assert learned(stacks, counts) in (1, 2), (stacks, path)
    stacks, path, _ = results["inter-dc"]
    assert stacks == ["kernel"] * 4, (stacks, path)
    assert path["samples"] == 4
