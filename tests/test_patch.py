"""Unmodified stdlib programs on dmm sockets: patch_all() and `dmm run`."""

import asyncio
import http.client
import http.server
import os
import shutil
import socket as stdsocket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import dmm
import dmm.policy
import dmm.socket as dsocket

from conftest import ROOT, TWO_KERNELS, mptcp_available


@pytest.fixture
def seen():
    """Every routing request, recorded by a hook that never decides."""
    requests = []
    dmm.policy.register(lambda req: requests.append(req))
    return requests


def test_patch_all_replaces_and_restores():
    original = stdsocket.socket
    dmm.patch_all()
    assert stdsocket.socket is dsocket.socket and dmm.is_patched()
    assert dmm.get_original("socket") is original
    assert stdsocket.create_connection is dsocket.create_connection
    dmm.patch_all()  # idempotent
    assert dmm.get_original("socket") is original
    dmm.unpatch_all()
    assert stdsocket.socket is original and not dmm.is_patched()


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {type(self.connection).__module__}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server_cls", [http.server.ThreadingHTTPServer, type("Forking", (__import__("socketserver").ForkingMixIn, http.server.HTTPServer), {})])
def test_http_server_and_urllib_and_http_client(server_cls, seen):
    dmm.patch_all()
    server = server_cls(("127.0.0.1", 0), Hello)
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        assert isinstance(server.socket, dsocket.socket) and server.socket.dmm_stack == "kernel"
        with urllib.request.urlopen(f"http://localhost:{port}/", timeout=10) as resp:
            assert resp.read() == b"hello from dmm.socket"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/")
        assert isinstance(conn.sock, dsocket.socket)
        assert conn.getresponse().read() == b"hello from dmm.socket"
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
    roles = [(r.role, r.host) for r in seen]
    assert ("listen", None) in roles
    assert ("connect", "localhost") in roles and ("connect", None) in roles


def test_asyncio_streams_client_and_server(seen):
    dmm.patch_all()

    async def main():
        async def handle(reader, writer):
            data = await reader.readline()
            writer.write(data.upper())
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"asyncio over dmm\n")
            await writer.drain()
            line = await reader.readline()
            sock = writer.get_extra_info("socket")
            writer.close()
            await writer.wait_closed()
            return line, sock

    line, sock = asyncio.run(main())
    assert line == b"ASYNCIO OVER DMM\n"
    assert {r.role for r in seen} >= {"listen", "connect"}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is needed to make a test certificate")
def test_ssl_handshake_on_dmm_sockets(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    listener = dsocket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result = {}

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            result["server_version"] = tls.version()
            tls.sendall(tls.recv(100)[::-1])

    t = threading.Thread(target=serve)
    t.start()
    raw = dsocket.create_connection(("localhost", port))
    assert raw.dmm_stack == "kernel"
    with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"secret")
        assert tls.recv(100) == b"terces"
        assert tls.getpeercert()["subject"] == ((("commonName", "localhost"),),)
    t.join(10)
    listener.close()
    assert result["server_version"].startswith("TLS")


APP = r'''
import http.server, socket, sys, threading, urllib.request
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
body = urllib.request.urlopen(f"http://127.0.0.1:{port}/app.py", timeout=10).read()
print(type(server.socket).__module__, server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL), len(body) > 0, sys.argv[1:])
server.shutdown()
'''


def run_dmm(args, cwd, env=None, timeout=60):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dmm", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full)


def test_dmm_run_script_unmodified(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    out = run_dmm(["run", "app.py", "a", "b"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dmm.socket", "6", "True", "['a',", "'b']"]


@pytest.mark.skipif(mptcp_available() is not None, reason=str(mptcp_available()))
def test_dmm_run_with_config_puts_the_listener_on_mptcp(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "dmm.toml").write_text(TWO_KERNELS + '\n[listen]\nstacks = ["mptcp"]\n')
    out = run_dmm(["run", "app.py"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:3] == ["dmm.socket", "262", "True"]


def test_dmm_run_module_http_server(tmp_path):
    (tmp_path / "index.html").write_text("served by dmm run -m")
    proc = subprocess.Popen([sys.executable, "-m", "dmm", "run", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        port = int(line.split(" port ")[1].split()[0])
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10).read()
        assert body == b"served by dmm run -m"
    finally:
        proc.terminate()
        proc.wait(10)


def test_dmm_run_bad_config_fails_before_the_program(tmp_path):
    (tmp_path / "app.py").write_text("print('should not run')")
    (tmp_path / "bad.toml").write_text('[[stack]]\nname = "k"\nkind = "warp"\n')
    out = run_dmm(["--config", "bad.toml", "run", "app.py"], cwd=tmp_path)
    assert out.returncode != 0
    assert "bad.toml:3: stack[0].kind" in out.stderr and "should not run" not in out.stdout
