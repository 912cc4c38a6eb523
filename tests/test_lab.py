"""The network lab: emulated links between namespaces, profiles and the CLI.

Tests that build namespaces need root (CAP_NET_ADMIN) and skip without it.
Every lab gets a random tag, and each test checks it left no namespace behind.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest

from dmm.lab import Lab, LabError
from dmm.lab.netns import list_netns, route_congctl

needs_root = pytest.mark.needs_root("CAP_NET_ADMIN, for network namespaces and TAP devices")

ECHO_SERVER = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7007))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

ECHO_SERVER6 = ECHO_SERVER.replace("AF_INET", "AF_INET6").replace('"0.0.0.0"', '"::"')

# Sends COUNT probes GAP seconds apart without waiting for replies, then
# prints the round-trip times (ms) of those that came back, as JSON.
UDP_PING = """
import json, socket, struct, sys, time
dst, count, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
rtts, t0 = [], time.monotonic()
def drain():
    while True:
        try:
            data = s.recv(64)
        except BlockingIOError:
            return
        rtts.append((time.monotonic() - struct.unpack("d", data)[0]) * 1000)
for i in range(count):
    while time.monotonic() < t0 + i * gap:
        drain()
        time.sleep(0.0002)
    s.sendto(struct.pack("d", time.monotonic()), (dst, 7007))
end = time.monotonic() + 1.0
while time.monotonic() < end:
    drain()
    time.sleep(0.001)
print(json.dumps(rtts))
"""

# Receives one TCP connection and prints how many bytes it carried.
TCP_SINK = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))
s.listen(1)
c, _ = s.accept()
n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
print(n)
"""

