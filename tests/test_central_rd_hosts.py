"""Central RD across hosts: three namespaces as three hosts, one etcd.

Host A (the lab's ``server`` node, 10.201.0.1) serves on the kernel and
FillP; hosts B and C reach it over emulated internet links (80 ms RTT, 1%
loss each way, 100 Mbit/s). Every host is one dmm process
(``tests/rd_agent.py``) with an L-RD store of its own, so what one host knows
of another reaches it only through etcd. etcd runs in the root namespace on
a management network (a veth per namespace, 10.253.0.0/16), so stopping it
or the lab's links never touches the other. Needs root.
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmm.lab import Lab
from dmm.lab.management import ManagementNetwork
from dmm.lab.netns import route_congctl
from dmm.lab.profiles import LINK_PROFILES
from dmm.lab.topology import LinkPlan, Topology

from etcd_cluster import Cluster

pytestmark = pytest.mark.needs_root("network namespaces and TAP devices")
pytest.importorskip("aetcd", reason="needs the etcd client: pip install 'dmm[central]'")

AGENT = str(Path(__file__).with_name("rd_agent.py"))
PORT = 7100
A = "10.201.0.1"

STACKS = """
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "wan"
kind = "fillp"
"""


def rd(etcd, host):
    urls = ", ".join(f'"{u}"' for u in etcd.urls())
    return f'\n[rd]\ncentral = [{urls}]\nhost = "{host}"\nlease_ttl_s = 2\ntimeout_ms = 2000\n'


#: BBR, set per route too: it is this kernel's default, and the adaptive
#: policy sends an 80 ms, 1% path to FillP under it.
ADAPTIVE = '\n[adaptive]\ncongestion = "bbr"\n'


class Agent:
    """One host's dmm process, driven a command at a time."""

    def __init__(self, lab, node, name, toml, tmp_path):
        self.name = name
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(toml)
        env = dict(os.environ, DMM_RD_DIR=str(tmp_path / f"lrd-{name}"))
        self.proc = lab.popen(node, [sys.executable, AGENT, str(cfg)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
        assert self._line(30) == {"ready": True}

    def _line(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"host {self.name} did not answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"host {self.name}'s process ended ({self.proc.wait()})")
        return json.loads(line)

    def __call__(self, op, timeout=60, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        out = self._line(timeout)
        if isinstance(out, dict) and "error" in out:
            raise AssertionError(f"host {self.name}: {op}: {out['error']}")
        return out

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_for(check, timeout=10.0, step=0.05, explain=None):
    """Polls ``check`` until it returns something true; returns it and the
    seconds it took. ``explain()`` says what was seen, if it never does."""
    t0 = time.monotonic()
    while True:
        v = check()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s" + (f": {explain()}" if explain else ""))
        time.sleep(step)


@pytest.fixture
def hosts(tmp_path):
    """The lab (nodes ``server`` = host A, ``b``, ``c``), etcd, and host A
    serving on port 7100 over the kernel and FillP, advertised."""
    internet = LINK_PROFILES["internet"].params
    lab = Lab(None)
    lab.topology = Topology("central", (LinkPlan("b", 1, internet), LinkPlan("c", 2, internet)))
    with lab, ManagementNetwork(lab) as mgmt:
        etcd = None
        try:
            for node in ("b", "c"):
                route_congctl(lab.netns(node), "bbr")
            etcd = Cluster(tmp_path, host=mgmt.address).start()
            a = Agent(lab, "server", "a", STACKS + '[listen]\nstacks = ["kernel", "wan"]\n' + rd(etcd, "a"),
                      tmp_path)
            a("serve", port=PORT)
            yield lab, etcd, a, tmp_path
        finally:
            if etcd is not None:
                etcd.stop()


def shared_paths(etcd, host):
    return etcd.ctl("get", "--prefix", f"/dmm/hosts/{host}/paths/", "--keys-only").stdout.split()


def test_host_b_reaches_a_on_fillp_on_its_first_connection_because_of_central_rd(hosts):
    lab, etcd, _a, tmp_path = hosts
    # C measures the way to A's network with one kernel transfer and shares it.
    c = Agent(lab, "c", "c", STACKS + ADAPTIVE + rd(etcd, "c"), tmp_path)
    assert c("decide", address=A, port=PORT)["stack"] == "kernel"  # nothing measured yet
    assert c("send", address=A, port=PORT, size=4 << 20)["server_stack"] == "kernel"
    keys, _ = wait_for(lambda: shared_paths(etcd, "c"), timeout=15,
                       explain=lambda: (c("central"), c("path", address=A)))
    assert keys == ["/dmm/hosts/c/paths/10.201.0.0/24"], keys

    # B, without [rd] central, knows nothing: the kernel, to measure.
    alone = Agent(lab, "b", "b-alone", STACKS + ADAPTIVE, tmp_path)
    d = alone("decide", address=A, port=PORT)
    assert (d["stack"], d["candidates"]) == ("kernel", ["kernel"]), d
    alone.kill()

    # B with central RD: C's estimate for the /24 and A's advertisement.
    b = Agent(lab, "b", "b", STACKS + ADAPTIVE + rd(etcd, "b"), tmp_path)
    wait_for(lambda: b("facts", address=A, port=PORT).get("fillp"))
    path = b("path", address=A)
    assert path["rtt_ms"] == pytest.approx(80, rel=0.1) and path["loss"] >= 0.005, path
    d = b("decide", address=A, port=PORT)
    assert d["candidates"][0] == "wan" and d["source"] == "adaptive", d
    got = b("send", address=A, port=PORT, size=1 << 20)
    assert (got["stack"], got["server_stack"]) == ("wan", "wan"), got
    counters = b("counters")
    # One race, won by FillP, and no second handshake ever went out; no
    # DISCOVER either: the advertisement said what A speaks.
    assert counters.get("races_started") == 1 and counters.get("races_won_wan") == 1, counters
    assert counters.get("races_contested", 0) == 0 and counters.get("fallbacks", 0) == 0, counters
    assert counters.get("discovery_queries", 0) == 0, counters


def test_a_policy_pushed_while_host_c_runs_changes_its_next_decision(hosts):
    lab, etcd, _a, tmp_path = hosts
    c = Agent(lab, "c", "c", STACKS + ADAPTIVE + rd(etcd, "c"), tmp_path)
    c("send", address=A, port=PORT, size=4 << 20)
    d = c("decide", address=A, port=PORT)
    assert d["candidates"][0] == "wan", d  # its own measurement: FillP

    ops = tmp_path / "ops.toml"
    ops.write_text(STACKS + rd(etcd, "ops"))
    policy = tmp_path / "policy.toml"
    policy.write_text('[[route]]\nto = "10.201.0.0/24"\nstacks = ["kernel"]\n')
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "dmm", "--config", str(ops), "rd", "push", str(policy)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d, _ = wait_for(lambda: (d := c("decide", address=A, port=PORT))["candidates"] == ["kernel"] and d, timeout=5)
    took = time.monotonic() - t0
    assert d["source"].startswith("route[0] of central policy"), d
    assert took < 1 + 0.5, took  # within a second of the push (plus the CLI's own start)
    assert c("send", address=A, port=PORT, size=1000)["server_stack"] == "kernel"


def test_etcd_stopped_and_restarted_under_load_fails_no_connection(hosts):
    lab, etcd, _a, tmp_path = hosts
    b = Agent(lab, "b", "b", STACKS + ADAPTIVE + rd(etcd, "b"), tmp_path)
    wait_for(lambda: b("facts", address=A, port=PORT).get("fillp"))
    b("load", address=A, port=PORT)
    time.sleep(1.5)
    etcd.stop()
    down = time.monotonic()
    wait_for(lambda: not b("central")["connected"], timeout=15)
    time.sleep(max(0.0, 3 - (time.monotonic() - down)))  # longer than the 2 s leases
    etcd.start()
    # Both hosts are back: A's advertisement is published again, B follows it.
    wait_for(lambda: b("central")["connected"], timeout=15)
    wait_for(lambda: etcd.ctl("get", "--prefix", "/dmm/hosts/a/ads/", "--keys-only").stdout.strip(), timeout=15)
    time.sleep(1.0)
    done = b("unload")
    assert done["errors"] == [] and done["ok"] >= 20, done
    status = b("central")
    assert status["counters"]["sessions"] >= 2, status


def test_host_a_killed_its_advertisement_is_gone_within_the_ttl(hosts):
    lab, etcd, a, tmp_path = hosts
    b = Agent(lab, "b", "b", STACKS + ADAPTIVE + rd(etcd, "b"), tmp_path)
    wait_for(lambda: b("facts", address=A, port=PORT).get("fillp"))
    a.kill()
    _, took = wait_for(lambda: "fillp" not in b("facts", address=A, port=PORT), timeout=10)
    assert took < 2 + 1.5, took  # the 2 s lease, and the watch's delivery
    assert etcd.ctl("get", "--prefix", "/dmm/hosts/a/", "--keys-only").stdout.strip() == ""
