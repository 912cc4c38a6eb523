"""A kernel instance with ``io = "uring"`` seen through ``dmm.socket``.

Such sockets send and receive through the Rust core (``_CoreMethods`` mixed
into their class), whose blocking path is io_uring. These tests check that
data, timeouts, non-blocking mode, ``accept()``, the fallback when the kernel
refuses io_uring, and Ctrl-C all behave as with the stdlib.
"""

import errno
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import dmm.runtime
import dmm.socket as dsocket
from dmm import _core
from conftest import run_python, use_config

NAME = "fast"
URING_TOML = f"""
[[stack]]
name = "{NAME}"
kind = "kernel"
io = "uring"
"""
SYSCALL_TOML = URING_TOML.replace('io = "uring"', 'io = "syscall"')
SYSCTL = "/proc/sys/kernel/io_uring_disabled"
BIG = 16 << 20

FAMILIES = [pytest.param(dsocket.AF_INET, id="v4"), pytest.param(dsocket.AF_INET6, id="v6")]


def host_of(family):
    return "::1" if family == dsocket.AF_INET6 else "127.0.0.1"


@pytest.fixture
def uring_rt():
    why = _core.uring_available()
    if why is not None:
        pytest.skip(f"io_uring is refused in this process ({why}); the fallback test covers that")
    rt = use_config(URING_TOML)
    assert rt.stacks[NAME].io == "uring", rt.stacks[NAME].describe()
    assert rt.stacks[NAME].attributes.get("uring_refused") is None
    return rt


def pair(family=dsocket.AF_INET):
    host = host_of(family)
    srv = dsocket.create_server((host, 0), family=family)
    cli = dsocket.create_connection((host, srv.getsockname()[1]))
    conn, _ = srv.accept()
    return srv, cli, conn


def uring_fds():
    """How many io_uring instances this process has open."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[io_uring]":
                n += 1
        except OSError:
            pass
    return n


def assert_core_backed(sock):
    assert sock.dmm_stack == NAME
    assert isinstance(sock, dsocket._CoreMethods)
    assert type(sock).send is not dsocket.socket.send
    assert type(sock).recv is not dsocket.socket.recv
    assert type(sock).sendall is not dsocket.socket.sendall
    assert type(sock).recv_into is not dsocket.socket.recv_into
    assert sock._dmm_core is not None
    assert sock._dmm_core.stack == NAME


# -- data through the core -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_16_mib_transfer_with_sha256(uring_rt, family):
    srv, cli, conn = pair(family)
    with srv, cli, conn:
        for s in (srv, cli, conn):
            assert_core_backed(s)
        data = os.urandom(BIG)
        want = hashlib.sha256(data).hexdigest()
        errors = []

        def sender():
            try:
                cli.sendall(data)
                cli.shutdown(dsocket.SHUT_WR)
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        t = threading.Thread(target=sender)
        t.start()
        h = hashlib.sha256()
        got = 0
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        i = 0
        while True:
            # Both receive methods of the core, alternately.
            if i % 2:
                chunk = conn.recv(100_000)
                n = len(chunk)
                h.update(chunk)
            else:
                n = conn.recv_into(buf)
                h.update(view[:n])
            i += 1
            if n == 0:
                break
            got += n
        t.join(30)
        assert not t.is_alive()
        assert errors == []
        assert got == BIG
        assert h.hexdigest() == want
        assert conn.recv(10) == b""  # EOF is sticky
        counters = conn.dmm_counters()
        assert counters["bytes_received"] >= BIG, counters


def test_recv_timeout_goes_through_the_core(uring_rt):
    srv, cli, conn = pair()
    with srv, cli, conn:
        assert_core_backed(conn)
        conn.settimeout(0.05)
        assert conn.gettimeout() == 0.05
        assert conn._dmm_core.gettimeout() == pytest.approx(0.05)
        for call in (lambda: conn.recv(10), lambda: conn.recv_into(bytearray(10))):
            start = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                call()
            took = time.monotonic() - start
            assert str(info.value) == "timed out"
            assert info.value.errno is None
            assert isinstance(info.value, dsocket.timeout)
            assert 0.04 <= took < 2.0, took
        # Back to blocking through settimeout(None): data arrives.
        conn.settimeout(None)
        assert conn._dmm_core.gettimeout() is None
        cli.sendall(b"after")
        assert conn.recv(10) == b"after"


def test_non_blocking_recv_raises_blocking_io_error(uring_rt):
    srv, cli, conn = pair()
    with srv, cli, conn:
        assert_core_backed(conn)
        conn.setblocking(False)
        assert conn.gettimeout() == 0.0
        assert conn._dmm_core.gettimeout() == 0.0
        with pytest.raises(BlockingIOError) as info:
            conn.recv(10)
        assert info.value.errno == errno.EAGAIN
        with pytest.raises(BlockingIOError):
            conn.recv_into(bytearray(10))
        cli.sendall(b"x")
        r, _, _ = select.select([conn], [], [], 5)
        assert r == [conn]
        assert conn.recv(10) == b"x"


@pytest.mark.parametrize("family", FAMILIES)
def test_accept_on_a_uring_listener_returns_uring_sockets(uring_rt, family):
    srv, cli, conn = pair(family)
    with srv, cli, conn:
        assert_core_backed(srv)
        assert_core_backed(conn)
        assert conn.gettimeout() is None
        assert conn._dmm_core.gettimeout() is None
        assert conn.getpeername()[:2] == cli.getsockname()[:2]
        assert conn._dmm_core.getpeername()[:2] == cli.getsockname()[:2]
        # The accepted socket's blocking recv uses io_uring: a fresh thread
        # (no ring yet) gains one ring by calling it, and nothing else runs.
        cli.sendall(b"hello")
        seen = {}

        def reader():
            seen["before"] = uring_fds()
            seen["data"] = conn.recv(10)
            seen["after"] = uring_fds()

        t = threading.Thread(target=reader)
        t.start()
        t.join(10)
        assert seen["data"] == b"hello"
        assert seen["after"] == seen["before"] + 1, seen


def test_syscall_instance_uses_the_stdlib_methods():
    # The counterpart of the checks above, so they can tell the two apart.
    rt = use_config(SYSCALL_TOML)
    assert rt.stacks[NAME].io == "syscall"
    srv, cli, conn = pair()
    with srv, cli, conn:
        for s in (srv, cli, conn):
            assert s.dmm_stack == NAME
            assert type(s).send is dsocket.socket.send
            assert s._dmm_core is None


# -- the kernel refuses io_uring ---------------------------------------------------


def need_sysctl():
    if not os.path.exists(SYSCTL):
        pytest.skip(f"{SYSCTL} does not exist (kernel older than 6.6)")


FALLBACK_CHILD = """
import hashlib, json, os, sys, threading
import dmm.runtime, dmm.socket as dsocket
from dmm import _core, config

