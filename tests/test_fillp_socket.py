"""dmm.socket sockets routed to a FillP instance: real UDP over loopback."""

import hashlib
import os
import selectors
import signal
import socket as stdsocket
import subprocess
import sys
import threading
import time

import pytest

import dmm.socket as dsocket

from conftest import FILLP_LOOPBACK, FILLP_TO, use_config

@pytest.fixture(params=["bbr"])
def fillp(request):
    return use_config(FILLP_LOOPBACK.format(mode=request.param))


def listener():
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    return srv


def test_listener_and_client_are_on_fillp_with_stable_fds(fillp):
    srv = listener()
    fd = srv.fileno()
    assert srv.dmm_stack == "wan" and srv.fileno() == fd
    port = srv.getsockname()[1]
    c = dsocket.socket()
    cfd = c.fileno()
    c.connect(("127.0.0.1", port))
    conn, peer = srv.accept()
    with srv, c, conn:
        assert c.fileno() == cfd and c.dmm_stack == "wan" and conn.dmm_stack == "wan"
        assert peer == c.getsockname() and c.getpeername()[1] == port
        c.sendall(b"hello fillp")
        assert conn.recv(100) == b"hello fillp"
        conn.sendall(b"back")
        assert c.recv(100) == b"back"


def test_100_mb_with_sha256(fillp):
    srv = listener()
    port = srv.getsockname()[1]
    size = 100 * 1000 * 1000
    block = os.urandom(1 << 20)
    result = {}

    def server():
        conn, _ = srv.accept()
        with conn:
            h = hashlib.sha256()
            buf = bytearray(1 << 18)
            got = 0
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
                got += n
            result["sha"], result["n"] = h.hexdigest(), got
            conn.sendall(h.digest())

    t = threading.Thread(target=server)
    t.start()
    expected = hashlib.sha256()
    with dsocket.create_connection(("127.0.0.1", port)) as c:
        sent = 0
        while sent < size:
            chunk = block[: min(len(block), size - sent)]
            c.sendall(chunk)
            expected.update(chunk)
            sent += len(chunk)
        c.shutdown(stdsocket.SHUT_WR)
        digest = b""
        while len(digest) < 32:
            part = c.recv(32)
            if not part:
                break
            digest += part
        counters = c.dmm_counters()
    t.join(60)
    srv.close()
    assert result["n"] == size and digest == expected.digest()
    assert counters.get("bytes_sent", 0) >= size


def test_selectors_see_readability_through_the_placeholder_fd(fillp):
    srv = listener()
    with srv, selectors.DefaultSelector() as sel:
        sel.register(srv, selectors.EVENT_READ)
        assert sel.select(0) == []
        c = dsocket.create_connection(srv.getsockname())
        assert len(sel.select(5)) == 1  # a pending connection
        conn, _ = srv.accept()
        with c, conn:
            sel.register(conn, selectors.EVENT_READ, "conn")
            time.sleep(0.05)
            assert [k.data for k, _ in sel.select(0)] == []
            c.sendall(b"x")
            assert [k.data for k, _ in sel.select(5)] == ["conn"]
            assert conn.recv(1) == b"x"
            assert [k.data for k, _ in sel.select(0.05)] == []


def test_timeouts_nonblocking_and_eof(fillp):
    srv = listener()
    c = dsocket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    with srv, c, conn:
        conn.settimeout(0.1)
        with pytest.raises(TimeoutError, match="timed out"):
            conn.recv(10)
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.recv(10)
        conn.setblocking(True)
        c.sendall(b"end")
        c.shutdown(stdsocket.SHUT_WR)
        got = b""
        while True:
            part = conn.recv(10)
            if not part:
                break
            got += part
        assert got == b"end"


