"""The socket contract, checked against the stdlib, on every stack kind.

Every test runs once per kind of ``tests/stack_kinds.py`` (``builtin``: the
built-in config, where sockets stay plain kernel sockets; the others force
every stream socket onto that kind), so a user-space stack is held to the
same contract as the kernel.
"""

import array
import errno
import io
import os
import pickle
import select
import selectors
import socket as stdsocket
import threading
import time
import weakref

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmm.socket as dsocket
import stack_kinds
from conftest import use_config

KINDS = ("builtin", *stack_kinds.CONFIGS)


@pytest.fixture(params=KINDS, autouse=True)
def kind(request):
    """The stack kind every stream socket of the test goes to."""
    if request.param != "builtin":
        why = stack_kinds.unavailable(request.param)
        if why:
            pytest.skip(why)
        use_config(stack_kinds.toml(request.param))
    return request.param


def on_stack(sock, kind):
    """Whether ``sock`` is on the stack ``kind`` forces streams onto."""
    return sock.dmm_stack in stack_kinds.STACK_NAMES.get(kind, {"kernel"})


def pair(module=dsocket, family=stdsocket.AF_INET):
    host = "::1" if family == stdsocket.AF_INET6 else "127.0.0.1"
    srv = module.create_server((host, 0), family=family)
    cli = module.create_connection((host, srv.getsockname()[1]))
    conn, _ = srv.accept()
    srv.close()
    return cli, conn


# -- bytes arrive intact, in order, for any split ------------------------------

chunks = st.lists(st.binary(min_size=0, max_size=4096), min_size=1, max_size=40)
sizes = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=chunks, reads=sizes, use_into=st.booleans())
def test_bytes_arrive_intact_for_any_split(parts, reads, use_into):
    cli, conn = pair()
    with cli, conn:
        expected = b"".join(parts)

        def writer():
            for p in parts:
                cli.sendall(p)
            cli.shutdown(stdsocket.SHUT_WR)

        t = threading.Thread(target=writer)
        t.start()
        got = bytearray()
        i = 0
        while True:
            n = reads[i % len(reads)]
            i += 1
            if use_into:
                buf = bytearray(n)
                k = conn.recv_into(buf)
                data = bytes(buf[:k])
            else:
                data = conn.recv(n)
            if not data:
                break
            assert len(data) <= n
            got += data
        t.join()
        assert bytes(got) == expected


# -- timeouts, non-blocking, EOF ------------------------------------------------


def test_recv_times_out_like_the_stdlib():
    cli, conn = pair()
    with cli, conn:
        conn.settimeout(0.05)
        assert conn.gettimeout() == 0.05
        start = time.monotonic()
        with pytest.raises(dsocket.timeout) as info:
            conn.recv(10)
        assert time.monotonic() - start >= 0.04
        assert info.value.errno is None
        assert str(info.value) == "timed out"


def test_nonblocking_recv_raises_blocking_io_error():
    cli, conn = pair()
    with cli, conn:
        conn.setblocking(False)
        assert conn.gettimeout() == 0.0
        with pytest.raises(BlockingIOError) as info:
            conn.recv(10)
        assert info.value.errno == errno.EAGAIN


def test_nonblocking_connect_raises_in_progress_then_completes(kind):
    srv = dsocket.create_server(("127.0.0.1", 0))
    s = dsocket.socket()
    s.setblocking(False)
    with srv, s:
        try:
            s.connect(srv.getsockname())
        except BlockingIOError as exc:
            assert exc.errno == errno.EINPROGRESS
        select.select([], [s], [], 5)
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR) == 0
        assert on_stack(s, kind)


def test_eof_after_peer_close():
    cli, conn = pair()
    with conn:
        cli.sendall(b"last")
        cli.close()
        assert conn.recv(100) == b"last"
        assert conn.recv(100) == b""


