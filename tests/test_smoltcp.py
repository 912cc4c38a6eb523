"""dmm sockets on smoltcp instances over real TAP devices and namespaces.

Each test's smoltcp instance creates its TAP device in this process's
namespace; the test then moves the device's host side into a namespace of
its own (``peer``) and gives it the gateway address, so kernel TCP in that
namespace talks to the user-space stack through the TAP, as a LAN host would.
"""

import contextlib
import errno
import hashlib
import itertools
import os
import selectors
import subprocess
import sys
import threading
import time

import pytest

import dmm.selectors as dselectors
import dmm.socket as dsocket
from dmm.usecases import dualmode_lab
from dmm.lab import netns

from conftest import use_config

pytestmark = pytest.mark.needs_root("TAP devices and network namespaces")

_ids = itertools.count()


def unique(prefix):
    return f"{prefix}{os.getpid() % 1000}x{next(_ids)}"


class Peer:
    """A namespace holding the host side of a smoltcp instance's TAP device."""

    def __init__(self, device, subnet):
        self.ns = unique("dmmtp")
        self.device = device
        self.subnet = subnet  # e.g. "10.77.3": the peer is .1, smoltcp .2
        netns.add_netns(self.ns)

    @property
    def address(self):
        return f"{self.subnet}.1"

    def take_device(self):
        """Moves the TAP's host side in here and addresses it."""
        deadline = time.monotonic() + 5
        while True:
            try:
                netns.ip("link", "show", "dev", self.device)
                break
            except netns.LabError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        netns.ip("link", "set", "dev", self.device, "netns", self.ns)
        netns.ip("addr", "add", f"{self.address}/24", "dev", self.device, netns=self.ns)
        netns.ip("link", "set", "dev", self.device, "up", netns=self.ns)

    @contextlib.contextmanager
    def serve(self, code):
        """Runs ``code`` (a server that prints its port) in the namespace on
        the peer address; yields the process and the port, kills it after."""
        proc = self.popen(code, self.address)
        try:
            yield proc, int(proc.stdout.readline())
        finally:
            proc.kill()
            proc.wait()

    def popen(self, code, *args, **kw):
        return subprocess.Popen(netns.exec_argv(self.ns, [sys.executable, "-c", code, *args]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def run(self, code, *args, timeout=120):
        return subprocess.run(netns.exec_argv(self.ns, [sys.executable, "-c", code, *args]),
                              capture_output=True, text=True, timeout=timeout)

    def close(self):
        netns.delete_netns(self.ns)


def smol_config(device, subnet, extra="", stack_extra=""):
    return f"""
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "lan0"
kind = "smoltcp"
device = "tap:{device}"
address = "{subnet}.2/24"
gateway = "{subnet}.1"
{stack_extra}

[[route]]
to = "{subnet}.0/24"
stacks = ["lan0"]

[listen]
stacks = ["lan0"]
{extra}"""


@contextlib.contextmanager
def lan_peer(prefix="dmmt", stack_extra=""):
    """Configures a smoltcp instance ``lan0`` (with ``stack_extra`` lines in
    its table) and yields the :class:`Peer` namespace holding its TAP's
    host side; removes both after."""
    n = next(_ids)
    device = unique(prefix)
    subnet = f"10.77.{(os.getpid() + n) % 200 + 20}"
    peer = Peer(device, subnet)
    try:
        use_config(smol_config(device, subnet, stack_extra=stack_extra))
        peer.take_device()
        yield peer
    finally:
        import dmm.runtime

        dmm.runtime.reset()
        peer.close()
        try:
            netns.ip("link", "del", "dev", device)
        except netns.LabError:
            pass


@pytest.fixture
def lan():
    """A smoltcp instance ``lan0`` whose TAP's host side is in a namespace."""
    with lan_peer() as peer:
        yield peer


SINK = r"""
import hashlib, socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
h = hashlib.sha256(); n = 0
while True:
    b = conn.recv(1 << 20)
    if not b:
        break
    h.update(b); n += len(b)
conn.sendall(h.hexdigest().encode())
conn.close()
print(n, flush=True)
"""

SOURCE = r"""
import hashlib, socket, sys
host, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port), timeout=60)
block = bytes(range(256)) * 4096
sent = 0
while sent < size:
    c.sendall(block); sent += len(block)
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode(), flush=True)
"""


def expected_digest(size):
    block = bytes(range(256)) * 4096
    h = hashlib.sha256()
    for _ in range(size // len(block)):
        h.update(block)
    return h.hexdigest()


def test_dmm_client_on_smoltcp_to_kernel_server(lan):
    with lan.serve(SINK) as (server, port):
        size = 100 * 2**20
        block = bytes(range(256)) * 4096
        c = dsocket.create_connection((lan.address, port), timeout=60)
        with c:
            assert c.dmm_stack == "lan0"
            assert c.getsockname()[0] == lan.subnet + ".2"
            for _ in range(size // len(block)):
                c.sendall(block)
            c.shutdown(dsocket.SHUT_WR)
            digest = b""
            while len(digest) < 64:
                part = c.recv(64)
                if not part:
                    break
                digest += part
            counters = c.dmm_counters()
        assert digest.decode() == expected_digest(size)
        assert int(server.stdout.readline()) == size
        assert counters.get("bytes_sent", size) >= size


def test_kernel_client_in_namespace_to_dmm_server_on_smoltcp(lan):
    srv = dsocket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    assert srv.dmm_stack == "lan0"
    size = 100 * 2**20
    client = lan.popen(SOURCE, lan.subnet + ".2", str(port), str(size))
    try:
        srv.settimeout(30)
        conn, peer = srv.accept()
        assert peer[0] == lan.address and conn.dmm_stack == "lan0"
        h = hashlib.sha256()
        n = 0
        buf = bytearray(1 << 20)
        with conn:
            conn.settimeout(60)
            while True:
                k = conn.recv_into(buf)
                if not k:
                    break
                h.update(memoryview(buf)[:k])
                n += k
            conn.sendall(h.hexdigest().encode())
        out, err = client.communicate(timeout=60)
        assert n == size and h.hexdigest() == expected_digest(size)
        assert out.strip() == expected_digest(size), err
    finally:
        client.kill()
        srv.close()


def test_errors_match_kernel_semantics(lan):
    # Nothing listens on this port in the peer namespace: the kernel answers RST.
    c = dsocket.socket()
    c.settimeout(5)
    with c, pytest.raises(ConnectionRefusedError):
        c.connect((lan.address, 9))
    # Non-blocking connect: EINPROGRESS, then the refusal shows in SO_ERROR.
    c = dsocket.socket()
    c.setblocking(False)
    with c:
        assert c.connect_ex((lan.address, 9)) == errno.EINPROGRESS
        deadline = time.monotonic() + 5
        while (err := c.getsockopt(dsocket.SOL_SOCKET, dsocket.SO_ERROR)) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert err == errno.ECONNREFUSED
    # Non-blocking recv with nothing to read: EAGAIN.
    with lan.serve(SINK) as (server, port):
        c = dsocket.create_connection((lan.address, port), timeout=5)
        with c:
            c.setblocking(False)
            with pytest.raises(BlockingIOError):
                c.recv(10)


def test_selectors_server_on_smoltcp(lan):
    srv = dsocket.socket()
    srv.bind(("0.0.0.0", 0))
    srv.listen()
    srv.setblocking(False)
    port = srv.getsockname()[1]
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    client = lan.popen(r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
c.sendall(b"hello over tap")
print(c.recv(100).decode(), flush=True)
""", lan.subnet + ".2", str(port))
    try:
        events = sel.select(10)
        assert events and events[0][0].fileobj is srv
        conn, _ = srv.accept()
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 14 and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                if key.fileobj is conn:
                    got += conn.recv(100)
        assert got == b"hello over tap"
        conn.setblocking(True)
        conn.sendall(got.upper())
        out, err = client.communicate(timeout=10)
        assert out.strip() == "HELLO OVER TAP", err
        conn.close()
    finally:
        client.kill()
        sel.close()
        srv.close()


# Accepts one connection, waits for a line on stdin, then reads it all.
SLOW_SINK = r"""
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
sys.stdin.readline()
n = 0
while data := conn.recv(1 << 20):
    n += len(data)
print(n, flush=True)
"""


def test_write_readiness_on_smoltcp_is_exact(lan):
    proc = lan.popen(SLOW_SINK, lan.address, stdin=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        c = dsocket.create_connection((lan.address, port), timeout=10)
        with c, dselectors.DefaultSelector() as sel:
            assert c.dmm_stack == "lan0"
            sel.register(c, selectors.EVENT_WRITE)
            assert sel.select(5), "a fresh connection is writable"
            c.setblocking(False)
            sent, block = 0, b"z" * 65536
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until the peer's window and our buffer are full
                before = sent
                while True:
                    try:
                        sent += c.send(block)
                    except BlockingIOError:
                        break
                if sent == before:
                    break
                time.sleep(0.3)
            assert sel.select(0.3) == [], "full send buffer polled writable"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert sel.select(10), "never writable again after the peer read"
            c.setblocking(True)
            c.shutdown(dsocket.SHUT_WR)
            assert int(proc.stdout.readline()) == sent
    finally:
        proc.kill()
        proc.wait()


def test_removing_the_tap_device_fails_live_sockets_and_spares_the_process(lan):
    with lan.serve(r"""
import socket, sys, time
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
time.sleep(60)
""") as (server, port):
        c = dsocket.create_connection((lan.address, port), timeout=10)
        with c:
            c.settimeout(None)
            errors = []

            def reader():
                try:
                    c.recv(100)
                except OSError as exc:
                    errors.append(exc)

            t = threading.Thread(target=reader)
            t.start()
            time.sleep(0.2)
            netns.ip("link", "del", "dev", lan.device, netns=lan.ns)
            t.join(10)
            assert not t.is_alive(), "recv still blocked 10 s after the device went away"
            assert errors and errors[0].errno is not None
            with pytest.raises(OSError):
                c.sendall(b"x" * 100)
        # The process is fine: kernel sockets work, new smoltcp sockets fail cleanly.
        a, b = dsocket.socketpair()
        with a, b:
            a.sendall(b"ok")
            assert b.recv(2) == b"ok"
        d = dsocket.socket()
        d.settimeout(5)
        with d, pytest.raises(OSError):
            d.connect((lan.address, port))


def test_unmodified_http_server_answers_lan_on_smoltcp_and_wan_on_kernel(tmp_path):
    """Use case 2: one listening socket, LAN clients through the user-space
    stack, the others through the kernel, chosen by the accept policy."""
    res = dualmode_lab.run(tmp_path, requests=5, page_bytes=10_000)
    for side in ("lan", "wan"):
        assert res[side]["status"] == 200 and res[side]["bytes"] == 10_000, (side, res[side])
        assert len(res[side]["seconds"]) == 5
    counts = res["stats"]
    assert counts is not None, f"the server wrote no --stats file; its stderr:\n{res['server_stderr'][-3000:]}"
    # Each request was served by the stack its accept rule names.
    assert counts["lan0"]["accepts"] >= 5 and counts["kernel"]["accepts"] >= 5
    assert counts["lan0"]["policy_refused"] == 0 and counts["kernel"]["policy_refused"] == 0


def test_link_down_for_a_while_loses_frames_not_the_connection(lan):
    with lan.serve(SINK) as (server, port):
        size = 64 * 2**20
        block = bytes(range(256)) * 4096
        c = dsocket.create_connection((lan.address, port), timeout=60)
        errors = []

        def send_all():
            try:
                for _ in range(size // len(block)):
                    c.sendall(block)
                c.shutdown(dsocket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        with c:
            sender = threading.Thread(target=send_all)
            sender.start()
            time.sleep(0.05)
            netns.ip("link", "set", "dev", lan.device, "down", netns=lan.ns)
            # Frames sent now fail with EIO: lost, not fatal. If the window
            # was already in flight when the link went down, the first loss
            # is smoltcp's retransmission after its 1 s minimum RTO, so keep
            # the link down until a frame has been lost.
            deadline = time.monotonic() + 10
            while dsocket.stack_counters()["lan0"]["tx_dropped"] == 0:
                assert time.monotonic() < deadline, "no frame was sent in 10 s of link down"
                time.sleep(0.05)
            time.sleep(0.2)
            netns.ip("link", "set", "dev", lan.device, "up", netns=lan.ns)
            sender.join(60)
            assert not errors and not sender.is_alive()
            digest = c.recv(64)
        assert digest.decode() == expected_digest(size)
        assert dsocket.stack_counters()["lan0"]["down"] == 0


def test_sendall_timeout_covers_the_whole_call(lan):
    with lan.serve(r"""
import socket, sys, time
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
while conn.recv(65536):
    time.sleep(0.02)
""") as (trickle, port):
        c = dsocket.create_connection((lan.address, port), timeout=10)
        with c:
            c.settimeout(0.5)
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                c.sendall(b"x" * (64 << 20))  # ~20 s of trickle
            assert time.monotonic() - started < 10


UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(data.upper(), addr)
"""


def test_sendmsg_with_an_address_routes_like_sendto(lan):
    """The first sendmsg(..., address) of an unrouted datagram socket routes
    it (here to smoltcp), and the datagram leaves through that stack;
    recvmsg and recvmsg_into read its answers."""
    with lan.serve(UDP_ECHO) as (_server, port):
        s = dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM)
        s.settimeout(5)
        with s:
            assert s.sendmsg([b"he", memoryview(b"llo")], [], 0, (lan.address, port)) == 5
            assert s.dmm_stack == "lan0"
            data, anc, flags, addr = s.recvmsg(100)
            assert (data, anc, flags, addr) == (b"HELLO", [], 0, (lan.address, port))
            s.sendmsg([b"again"], (), 0, (lan.address, port))
            a, b = bytearray(2), bytearray(10)
            n, anc, flags, addr = s.recvmsg_into([a, b])
            assert n == 5 and bytes(a) + bytes(b[:3]) == b"AGAIN" and addr == (lan.address, port)
            with pytest.raises(OSError) as info:
                s.sendmsg([b"x"], [(0, 0, b"")], 0, (lan.address, port))
            assert info.value.errno == errno.EOPNOTSUPP


def test_a_connection_reports_its_handshake_rtt_for_path_knowledge(lan):
    from dmm.rd.paths import sample_from_counters

    with lan.serve(SINK) as (server, port):
        c = dsocket.create_connection((lan.address, port), timeout=10)
        with c:
            counters = c.dmm_counters()
            c.sendall(b"x")
            c.shutdown(dsocket.SHUT_WR)
            assert len(c.recv(64)) > 0
        assert int(server.stdout.readline()) == 1
    # One round trip over a TAP on this host: more than nothing, far less
    # than any WAN's.
    assert 0 < counters["min_rtt_us"] < 50_000, counters
    sample = sample_from_counters(counters, 0.1, "lan0")
    assert sample.rtt_ms == counters["min_rtt_us"] / 1000
