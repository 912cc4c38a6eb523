"""Negotiation across a real link, with netfilter dropping the FillP path.

A namespace ``srv`` joined to this one by a veth pair holds a dmm server
listening on the kernel and FillP; ``iptables`` in it drops the UDP path
silently (a blackhole: no ICMP), drops 30% of it at random, or drops
everything. The client here routes the server's network to
``["wan", "kernel"]``. Needs root (namespaces, netfilter).
"""

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

import dmm.runtime
import dmm.socket as dsocket
from dmm.lab import netns

from conftest import eventually, use_config

pytestmark = pytest.mark.needs_root("network namespaces and iptables")

NS = "dmmneg"
HERE_IP, SRV_IP = "10.251.0.1", "10.251.0.2"

CLIENT = f"""
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"

[[route]]
to = "10.251.0.0/24"
stacks = ["wan", "kernel"]
"""

SERVER = """
import sys, dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse('''
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "wan"
kind = "fillp"
[listen]
stacks = ["kernel", "wan"]
'''))
l = s.socket(); l.bind(("0.0.0.0", 0)); l.listen(64)
print(l.getsockname()[1], flush=True)
while True:
    c, _ = l.accept()
    want, data = None, b""
    while want is None or len(data) < want:
        part = c.recv(1 << 16)
        if not part:
            break
        data += part
        if want is None and len(data) >= 4:
            want, data = int.from_bytes(data[:4], "big"), data[4:]
    c.sendall(c.dmm_stack.encode() + b":" + data)
    c.close()
"""


@pytest.fixture
def server(tmp_path):
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed (.ci/run installs it)")
    if NS in netns.list_netns():
        netns.delete_netns(NS)
    netns.add_netns(NS)
    netns.ip("link", "add", "dmmneg0", "type", "veth", "peer", "name", "dmmneg1")
    try:
        netns.ip("link", "set", "dmmneg1", "netns", NS)
        netns.ip("addr", "add", f"{HERE_IP}/24", "dev", "dmmneg0")
        netns.ip("link", "set", "dmmneg0", "up")
        netns.ip("addr", "add", f"{SRV_IP}/24", "dev", "dmmneg1", netns=NS)
        netns.ip("link", "set", "dmmneg1", "up", netns=NS)
        env = dict(os.environ, DMM_RD_DIR=str(tmp_path / "srv-lrd"))
        proc = subprocess.Popen(netns.exec_argv(NS, [sys.executable, "-c", SERVER]), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        port = int(proc.stdout.readline())
        yield port
        proc.kill()
        proc.wait(10)
    finally:
        netns.kill_netns_pids(NS)
        netns.delete_netns(NS)
        subprocess.run(["ip", "link", "del", "dmmneg0"], capture_output=True)


def iptables(*rule):
    subprocess.run(netns.exec_argv(NS, ["iptables", *rule]), check=True, capture_output=True)


def exchange(port, payload=b"ping", timeout=10):
    c = dsocket.create_connection((SRV_IP, port), timeout=timeout)
    with c:
        c.sendall(len(payload).to_bytes(4, "big") + payload)
        data = b""
        while True:
            part = c.recv(1 << 16)
            if not part:
                return c.dmm_stack, data
            data += part


def test_fillp_reaches_the_server_when_the_path_is_clean(server):
    use_config(CLIENT)
    assert exchange(server) == ("wan", b"wan:ping")
    assert dmm.runtime.get().negotiator.counts().get("fallbacks", 0) == 0


def test_a_blackholed_udp_path_ends_on_the_kernel_after_the_attempt_delay(server):
    iptables("-A", "INPUT", "-p", "udp", "--dport", str(server), "-j", "DROP")
    use_config(CLIENT)
    start = time.monotonic()
    assert exchange(server) == ("kernel", b"kernel:ping")
    assert time.monotonic() - start >= 0.25  # the kernel started after the delay, not before
    counts = dmm.runtime.get().negotiator.counts()
    assert counts["fallbacks"] == 1 and counts["races_won_kernel"] == 1
    fact = dmm.runtime.get().negotiator.rd.facts(SRV_IP, server)["fillp"]
    assert not fact.speaks
    # Known now: the next connections go straight to the kernel.
    for _ in range(3):
        assert exchange(server)[0] == "kernel"
    assert dmm.runtime.get().negotiator.counts()["races_started"] == 1


def test_thirty_percent_udp_loss_still_gives_a_working_connection(server):
    iptables("-A", "INPUT", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j", "DROP")
    iptables("-A", "OUTPUT", "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j", "DROP")
    use_config(CLIENT)
    payload = os.urandom(200_000)
    for _ in range(5):
        dmm.runtime.get().negotiator.rd.forget_peers()
        stack, data = exchange(server, payload, timeout=20)
        assert stack in ("wan", "kernel") and data == stack.encode() + b":" + payload


def test_everything_dropped_ends_in_timeout_error_within_the_socket_timeout(server):
    iptables("-A", "INPUT", "-p", "udp", "--dport", str(server), "-j", "DROP")
    iptables("-A", "INPUT", "-p", "tcp", "--dport", str(server), "-j", "DROP")
    use_config(CLIENT)
    c = dsocket.socket()
    c.settimeout(1.0)
    fd = c.fileno()
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        c.connect((SRV_IP, server))
    assert 0.9 <= time.monotonic() - start < 5
    assert c.fileno() == fd
    c.close()
    assert eventually(lambda: dsocket.stack_counters()["wan"]["connections"] == 0)
