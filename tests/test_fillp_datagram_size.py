"""FillP datagram sizes: from the route to each peer, or configured.

Real UDP: over loopback (64 KiB MTU), over veth pairs of several MTUs
into a namespace where a second process runs the FillP server, and through
a router namespace onto a smaller link.
"""

import hashlib
import itertools
import os
import subprocess
import sys
import textwrap
import threading

import pytest

import dmm.socket as dsocket
from dmm import config
from dmm.lab import netns

from conftest import FILLP_LOOPBACK, FILLP_TO, ROOT, use_config

# A FillP server that echoes the sha256 of what it receives, then reports
# its connection's datagram size.
SINK = r"""
import hashlib, sys
import dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<sink>"))
srv = s.create_server((sys.argv[2], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
h = hashlib.sha256()
while True:
    b = conn.recv(1 << 20)
    if not b:
        break
    h.update(b)
conn.sendall(h.hexdigest().encode())
print(conn.dmm_counters()["mtu"], flush=True)
conn.close()
"""

# A FillP server that sends back what it receives, then reports its
# connection's datagram size. The data lives in this process until the peer
# has acknowledged it, so it waits for that before exiting.
ECHO = r"""
import sys, time
import dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<echo>"))
srv = s.create_server((sys.argv[2], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
data = bytearray()
while b := conn.recv(1 << 20):
    data += b
conn.sendall(data)
conn.shutdown(s.SHUT_WR)
deadline = time.monotonic() + 30
while conn.dmm_counters()["bytes_acked"] < len(data) and time.monotonic() < deadline:
    time.sleep(0.01)
print(conn.dmm_counters()["mtu"], flush=True)
conn.close()
"""

_ids = itertools.count()


def send_and_check(c, size=4 << 20):
    """Sends `size` random bytes on `c`, half-closes, checks the sha256 reply."""
    data = os.urandom(size)
    c.sendall(data)
    c.shutdown(dsocket.SHUT_WR)
    reply = b""
    while len(reply) < 64:
        part = c.recv(64)
        if not part:
            break
        reply += part
    assert reply.decode() == hashlib.sha256(data).hexdigest()


def sink_server(argv_prefix, toml, address, script=SINK):
    """Starts `script` (SINK by default; under `argv_prefix`, e.g. `ip netns
    exec`); returns it and its port."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "python"))
    proc = subprocess.Popen([*argv_prefix, sys.executable, "-c", script, textwrap.dedent(toml), address],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        raise AssertionError(f"the sink did not start: {proc.communicate()[1][-2000:]}")
    return proc, int(line)


def finish(proc):
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    return int(out.split()[-1])


def test_loopback_connections_use_the_64k_route():
    use_config(FILLP_LOOPBACK.format(mode="bbr"))
    srv = dsocket.create_server(("127.0.0.1", 0))
    got = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            h = hashlib.sha256()
            while b := conn.recv(1 << 20):
                h.update(b)
            conn.sendall(h.hexdigest().encode())
            got["mtu"] = conn.dmm_counters()["mtu"]

    t = threading.Thread(target=serve)
    t.start()
    with srv, dsocket.create_connection(srv.getsockname()) as c:
        assert c.dmm_stack == "wan"
        send_and_check(c, 16 << 20)
        client_mtu = c.dmm_counters()["mtu"]
    t.join(30)
    # The route over lo has the largest IP MTU, 65535: 65507 bytes of UDP
    # payload after the IPv4 and UDP headers.
    assert client_mtu == 65507 and got["mtu"] == 65507


def test_ipv6_loopback_subtracts_the_ipv6_header():
    use_config(FILLP_TO.format(mode="bbr", extra='address = "::"', prefix="::1/128"))
    srv = dsocket.create_server(("::1", 0), family=dsocket.AF_INET6)
    got = {}

    def serve():
        conn, _ = srv.accept()
        with conn:
            got["n"] = sum(len(b) for b in iter(lambda: conn.recv(1 << 20), b""))
            got["mtu"] = conn.dmm_counters()["mtu"]

    t = threading.Thread(target=serve)
    t.start()
    with srv, dsocket.create_connection(("::1", srv.getsockname()[1])) as c:
        assert c.dmm_stack == "wan"
        c.sendall(os.urandom(1 << 20))
        c.shutdown(dsocket.SHUT_WR)
        client_mtu = c.dmm_counters()["mtu"]
        t.join(30)
    # lo's IPv6 route MTU is 65536 (IPv6 does not cap it at 65535 as IPv4
    # does), less 40 bytes of IPv6 and 8 of UDP header.
    assert got == {"n": 1 << 20, "mtu": 65488} and client_mtu == 65488


def test_a_configured_size_wins_over_the_route_and_the_smaller_side_wins():
    # The server (this process) sizes from the route; the client, in another
    # process, is configured for 1400 bytes: the connection uses 1400.
    use_config(FILLP_TO.format(mode="bbr", extra="", prefix="127.0.0.0/8"))
    srv = dsocket.create_server(("127.0.0.1", 0))
    client = r"""