TCP_SEND = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5001))
t = time.monotonic()
s.sendall(b"x" * int(sys.argv[2]))
s.close()
print(time.monotonic() - t)
"""


def udp_ping(lab: Lab, client: str, count: int = 300, gap: float = 0.005, family: int = 4) -> list[float]:
    """Round-trip times (ms) of UDP probes from ``client`` to the server."""
    lab.popen("server", [sys.executable, "-c", ECHO_SERVER6 if family == 6 else ECHO_SERVER])
    time.sleep(0.3)
    out = lab.exec(
        client,
        [sys.executable, "-c", UDP_PING, lab.address("server", family), str(count), str(gap)],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return json.loads(out.stdout)


def lab_namespaces(tag: str) -> list[str]:
    return [n for n in list_netns() if n.startswith(f"dmmlab-{tag}-")]


def test_bad_params_give_clear_errors():
    # Checked before anything is created: no root needed.
    with pytest.raises(ValueError, match=r"loss must be in \[0, 1\], got 1.5"):
        Lab(None, "loss=1.5").start()
    with pytest.raises(ValueError, match="delay needs a unit"):
        Lab("internet", "delay=40").start()
    with pytest.raises(ValueError, match="unknown parameter 'speed'"):
        Lab(None, "speed=1gbit").start()
    with pytest.raises(ValueError, match="unknown lab profile 'nope'"):
        Lab("nope")


def test_core_parse_params_normalizes():
    from dmm._core import Linkem

    ab, ba = Linkem.parse_params("delay=40ms,loss=1%,ba.rate=10mbit,seed=5")
    assert "delay=40000us" in ab and "rate=unlimited" in ab and "seed=5" in ab
    assert "rate=10000000bit" in ba and "seed=6" in ba
    with pytest.raises(ValueError, match="rate: unknown unit"):
        Linkem.parse_params("rate=10parsecs")


@needs_root
def test_internet_profile_rtt_and_loss():
    lab = Lab("internet")
    with lab:
        rtts = udp_ping(lab, "client", count=300)
        stats = lab.stats()["client"]
    assert lab_namespaces(lab.tag) == []
    median = statistics.median(rtts)
    # 2 x 40 ms, plus the emulator's and Python's own sub-ms costs.
    assert 80.0 <= median < 83.0, f"median RTT {median:.2f} ms"
    lost = 300 - len(rtts)
    # 1% each way: about 6 of 300 expected; seeded, so stable, but allow a range.
    assert 1 <= lost <= 20, f"lost {lost} of 300"
    # The links carry little else (a few IPv6 MLD reports at start).
    assert lost <= stats["up"]["dropped_loss"] + stats["down"]["dropped_loss"] <= lost + 4
    assert stats["up"]["frames_in"] >= 300


@needs_root
def test_internet_profile_tcp_transfer():
    size = 4_000_000
    with Lab("internet") as lab:
        sink = lab.popen("server", [sys.executable, "-c", TCP_SINK], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        sent = lab.exec("client", [sys.executable, "-c", TCP_SEND, lab.address("server"), str(size)],
                        capture_output=True, text=True, check=True, timeout=120)
        received = int(sink.communicate(timeout=30)[0])
        up = lab.stats()["client"]["up"]
    assert received == size
    # 4 MB over 100 Mbit/s cannot take less than 0.32 s plus the handshake.
    assert float(sent.stdout) > 0.32
    assert up["dropped_loss"] > 0, up
    assert up["bytes_out"] > size


@needs_root
def test_set_params_while_running():
    with Lab(None, "delay=20ms") as lab:
        before = statistics.median(udp_ping(lab, "client", count=50))
        lab.set_params("client", "delay=2ms")
        assert "delay=2000us" in lab.params("client")["up"]
        lab.set_params("client", "loss=0.5", direction="up")
        assert "delay=2000us" in lab.params("client")["up"], "update keeps other fields"
        assert "loss=0.5" in lab.params("client")["up"]
        assert "loss=0," in lab.params("client")["down"]
        lab.set_params("client", "loss=0", direction="up")
        after = statistics.median(udp_ping(lab, "client", count=50))
        with pytest.raises(ValueError, match="loss must be"):
            lab.set_params("client", "loss=2")
        with pytest.raises(KeyError):
            lab.set_params("nolink", "loss=0")
    assert 40 <= before < 43
    assert 4 <= after < 6


@needs_root
def test_filesync_star():
    with Lab("filesync") as lab:
        assert lab.nodes == ["server", "internet", "inter-dc", "intra-dc"]
        assert len({lab.address(n) for n in lab.nodes}) == 4
        lab.popen("server", [sys.executable, "-c", ECHO_SERVER])
        time.sleep(0.3)
        medians = {}
        for client in ["internet", "inter-dc", "intra-dc"]:
            out = lab.exec(client, [sys.executable, "-c", UDP_PING, lab.address("server"), "40", "0.005"],
                           capture_output=True, text=True, check=True, timeout=60)
            medians[client] = statistics.median(json.loads(out.stdout))
        tag = lab.tag
    assert lab_namespaces(tag) == []
    assert 80 <= medians["internet"] < 83
    assert 20 <= medians["inter-dc"] < 23
    assert 0.2 <= medians["intra-dc"] < 2


@needs_root
def test_cleanup_after_an_exception():
    lab = Lab("perfect")
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            assert len(lab_namespaces(lab.tag)) == 2
            lab.popen("client", ["sleep", "60"])
            raise RuntimeError("boom")
    assert lab_namespaces(lab.tag) == []
    assert lab.stats() == {}
    with pytest.raises(LabError, match="not running"):
        lab.set_params("client", "loss=0")


@needs_root
def test_cli_up_exec_status_down(tmp_path):
    env = dict(os.environ, DMM_LAB_DIR=str(tmp_path))
    name = f"t{os.getpid()}"

    def cli(*args, check=True):
        return subprocess.run([sys.executable, "-m", "dmm.lab.cli", "lab", *args, "--name", name],
                              capture_output=True, text=True, env=env, check=check, timeout=60)

    bad = cli("up", "internet", "--params", "loss=1.5", check=False)
    assert bad.returncode == 2 and "loss must be in [0, 1], got 1.5" in bad.stderr
    try:
        cli("up", "internet", "--params", "loss=0")
        state = json.loads((tmp_path / f"{name}.json").read_text())
        tag = state["tag"]
        assert len(lab_namespaces(tag)) == 2
        again = cli("up", "internet", check=False)
        assert again.returncode == 1 and "already up" in again.stderr
        # `lab exec` must come before the `--name` option here, so pass it first.
        out = subprocess.run([sys.executable, "-m", "dmm.lab.cli", "lab", "exec", "--name", name, "client",
                              "--", "ip", "-br", "addr"], capture_output=True, text=True, env=env, check=True)
        assert "10.201.1.2/24" in out.stdout
        status = cli("status", "--json")
        assert '"frames_in"' in status.stdout
        cli("set", "client", "delay=1ms", "--direction", "up")
    finally:
        down = cli("down", check=False)
    assert down.returncode == 0, down.stderr
    assert lab_namespaces(tag) == []
    assert not (tmp_path / f"{name}.json").exists()
    assert "not up" in cli("status", check=False).stdout


@needs_root
def test_serve_cleans_up_on_sigint(tmp_path):
    env = dict(os.environ, DMM_LAB_DIR=str(tmp_path))
    name = f"s{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-m", "dmm.lab.cli", "lab", "serve", "perfect", "--name", name],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state_path = tmp_path / f"{name}.json"
        deadline = time.monotonic() + 30
        while not state_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        tag = json.loads(state_path.read_text())["tag"]
        assert len(lab_namespaces(tag)) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert lab_namespaces(tag) == []
    assert not state_path.exists()


@needs_root
def test_ipv6_across_the_link():
    with Lab(None, "delay=5ms") as lab:
        assert lab.address("server", 6) == "fd00:201::1"
        assert lab.address("client", 6) == "fd00:201::1:2"
        rtts = udp_ping(lab, "client", count=50, family=6)
    assert len(rtts) == 50
    assert 10 <= statistics.median(rtts) < 12


@needs_root
def test_server_address_per_link_device_drops_and_route_congctl():
    with Lab("filesync") as lab:
        assert [lab.server_address(c) for c in lab.links] == ["10.201.1.1", "10.201.2.1", "10.201.3.1"]
        assert lab.server_address("internet", 6) == "fd00:201::1:1"
        with pytest.raises(KeyError):
            lab.server_address("server")
        lab.popen("server", [sys.executable, "-c", ECHO_SERVER])
        time.sleep(0.3)
        # The internet client reaches the server's address on its link through that link.
        out = lab.exec("internet", [sys.executable, "-c", UDP_PING, "10.201.1.1", "20", "0.005"],
                       capture_output=True, text=True, check=True, timeout=60)
        drops = lab.device_drops()
        route_congctl(lab.netns("internet"), "cubic")
        routes = lab.exec("internet", ["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    assert 80 <= statistics.median(json.loads(out.stdout)) < 83
    assert routes.count("congctl cubic") == 2, routes
    assert set(drops) == {"internet", "inter-dc", "intra-dc"}
    assert all(set(d) == {"client", "server"} and min(d.values()) >= 0 for d in drops.values())
