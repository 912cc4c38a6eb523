"""One listening dmm socket across several stacks, and the accept policy.

The members here are the kernel and a FillP instance over loopback; the
smoltcp tests add a user-space TCP member over TAP.
"""

import errno
import selectors
import threading
import time

import pytest

import dmm.policy
import dmm.socket as dsocket

from conftest import use_config

BOTH = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"
address = "127.0.0.1"

[listen]
stacks = ["kernel", "wan"]
"""


def serve(srv, n, results):
    """Accepts ``n`` connections, echoes one message on each, records stacks."""
    for _ in range(n):
        conn, peer = srv.accept()
        with conn:
            data = conn.recv(100)
            conn.sendall(data.upper())
            results.append((conn.dmm_stack, data))


def client(port, stack, payload, timeout=10):
    c = dsocket.socket(stack=stack)
    c.settimeout(timeout)
    with c:
        c.connect(("127.0.0.1", port))
        c.sendall(payload)
        return c.recv(100)


def test_one_listener_accepts_from_kernel_and_fillp():
    use_config(BOTH)
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    fd = srv.fileno()
    srv.listen(16)
    port = srv.getsockname()[1]
    assert srv.fileno() == fd
    assert srv.dmm_stack == "kernel" and srv.dmm_stacks == ("kernel", "wan")
    results = []
    t = threading.Thread(target=serve, args=(srv, 4, results))
    t.start()
    try:
        assert client(port, "wan", b"one") == b"ONE"
        assert client(port, "kernel", b"two") == b"TWO"
        assert client(port, "wan", b"three") == b"THREE"
        assert client(port, "kernel", b"four") == b"FOUR"
    finally:
        t.join(10)
        srv.close()
    assert sorted(results) == sorted([("wan", b"one"), ("kernel", b"two"), ("wan", b"three"), ("kernel", b"four")])
    counts = dsocket.stack_counters()
    assert counts["wan"]["accepts"] == 2 and counts["kernel"]["accepts"] == 2
    assert counts["wan"]["listens"] == 1 and counts["kernel"]["listens"] == 1


def test_listener_fd_is_readable_for_any_member_and_works_with_selectors():
    use_config(BOTH)
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    port = srv.getsockname()[1]
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    with srv, sel:
        assert sel.select(0.05) == []
        with pytest.raises(BlockingIOError):
            srv.accept()
        for stack in ("wan", "kernel"):
            c = dsocket.socket(stack=stack)
            c.connect(("127.0.0.1", port))
            events = sel.select(5)
            assert [key.fileobj for key, _ in events] == [srv]
            conn, _ = srv.accept()
            assert conn.dmm_stack == stack
            conn.close()
            c.close()
        # Nothing left: not readable, accept would block.
        assert sel.select(0.05) == []


def test_accept_timeout_and_close():
    use_config(BOTH)
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        srv.accept()
    assert time.monotonic() - t0 >= 0.19
    with pytest.raises(OSError) as info:
        srv.recv(10)
    assert info.value.errno == errno.ENOTCONN
    port = srv.getsockname()[1]
    srv.close()
    # Every member is gone: the kernel port refuses, and so does FillP.
    for stack in ("kernel", "wan"):
        c = dsocket.socket(stack=stack)
        c.settimeout(5)
        with c, pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", port))


def test_ephemeral_port_is_shared_by_members():
    use_config(BOTH)
    srv = dsocket.socket()
    srv.listen()  # never bound: the port is chosen here, one for all members
    port = srv.getsockname()[1]
    assert port != 0
    results = []
    t = threading.Thread(target=serve, args=(srv, 2, results))
    t.start()
    with srv:
        assert client(port, "wan", b"x") == b"X"
        assert client(port, "kernel", b"y") == b"Y"
        t.join(10)
    assert sorted(results) == [("kernel", b"y"), ("wan", b"x")]


ACCEPT_RULE = BOTH + """
[[route]]
role = "accept"
to = "127.0.0.0/8"
stacks = ["kernel"]
"""


def refused_then_served():
    """A FillP client the accept policy refuses, then a kernel client it
    serves; returns what the server served and the listener's port."""
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(10)
    port = srv.getsockname()[1]
    served = []
    t = threading.Thread(target=serve, args=(srv, 1, served))
    t.start()
    try:
        refused = dsocket.socket(stack="wan")
        refused.settimeout(5)
        with refused:
            refused.connect(("127.0.0.1", port))  # the handshake completes
            # The server resets the connection as soon as it accepts it: the
            # reset may arrive before the send (which then fails, as a kernel
            # socket's would) or after it (the receive fails).
            with pytest.raises((ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
                refused.sendall(b"let me in")
                if refused.recv(100) == b"":
                    raise ConnectionAbortedError("closed without an answer")
        assert client(port, "kernel", b"ok") == b"OK"
    finally:
        t.join(10)
        srv.close()
    return served, port


def test_accept_rule_refuses_clients_on_other_stacks():
    use_config(ACCEPT_RULE)
    served, _port = refused_then_served()
    assert served == [("kernel", b"ok")]
    counts = dsocket.stack_counters()
    assert counts["wan"]["policy_refused"] == 1 and counts["kernel"]["policy_refused"] == 0


def test_accept_hook_sees_client_and_arrival_stack():
    use_config(BOTH)
    seen, roles = [], []

    @dmm.policy.register(roles=("accept",))
    def only_kernel(req):
        seen.append((req.role, req.address, req.stack, req.port))
        return "kernel"

    @dmm.policy.register
    def default_roles(req):
        # Not asked about accepts: it would otherwise refuse FillP clients.
        roles.append(req.role)
        return None

    served, port = refused_then_served()
    assert served == [("kernel", b"ok")]
    assert ("accept", "127.0.0.1", "wan", port) in seen and ("accept", "127.0.0.1", "kernel", port) in seen
    assert "accept" not in roles and "listen" in roles  # the clients named their stacks


def test_register_rejects_unknown_roles():
    with pytest.raises(ValueError):
        dmm.policy.register(lambda r: None, roles=("serve",))
    with pytest.raises(ValueError):
        dmm.policy.register(lambda r: None, roles="accept")


def test_single_stack_listener_unchanged_by_listen_list_of_one():
    use_config(BOTH.replace('stacks = ["kernel", "wan"]', 'stacks = ["wan"]'))
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    with srv:
        assert srv.dmm_stacks == ("wan",)


def test_unmodified_socketserver_on_two_stacks():
    import socketserver

    use_config(BOTH)

    class Echo(socketserver.StreamRequestHandler):
        def handle(self):
            line = self.rfile.readline()
            self.wfile.write(self.connection.dmm_stack.encode() + b":" + line)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    import dmm

    dmm.patch_all()
    try:
        server = Server(("127.0.0.1", 0), Echo)
    finally:
        dmm.unpatch_all()
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        for stack in ("kernel", "wan", "wan", "kernel"):
            c = dsocket.socket(stack=stack)
            c.settimeout(10)
            with c:
                c.connect(("127.0.0.1", port))
                c.sendall(b"ping\n")
                got = b""
                while not got.endswith(b"\n"):
                    chunk = c.recv(100)
                    if not chunk:
                        break
                    got += chunk
            assert got == stack.encode() + b":ping\n"
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_asyncio_server_on_two_stacks():
    import asyncio

    use_config(BOTH)
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    port = srv.getsockname()[1]
    served = []

    async def handle(reader, writer):
        line = await reader.readline()
        served.append(line)
        writer.write(line.upper())
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, sock=srv)
        async with server:
            loop = asyncio.get_running_loop()
            for stack in ("wan", "kernel"):
                got = await loop.run_in_executor(None, client, port, stack, b"abc\n")
                assert got == b"ABC\n"

    asyncio.run(asyncio.wait_for(main(), 30))
    assert served == [b"abc\n", b"abc\n"]
    counts = dsocket.stack_counters()
    assert counts["wan"]["accepts"] == 1 and counts["kernel"]["accepts"] == 1


def test_close_from_another_thread_wakes_a_blocked_accept_with_ebadf():
    use_config(BOTH)
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    assert len(srv.dmm_stacks) == 2
    errors = []

    def accept():
        try:
            srv.accept()
        except OSError as e:
            errors.append(e.errno)

    t = threading.Thread(target=accept)
    t.start()
    time.sleep(0.3)  # let it block in epoll_wait
    srv.close()
    t.join(5)
    assert not t.is_alive(), "accept() still blocked after close()"
    assert errors == [errno.EBADF]