import sys, dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<client>"))
c = s.create_connection(("127.0.0.1", int(sys.argv[2])))
c.sendall(b"x" * 300000)
print(c.dmm_counters()["mtu"], flush=True)
c.close()
"""
    toml = FILLP_TO.format(mode="bbr", extra="datagram_size = 1400", prefix="127.0.0.0/8")
    proc = subprocess.Popen([sys.executable, "-c", client, toml, str(srv.getsockname()[1])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    with srv, conn:
        n = 0
        while b := conn.recv(1 << 16):
            n += len(b)
        server_mtu = conn.dmm_counters()["mtu"]
    assert n == 300000
    assert finish(proc) == 1400 and server_mtu == 1400


@pytest.mark.parametrize("link_mtu, expected", [(9000, 8972), (1500, 1400), (1280, 1252)])
def test_veth_routes_size_the_datagrams(link_mtu, expected):
    n = next(_ids)
    tag = f"dmmd{os.getpid() % 10000}x{n}"
    ns, host, peer = f"{tag}ns", f"{tag}h", f"{tag}p"
    subnet = f"10.203.{n}"
    netns.add_netns(ns)
    try:
        netns.ip("link", "add", host, "mtu", str(link_mtu), "type", "veth", "peer", "name", peer, "mtu", str(link_mtu))
        netns.ip("link", "set", peer, "netns", ns)
        netns.ip("addr", "add", f"{subnet}.1/24", "dev", host)
        netns.ip("link", "set", host, "up")
        netns.ip("addr", "add", f"{subnet}.2/24", "dev", peer, netns=ns)
        netns.ip("link", "set", peer, "up", netns=ns)
        toml = FILLP_TO.format(mode="bbr", extra="", prefix=f"{subnet}.0/24")
        proc, port = sink_server(netns.exec_argv(ns, []), toml, f"{subnet}.2")
        use_config(toml)
        with dsocket.create_connection((f"{subnet}.2", port), timeout=30) as c:
            assert c.dmm_stack == "wan"
            send_and_check(c)
            client_mtu = c.dmm_counters()["mtu"]
        assert client_mtu == expected and finish(proc) == expected
    finally:
        netns.delete_netns(ns)
        try:
            netns.ip("link", "del", host)
        except netns.LabError:
            pass  # went with the namespace's peer


@pytest.mark.parametrize("value, message", [
    ("100", "expected \"auto\" or bytes"),
    ("65508", "from 512 to 65507"),
    ("true", "got True"),
    ('"big"', "got 'big'"),
])
def test_bad_datagram_size_is_refused_with_its_line(value, message):
    text = f'[[stack]]\nname = "w"\nkind = "fillp"\ndatagram_size = {value}\n'
    with pytest.raises(config.ConfigError, match=message) as info:
        config.parse(text, "x.toml")
    assert info.value.line == 4 and info.value.field.endswith("datagram_size")


def test_datagram_size_is_a_fillp_key_only():
    with pytest.raises(config.ConfigError, match="does not apply to a kernel stack"):
        config.parse('[[stack]]\nname = "k"\nkind = "kernel"\ndatagram_size = 1400\n', "x.toml")
    spec = config.parse('[[stack]]\nname = "w"\nkind = "fillp"\ndatagram_size = 9000\n', "x.toml").stacks[0]
    assert spec.datagram_size == 9000


def frag_creates(ns):
    """IPv4 fragments the kernel of namespace `ns` has made."""
    out = subprocess.run(netns.exec_argv(ns, ["cat", "/proc/net/snmp"]), capture_output=True, text=True,
                         check=True).stdout
    head, values = [line.split() for line in out.splitlines() if line.startswith("Ip:")][:2]
    return int(values[head.index("FragCreates")])


def test_a_smaller_link_further_on_is_crossed_by_fragments_not_a_reset():
    # A jumbo first hop (MTU 9000) to a router, then Ethernet (1500) to the
    # server. The client starts with 8972-byte datagrams; the router drops
    # them and answers "fragmentation needed", which lowers the path MTU:
    # the kernel fragments later datagrams, the protocol repairs the
    # dropped ones, and the connection survives the ICMP error. The server
    # agreed to 8972 but its own route back is Ethernet: it sends 1400-byte
    # datagrams, so nothing it sends is fragmented.
    n = next(_ids)
    tag = f"dmmf{os.getpid() % 10000}x{n}"
    rtr, srv_ns = f"{tag}r", f"{tag}s"
    host, r_in, r_out, s_in = f"{tag}h", f"{tag}a", f"{tag}b", f"{tag}c"
    near, far = f"10.206.{n}", f"10.207.{n}"
    netns.add_netns(rtr)
    netns.add_netns(srv_ns)
    try:
        netns.ip("link", "add", host, "mtu", "9000", "type", "veth", "peer", "name", r_in, "mtu", "9000")
        netns.ip("link", "set", r_in, "netns", rtr)
        netns.ip("addr", "add", f"{near}.1/24", "dev", host)
        netns.ip("link", "set", host, "up")
        netns.ip("addr", "add", f"{near}.2/24", "dev", r_in, netns=rtr)
        netns.ip("link", "set", r_in, "up", netns=rtr)
        netns.ip("link", "add", r_out, "type", "veth", "peer", "name", s_in, netns=rtr)
        netns.ip("link", "set", s_in, "netns", srv_ns, netns=rtr)
        netns.ip("addr", "add", f"{far}.1/24", "dev", r_out, netns=rtr)
        netns.ip("link", "set", r_out, "up", netns=rtr)
        netns.ip("addr", "add", f"{far}.2/24", "dev", s_in, netns=srv_ns)
        netns.ip("link", "set", s_in, "up", netns=srv_ns)
        netns.ip("route", "add", "default", "via", f"{far}.1", netns=srv_ns)
        netns.sysctl(rtr, "net.ipv4.ip_forward", "1")
        netns.ip("route", "add", f"{far}.0/24", "via", f"{near}.2")
        toml = FILLP_TO.format(mode="bbr", extra="", prefix=f"{far}.0/24")
        proc, port = sink_server(netns.exec_argv(srv_ns, []), toml, f"{far}.2", ECHO)
        use_config(toml)
        data = os.urandom(8 << 20)
        with dsocket.create_connection((f"{far}.2", port), timeout=30) as c:
            assert c.dmm_stack == "wan"
            c.sendall(data)
            c.shutdown(dsocket.SHUT_WR)
            back = bytearray()
            while b := c.recv(1 << 20):
                back += b
            client_mtu = c.dmm_counters()["mtu"]
        assert back == data
        assert client_mtu == 8972 and finish(proc) == 1400
        assert dsocket.stack_counters()["wan"]["icmp_errors"] >= 1
        assert frag_creates(srv_ns) == 0
    finally:
        try:
            netns.ip("route", "del", f"{far}.0/24")
        except netns.LabError:
            pass  # gone with the device
        netns.delete_netns(srv_ns)
        netns.delete_netns(rtr)
        try:
            netns.ip("link", "del", host)
        except netns.LabError:
            pass  # went with the router's end