rt = dmm.runtime.configure(config.parse(sys.argv[1], "<child>"))
inst = rt.stacks[sys.argv[2]]
srv = dsocket.create_server(("127.0.0.1", 0))
cli = dsocket.create_connection(srv.getsockname())
conn, _ = srv.accept()
data = os.urandom(int(sys.argv[3]))
t = threading.Thread(target=lambda: (cli.sendall(data), cli.shutdown(dsocket.SHUT_WR)))
t.start()
h, n = hashlib.sha256(), 0
while True:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
t.join()
print(json.dumps({
    "io": inst.io,
    "uring_refused": inst.attributes.get("uring_refused"),
    "uring_available": _core.uring_available(),
    "describe": inst.describe(),
    "stacks": [s.dmm_stack for s in (srv, cli, conn)],
    "core": [s._dmm_core is not None for s in (srv, cli, conn)],
    "received": n,
    "ok": h.hexdigest() == hashlib.sha256(data).hexdigest(),
}))
"""


@pytest.mark.needs_root(f"writes {SYSCTL}")
def test_fallback_when_the_kernel_refuses_io_uring():
    need_sysctl()
    with open(SYSCTL) as f:
        old = f.read()
    try:
        with open(SYSCTL, "w") as f:
            f.write("2")
        proc = run_python(FALLBACK_CHILD, URING_TOML, NAME, str(BIG))
    finally:
        with open(SYSCTL, "w") as f:
            f.write(old)
    with open(SYSCTL) as f:
        assert f.read() == old
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["io"] == "syscall"
    assert out["uring_refused"], out
    assert "Operation not permitted" in out["uring_refused"], out
    assert out["uring_available"] == out["uring_refused"]
    assert "io_uring refused" in out["describe"], out
    assert out["stacks"] == [NAME] * 3
    assert out["core"] == [False] * 3  # plain CPython methods on the fallback
    assert out["received"] == BIG
    assert out["ok"] is True


# -- Ctrl-C ----------------------------------------------------------------------

CTRL_C_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import dmm.runtime, dmm.socket as dsocket
from dmm import config

rt = dmm.runtime.configure(config.parse(sys.argv[1], "<child>"))
srv = dsocket.create_server(("127.0.0.1", 0))
cli = dsocket.create_connection(srv.getsockname())
conn, _ = srv.accept()
print(rt.stacks[sys.argv[2]].io, "core" if conn._dmm_core is not None else "plain", flush=True)
try:
    conn.recv(1024)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    raise
print("recv returned", flush=True)
"""


def wait_until_sleeping(pid, timeout=5.0):
    """Waits until the child's main thread sleeps in the kernel; returns wchan."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state == "S":
            try:
                with open(f"/proc/{pid}/wchan") as f:
                    return f.read()
            except OSError:
                return "?"
        time.sleep(0.01)
    raise AssertionError(f"child {pid} never blocked (state {state})")


@pytest.mark.parametrize("io,expect", [("uring", "uring core"), ("syscall", "syscall plain")])
def test_ctrl_c_interrupts_a_blocked_recv(io, expect):
    if io == "uring" and _core.uring_available() is not None:
        pytest.skip(f"io_uring is refused here: {_core.uring_available()}")
    toml = URING_TOML if io == "uring" else SYSCALL_TOML
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CTRL_C_CHILD), toml, NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()
        assert first == expect, (first, proc.stderr.read() if proc.poll() is not None else "")
        wchan = wait_until_sleeping(proc.pid)
        time.sleep(0.2)  # well inside recv()
        assert proc.poll() is None
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the child blocked in recv ({io}, wchan {wchan!r}) ignored SIGINT for 2 s")
        took = time.monotonic() - start
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took < 2.0
    assert "KeyboardInterrupt" in out, (out, err)
    assert "recv returned" not in out
    assert "KeyboardInterrupt" in err, err
    assert proc.returncode != 0