def test_many_concurrent_connections(fillp):
    srv = listener()
    port = srv.getsockname()[1]
    count = 1000
    accepted = []

    def server():
        for _ in range(count):
            conn, _ = srv.accept()
            accepted.append(conn)

    t = threading.Thread(target=server)
    t.start()
    clients = []
    for i in range(count):
        c = dsocket.socket()
        c.connect(("127.0.0.1", port))
        clients.append(c)
    t.join(120)
    assert len(accepted) == count
    # Every client sends its own message; each arrives once, on one
    # accepted socket. (All clients of an instance share its UDP port, so
    # peer addresses do not tell connections apart: connection IDs do.)
    sent = {f"client {i}".encode() for i in range(count)}
    for i, c in enumerate(clients):
        c.sendall(f"client {i}".encode())
    got = []
    with selectors.DefaultSelector() as sel:
        for conn in accepted:
            sel.register(conn, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while len(got) < count and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                got.append(key.fileobj.recv(100))
                sel.unregister(key.fileobj)
    assert sorted(got) == sorted(sent)
    for s in clients + accepted + [srv]:
        s.close()


PEER = r"""
import sys, time
import dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<peer>"))
c = s.create_connection(("127.0.0.1", int(sys.argv[2])))
c.sendall(b"x" * 100000)
print("sent", flush=True)
time.sleep(60)
"""


def test_peer_killed_mid_transfer_gives_an_error_not_a_hang(fillp):
    srv = listener()
    port = srv.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", PEER, FILLP_LOOPBACK.format(mode="bbr"), str(port)], stdout=subprocess.PIPE, text=True)
    conn, _ = srv.accept()
    assert proc.stdout.readline().strip() == "sent"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    start = time.monotonic()
    with conn, srv, pytest.raises(OSError):
        while True:
            if not conn.recv(65536):
                raise AssertionError("a killed peer must not look like a clean EOF")
            if time.monotonic() - start > 60:
                raise AssertionError("no error within 60 s")
    assert time.monotonic() - start < 60


def test_bad_fillp_config_is_refused():
    from dmm import config
    with pytest.raises(config.ConfigError, match="rate_control"):
        config.parse('[[stack]]\nname = "w"\nkind = "fillp"\nrate_control = "turbo"\n', "x.toml")
    with pytest.raises(config.ConfigError, match="does not apply to a fillp stack"):
        config.parse('[[stack]]\nname = "w"\nkind = "fillp"\nprotocol = "mptcp"\n', "x.toml")


def test_explicit_stack_binds_its_own_port_beside_a_tcp_listener(fillp):
    tcp = dsocket.socket(stack="kernel")
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    port = tcp.getsockname()[1]
    udp = dsocket.socket(stack="wan")
    udp.bind(("127.0.0.1", port))  # the same number, on UDP: no conflict
    udp.listen()
    with tcp, udp:
        assert tcp.dmm_stack == "kernel" and udp.dmm_stack == "wan"
        assert udp.getsockname() == ("127.0.0.1", port)
        with dsocket.create_connection(("127.0.0.1", port)) as c:
            assert c.dmm_stack == "wan"
            conn, _ = udp.accept()
            with conn:
                c.sendall(b"same port")
                assert conn.recv(20) == b"same port"


def test_options_set_before_connect_reach_the_fillp_socket(fillp):
    """SO_LINGER {1, 0} set before routing: close aborts (the peer reads a
    reset) and the client's UDP socket is freed at once."""
    import struct

    srv = listener()
    port = srv.getsockname()[1]
    linger = struct.pack("ii", 1, 0)
    with srv:
        for _ in range(5):
            c = dsocket.socket()
            c.setsockopt(dsocket.SOL_SOCKET, dsocket.SO_LINGER, linger)
            c.connect(("127.0.0.1", port))
            assert c.dmm_stack == "wan"
            assert c.getsockopt(dsocket.SOL_SOCKET, dsocket.SO_LINGER, 8) == linger
            conn, _ = srv.accept()
            c.close()
            with conn:
                conn.settimeout(5)
                with pytest.raises(ConnectionResetError):
                    conn.recv(10)
        deadline = time.monotonic() + 5
        while dsocket.stack_counters()["wan"]["udp_sockets"] > 1:  # the listener's
            assert time.monotonic() < deadline, dsocket.stack_counters()["wan"]
            time.sleep(0.01)


def test_huge_or_odd_arguments_raise_as_the_stdlib_does(fillp):
    """recv(2**62) must not abort the process, a timeout no clock holds must
    not panic: the same exceptions as a kernel socket's, and the connection
    still works afterwards."""
    srv = listener()
    c = dsocket.socket()
    c.connect(("127.0.0.1", srv.getsockname()[1]))
    conn, _ = srv.accept()
    k1, k2 = stdsocket.socketpair()
    with srv, c, conn, k1, k2:
        for sock in (c, k1):
            with pytest.raises(MemoryError):
                sock.recv(2 ** 62)
            with pytest.raises(MemoryError):
                sock.recvfrom(2 ** 62)
            with pytest.raises(OverflowError):
                sock.recv(2 ** 63)
            with pytest.raises(ValueError):
                sock.recv(-1)
            for t in (1e300, float("inf")):
                with pytest.raises(OverflowError):
                    sock.settimeout(t)
            with pytest.raises(ValueError):
                sock.settimeout(float("nan"))
            with pytest.raises(ValueError):
                sock.settimeout(-1)
        # The core socket under dmm's own checks the same way (no panic).
        for t in (1e300, float("inf")):
            with pytest.raises(OverflowError):
                c._dmm_core.settimeout(t)
        with pytest.raises(ValueError):
            c._dmm_core.settimeout(float("nan"))
        with pytest.raises(MemoryError):
            c._dmm_core.recv(2 ** 62)
        # A huge n reads what there is, as the stdlib's does.
        conn.sendall(b"still here")
        c.settimeout(5)
        assert c.recv(2 ** 30) == b"still here"


def test_dup_detach_and_fromfd_are_handles_on_one_connection(fillp):
    """As with kernel sockets: dup() and fromfd() give new handles (new fd
    numbers) on the same connection, detach() hands the fd over and
    socket(fileno=fd) takes it up again, and the connection closes with its
    last handle, not its first."""
    srv = listener()
    c = dsocket.create_connection(srv.getsockname(), timeout=5)
    conn, _ = srv.accept()
    conn.settimeout(5)
    with srv, conn:
        d = c.dup()
        assert d.fileno() != c.fileno() and d.dmm_stack == "wan" and d.gettimeout() == 5
        c.close()
        d.sendall(b"dup")
        assert conn.recv(100) == b"dup"
        fd = d.detach()
        assert d.fileno() == -1
        adopted = dsocket.socket(fileno=fd)
        assert adopted.fileno() == fd and adopted.getpeername() == conn.getsockname()
        adopted.sendall(b"adopted")
        assert conn.recv(100) == b"adopted"
        again = dsocket.fromfd(adopted.fileno(), dsocket.AF_INET, dsocket.SOCK_STREAM)
        assert again.fileno() != adopted.fileno()
        adopted.close()
        again.sendall(b"fromfd")
        assert conn.recv(100) == b"fromfd"
        conn.sendall(b"back")
        again.settimeout(5)
        assert again.recv(100) == b"back"
        again.close()
        assert conn.recv(100) == b""  # the last handle closed the connection


def test_a_listener_at_its_connection_limit_refuses_at_connect():
    """max_connections = 2: the third client's connect() fails with
    ECONNREFUSED at once (not a silent success and a timeout later); once a
    connection closes there is room again."""
    use_config(FILLP_TO.replace("{prefix}", "127.0.0.0/8").replace("{mode}", "bbr")
               .replace("{extra}", "max_connections = 2"))
    srv = listener()
    addr = srv.getsockname()
    first = dsocket.create_connection(addr, timeout=5)
    second = dsocket.create_connection(addr, timeout=5)
    accepted = [srv.accept()[0] for _ in range(2)]
    with srv:
        third = dsocket.socket()
        third.settimeout(5)
        started = time.monotonic()
        with third, pytest.raises(ConnectionRefusedError):
            third.connect(addr)
        assert time.monotonic() - started < 2
        for sock in [first, *accepted]:
            sock.close()
        deadline = time.monotonic() + 10
        while True:  # the server forgets the closed connection within its close handshake
            try:
                fourth = dsocket.create_connection(addr, timeout=5)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "no room after a connection closed"
                time.sleep(0.1)
        with second, fourth:
            conn, _ = srv.accept()
            with conn:
                fourth.sendall(b"room again")
                conn.settimeout(5)
                assert conn.recv(100) == b"room again"


def test_a_closed_listeners_port_can_be_bound_again_at_once(fillp):
    # As with the kernel: close() frees the port before it returns (before,
    # the driver freed it a moment later, and 14 rebinds in 300 failed).
    for _ in range(100):
        srv = dsocket.create_server(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        assert srv.dmm_stack == "wan"
        srv.close()
        dsocket.create_server(("127.0.0.1", port)).close()


def _fds_for_pairs(n):
    """Fds the process gains for ``n`` connected, accepted FillP pairs (one
    byte each way on every one), and the client ports they use."""
    srv = listener()
    port = srv.getsockname()[1]
    with srv:
        before = len(os.listdir("/proc/self/fd"))
        clients = [dsocket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
        servers = [srv.accept()[0] for _ in range(n)]
        for c, s in zip(clients, servers):
            c.sendall(b"x")
            assert s.recv(1) == b"x"
            s.sendall(b"y")
            assert c.recv(1) == b"y"
        grown = len(os.listdir("/proc/self/fd")) - before
        ports = {c.getsockname()[1] for c in clients}
        assert all(c.dmm_stack == "wan" for c in clients)
        for s in clients + servers:
            s.close()
    return grown, len(ports)


@pytest.mark.parametrize("client_port", ["per-connection", "shared"])
def test_a_connection_end_holds_at_most_its_socket_and_readiness_fds(client_port):
    """Issue 19: no eventfd for write readiness unless someone waits to
    write, and with a shared client port no UDP socket per connection.
    Through Python an end is its own fd plus the eventfd under it (and the
    client's UDP socket when it has a port of its own)."""
    extra = f'client_port = "{client_port}"'
    use_config(FILLP_TO.replace("{prefix}", "127.0.0.0/8").format(mode="bbr", extra=extra))
    n = 100
    grown, ports = _fds_for_pairs(n)
    # A few more may open meanwhile (the shared UDP socket, the L-RD store).
    if client_port == "shared":
        assert ports == 1
        assert 4 * n <= grown <= 4 * n + 3  # 2 per end
    else:
        assert ports == n
        assert 5 * n <= grown <= 5 * n + 3  # 3 on the client end, 2 on the server's
