"""The ``memory`` kind, the worked example of a plug-in stack, end to end.

Nothing in ``dmm.socket`` or ``dmm.runtime`` knows this kind: the registry
in Rust lists it, and its placement ("core") tells the facade to hand
sockets to it. These tests drive it the way programs do: blocking threads,
a selector, asyncio and the stdlib's own HTTP server and client.
"""

import asyncio
import http.server
import selectors
import socket as stdsocket
import threading
import urllib.request

import pytest

import dmm
import dmm.config as dconfig
import dmm.runtime
import dmm.socket as dsocket

from conftest import use_config

MEMORY = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "mem"
kind = "memory"
buffer_size = {size}

[listen]
stacks = ["mem"]

[[route]]
to = "127.0.0.0/8"
stacks = ["mem"]
"""


@pytest.fixture
def memory():
    return use_config(MEMORY.format(size=64 * 1024))


def echo_server(n):
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(10)

    def serve():
        with srv:
            for _ in range(n):
                conn, _ = srv.accept()
                with conn:
                    while data := conn.recv(65536):
                        conn.sendall(data)

    t = threading.Thread(target=serve)
    t.start()
    return srv.getsockname()[1], t


def test_blocking_sockets_carry_a_megabyte_through_the_memory_kind(memory):
    port, t = echo_server(1)
    payload = bytes(range(256)) * 4096
    with dsocket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.dmm_stack == "mem"
        got = bytearray()

        def read():
            while len(got) < len(payload):
                got.extend(c.recv(65536))

        r = threading.Thread(target=read)
        r.start()
        c.sendall(payload)  # four times the buffer: send blocks and resumes
        r.join(10)
        assert bytes(got) == payload
    t.join(10)
    counters = memory.stacks["mem"].counters()
    # The facade counted one routed connect; the core made one pair.
    assert counters["connects"] == 1 and counters["pairs_made"] == 1


def test_a_closed_port_is_refused_and_a_timeout_is_a_timeout(memory):
    with pytest.raises(ConnectionRefusedError):
        dsocket.create_connection(("127.0.0.1", 9), timeout=5)
    port, t = echo_server(1)
    with dsocket.create_connection(("127.0.0.1", port), timeout=0.05) as c:
        with pytest.raises(TimeoutError):
            c.recv(10)  # the echo server has nothing to say yet
    t.join(10)


def test_a_selector_and_asyncio_see_readiness(memory):
    port, t = echo_server(2)
    c = dsocket.socket()
    c.setblocking(False)
    assert c.connect_ex(("127.0.0.1", port)) in (0, 115)
    sel = selectors.DefaultSelector()
    sel.register(c, selectors.EVENT_WRITE)
    assert sel.select(5)
    c.send(b"ping")
    sel.modify(c, selectors.EVENT_READ)
    assert sel.select(5)
    assert c.recv(10) == b"ping"
    sel.close()
    c.close()

    async def roundtrip():
        reader, writer = await asyncio.open_connection(sock=dsocket.create_connection(("127.0.0.1", port)))
        writer.write(b"through asyncio")
        await writer.drain()
        data = await reader.readexactly(15)
        writer.close()
        await writer.wait_closed()
        return data

    assert asyncio.run(roundtrip()) == b"through asyncio"
    t.join(10)


def test_the_stdlib_http_server_and_client_over_memory(memory, tmp_path):
    (tmp_path / "a.txt").write_text("carried in memory\n")
    dmm.patch_all()
    try:
        handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        assert srv.socket.dmm_stack == "mem"
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/a.txt"
            with urllib.request.urlopen(url, timeout=10) as r:
                assert r.read() == b"carried in memory\n"
        finally:
            srv.shutdown()
            srv.server_close()
    finally:
        dmm.unpatch_all()
    # Nothing reached the kernel: that port is not open there.
    probe = stdsocket.socket()
    assert probe.connect_ex(("127.0.0.1", srv.server_address[1])) != 0
    probe.close()


def test_bad_memory_config_names_the_field():
    with pytest.raises(dconfig.ConfigError, match="buffer_size"):
        dconfig.parse(MEMORY.format(size=0), "<test>")
    with pytest.raises(dconfig.ConfigError, match="mtu"):
        dconfig.parse(MEMORY.replace("buffer_size = {size}", "mtu = 1500"), "<test>")