def test_default_timeout_applies():
    old = dsocket.getdefaulttimeout()
    dsocket.setdefaulttimeout(1.5)
    try:
        with dsocket.socket() as s:
            assert s.gettimeout() == 1.5
    finally:
        dsocket.setdefaulttimeout(old)


# -- errors are the stdlib's ----------------------------------------------------


def closed_port():
    s = stdsocket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever it is
        return type(exc), getattr(exc, "errno", None)
    return None


@pytest.mark.parametrize("case", ["refused", "refused_ex", "bad_fd_send", "double_bind", "not_connected", "bad_addr"])
def test_error_mapping_matches_the_stdlib(case):
    port = closed_port()

    def scenario(mod):
        if case == "refused":
            with mod.socket() as s:
                s.connect(("127.0.0.1", port))
        elif case == "refused_ex":
            with mod.socket() as s:
                rc = s.connect_ex(("127.0.0.1", port))
                raise OSError(rc, "rc")
        elif case == "bad_fd_send":
            s = mod.socket()
            s.close()
            s.send(b"x")
        elif case == "double_bind":
            with mod.socket() as a, mod.socket() as b:
                a.bind(("127.0.0.1", 0))
                a.listen()
                b.bind(a.getsockname())
        elif case == "not_connected":
            with mod.socket() as s:
                s.send(b"x")
        elif case == "bad_addr":
            with mod.socket() as s:
                s.connect(("no-such-host.invalid", 80))

    assert outcome(lambda: scenario(dsocket)) == outcome(lambda: scenario(stdsocket))
    assert outcome(lambda: scenario(dsocket)) is not None


# -- the rest of the method set -------------------------------------------------


def test_fileno_is_stable_and_real():
    s = dsocket.socket()
    fd = s.fileno()
    assert fd >= 0 and os.fstat(fd)
    srv = dsocket.create_server(("127.0.0.1", 0))
    s.connect(srv.getsockname())
    assert s.fileno() == fd
    s.close()
    srv.close()
    assert s.fileno() == -1


def test_family_and_type_are_enums_and_repr_names_the_stack(kind):
    cli, conn = pair()
    with cli, conn:
        assert cli.family is stdsocket.AF_INET
        assert cli.type is stdsocket.SOCK_STREAM
        assert "dmm.socket.socket" in repr(cli) and f"stack={cli.dmm_stack}" in repr(cli) and on_stack(cli, kind)
        assert isinstance(cli, stdsocket.socket)


def test_ipv6(kind):
    cli, conn = pair(family=stdsocket.AF_INET6)
    with cli, conn:
        cli.sendall(b"v6")
        assert conn.recv(2) == b"v6"
        assert on_stack(cli, kind)


def test_makefile_and_sendfile(tmp_path):
    cli, conn = pair()
    with cli, conn:
        path = tmp_path / "blob"
        data = os.urandom(300_000)
        path.write_bytes(data)
        with open(path, "rb") as f:
            t = threading.Thread(target=lambda: (cli.sendfile(f), cli.shutdown(stdsocket.SHUT_WR)))
            t.start()
            reader = conn.makefile("rb")
            assert reader.read() == data
            t.join()
            reader.close()


def test_makefile_text_lines():
    cli, conn = pair()
    with cli, conn:
        w = cli.makefile("w", encoding="utf-8", newline="\n")
        w.write("one\ntwo\n")
        w.flush()
        r = conn.makefile("r", encoding="utf-8")
        assert r.readline() == "one\n" and r.readline() == "two\n"
        w.close()
        r.close()


def test_dup_detach_context_manager_weakref():
    cli, conn = pair()
    d = cli.dup()
    assert d.fileno() != cli.fileno() and d.dmm_stack == cli.dmm_stack
    d.sendall(b"dup")
    assert conn.recv(3) == b"dup"
    d.close()
    fd = cli.detach()
    assert cli.fileno() == -1
    os.close(fd)
    with conn:
        ref = weakref.ref(conn)
        assert ref() is conn
    assert conn._closed


