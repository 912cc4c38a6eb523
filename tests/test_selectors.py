"""dmm.selectors: exact write readiness for sockets on user-space stacks,
the stdlib's behaviour for every other fd, and asyncio on top of it."""

import asyncio
import selectors
import socket as stdsocket
import threading
import time

import pytest

import dmm
import dmm.selectors as dselectors
import dmm.socket as dsocket

from conftest import FILLP_LOOPBACK, use_config

@pytest.fixture
def fillp():
    return use_config(FILLP_LOOPBACK.format(mode="bbr"))


def pair():
    """A connected FillP pair (client, server side)."""
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    c = dsocket.socket()
    c.connect(("127.0.0.1", srv.getsockname()[1]))
    conn, _ = srv.accept()
    srv.close()
    return c, conn


def fill(sock):
    """Sends until the send buffer stays full (the peer's receive window is
    full too, so nothing more is acknowledged); returns the bytes sent."""
    sock.setblocking(False)
    block = b"x" * (1 << 20)
    sent = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        before = sent
        while True:
            try:
                sent += sock.send(block)
            except BlockingIOError:
                break
        if sent == before:
            return sent
        time.sleep(0.3)
    raise AssertionError("the send buffer never stayed full")


def test_write_readiness_follows_the_send_buffer(fillp):
    c, conn = pair()
    with c, conn, dselectors.DefaultSelector() as sel:
        assert dsocket.write_poll_fd(c.fileno()) is not None
        sel.register(c, selectors.EVENT_WRITE, "c")
        # Connected with an empty buffer: writable at once.
        assert [(k.data, ev) for k, ev in sel.select(5)] == [("c", selectors.EVENT_WRITE)]
        sent = fill(c)
        # Full, and the peer reads nothing: not writable, though the stdlib
        # selector (always-writable eventfd) says otherwise.
        assert sel.select(0.3) == []
        with selectors.EpollSelector() as std:
            std.register(c, selectors.EVENT_WRITE)
            assert std.select(0) != []
        # The peer reads: once half the buffer is acknowledged, writable.
        got = 0
        conn.settimeout(10)
        deadline = time.monotonic() + 30
        ready = []
        while not ready and time.monotonic() < deadline:
            got += len(conn.recv(1 << 20))
            ready = sel.select(0)
        assert ready and ready[0][1] == selectors.EVENT_WRITE
        assert 0 < got <= sent


def test_read_and_write_interest_on_one_socket(fillp):
    c, conn = pair()
    with c, conn, dselectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        events = dict((k.fileobj, ev) for k, ev in sel.select(5))
        assert events == {conn: selectors.EVENT_WRITE}
        c.sendall(b"ping")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = dict((k.fileobj, ev) for k, ev in sel.select(1))
            if events.get(conn, 0) & selectors.EVENT_READ:
                break
        assert events[conn] == selectors.EVENT_READ | selectors.EVENT_WRITE
        sel.modify(conn, selectors.EVENT_READ)
        assert [ev for _, ev in sel.select(1)] == [selectors.EVENT_READ]
        assert conn.recv(10) == b"ping"
        assert sel.select(0.1) == []
        key = sel.unregister(conn)
        assert key.fileobj is conn and len(sel.get_map()) == 0


def test_connect_in_progress_is_not_writable_until_connected(fillp):
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    c = dsocket.socket()
    c.setblocking(False)
    with srv, c, dselectors.DefaultSelector() as sel:
        assert c.connect_ex(("127.0.0.1", srv.getsockname()[1])) in (0, 115)  # EINPROGRESS
        sel.register(c, selectors.EVENT_WRITE)
        assert sel.select(10), "connect never completed"
        assert c.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR) == 0
        conn, _ = srv.accept()
        conn.close()


def test_kernel_fds_behave_as_with_the_stdlib_selector():
    a, b = stdsocket.socketpair()
    with a, b, dselectors.DefaultSelector() as sel:
        assert dsocket.write_poll_fd(a.fileno()) is None
        sel.register(a, selectors.EVENT_READ | selectors.EVENT_WRITE, "a")
        assert [(k.data, ev) for k, ev in sel.select(1)] == [("a", selectors.EVENT_WRITE)]
        b.send(b"x")
        assert sel.select(1)[0][1] == selectors.EVENT_READ | selectors.EVENT_WRITE
        sel.modify(a, selectors.EVENT_READ, "a2")
        assert sel.get_map()[a].data == "a2"
        with pytest.raises(KeyError):
            sel.register(a, selectors.EVENT_READ)
        with pytest.raises(ValueError):
            sel.register(b, 0)
        a.close()
        # A closed socket is still found by identity, as the stdlib does.
        assert sel.unregister(a).data == "a2"


def test_patch_all_installs_the_default_selector():
    original = selectors.DefaultSelector
    dmm.patch_all()
    try:
        assert selectors.DefaultSelector is dselectors.DefaultSelector
    finally:
        dmm.unpatch_all()
    assert selectors.DefaultSelector is original


def test_asyncio_sender_waits_instead_of_spinning(fillp):
    """An asyncio sender blocked on a full send buffer sleeps: with an
    always-writable fd, the event loop would call send() in a loop."""
    c, conn = pair()
    size = 48 << 20
    paused = threading.Event()
    resume = threading.Event()
    received = []

    def reader():
        conn.settimeout(30)
        # Read nothing for a while, so the sender's buffer fills.
        paused.set()
        resume.wait(30)
        got = 0
        while got < size:
            data = conn.recv(1 << 20)
            if not data:
                break
            got += len(data)
        received.append(got)

    async def send_all():
        loop = asyncio.get_running_loop()
        c.setblocking(False)
        task = asyncio.ensure_future(loop.sock_sendall(c, b"y" * size))
        await asyncio.sleep(0.5)  # the buffer is full well before this
        cpu0 = time.process_time()
        await asyncio.sleep(1.0)
        stalled_cpu = time.process_time() - cpu0
        resume.set()
        await asyncio.wait_for(task, 60)
        return stalled_cpu

    t = threading.Thread(target=reader)
    t.start()
    paused.wait(10)
    loop = asyncio.SelectorEventLoop(dselectors.DefaultSelector())
    try:
        stalled_cpu = loop.run_until_complete(send_all())
    finally:
        loop.close()
        resume.set()
        t.join(60)
    with c, conn:
        assert received == [size]
        # A spinning loop burns about a CPU second per second here.
        assert stalled_cpu < 0.3, f"{stalled_cpu:.2f} CPU s in 1 s of stall"