def test_subclassable(kind):
    class Mine(dsocket.socket):
        def hello(self):
            return "hi"

    srv = dsocket.create_server(("127.0.0.1", 0))
    with srv, Mine() as s:
        s.extra = 1  # a subclass gets a __dict__
        s.connect(srv.getsockname())
        assert s.hello() == "hi" and on_stack(s, kind)


def test_not_picklable_like_the_stdlib():
    with dsocket.socket() as s, pytest.raises(TypeError):
        pickle.dumps(s)


def test_sendmsg_recvmsg_and_fd_passing():
    a, b = dsocket.socketpair()
    with a, b:
        assert a.dmm_stack is None  # AF_UNIX is not routed
        r, w = os.pipe()
        dsocket.send_fds(a, [b"fd"], [r])
        msg, fds, _flags, _addr = dsocket.recv_fds(b, 10, 1)
        assert msg == b"fd" and len(fds) == 1
        for fd in fds + [r, w]:
            os.close(fd)
        a.sendmsg([b"x", b"y"])
        data, _anc, _f, _a = b.recvmsg(10)
        assert data == b"xy"


def test_udp_sendto_recvfrom_into():
    rx = dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM)
    tx = dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        assert tx.sendto(b"dgram", rx.getsockname()) == 5
        assert tx.dmm_stack == "kernel"  # datagrams stay on the kernel stack
        buf = bytearray(16)
        n, addr = rx.recvfrom_into(buf)
        assert buf[:n] == b"dgram" and addr[1] == tx.getsockname()[1]
        tx.sendto(b"flags", 0, rx.getsockname())
        assert rx.recvfrom(16)[0] == b"flags"


def test_any_buffer_type_can_be_sent():
    cli, conn = pair()
    with cli, conn:
        arr = array.array("i", [1, 2, 3])
        cli.sendall(arr)
        cli.sendall(memoryview(b"abc"))
        got = b""
        while len(got) < arr.itemsize * 3 + 3:
            got += conn.recv(100)
        assert got == arr.tobytes() + b"abc"


def test_selectors_see_readability():
    cli, conn = pair()
    with cli, conn, selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        assert sel.select(0) == []
        cli.sendall(b"!")
        assert len(sel.select(2)) == 1


def test_fromfd_and_socket_from_fileno():
    cli, conn = pair()
    with cli, conn:
        other = dsocket.fromfd(cli.fileno(), dsocket.AF_INET, dsocket.SOCK_STREAM)
        with other:
            assert isinstance(other, dsocket.socket)
            other.sendall(b"ff")
            assert conn.recv(2) == b"ff"


def test_counters_track_the_transfer():
    cli, conn = pair()
    with cli, conn:
        cli.sendall(b"z" * 100_000)
        got = 0
        while got < 100_000:
            got += len(conn.recv(65536))
        c = cli.dmm_counters()
        assert c.get("bytes_acked", 0) >= 100_000 - 1 or c["bytes_sent"] >= 100_000  # the kernel counts acked, user-space stacks sent
        assert conn.dmm_counters()["bytes_received"] >= 100_000
        assert io.DEFAULT_BUFFER_SIZE  # keeps the import honest


@pytest.mark.parametrize("module", [stdsocket, dsocket], ids=["stdlib", "dmm"])
def test_sendall_timeout_covers_the_whole_call(module):
    """A reader that drains slowly keeps every single send making progress;
    the timeout must still end sendall as a whole, as CPython's does."""
    srv = module.create_server(("127.0.0.1", 0))
    cli = module.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    stop = threading.Event()

    def trickle():
        while not stop.is_set():
            try:
                if not conn.recv(65536):
                    return
            except OSError:
                return
            time.sleep(0.02)

    reader = threading.Thread(target=trickle)
    reader.start()
    try:
        cli.settimeout(0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            cli.sendall(b"x" * (64 << 20))  # ~20 s of trickle
        # Generous bound: per-send timeouts would keep going for minutes.
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        cli.close()
        reader.join(10)
        conn.close()
        srv.close()
