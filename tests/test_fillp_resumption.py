"""FillP session resumption through dmm.socket: a client that connected to
a server before sends CONN_REQ with the server's ticket, skipping the
INIT/COOKIE round trip; a ticket the server no longer takes costs a round
trip, never the connection. Real UDP over loopback, the server in a process
(an instance) of its own."""

import subprocess
import sys

import pytest

import dmm.socket as dsocket

from conftest import FILLP_TO, use_config

#: An echo server on FillP: prints its port, then echoes each connection
#: until EOF, until killed.
SERVER = r"""
import sys
import dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<server>"))
srv = s.socket()
srv.setsockopt(s.SOL_SOCKET, s.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[2])))
srv.listen(16)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        while True:
            b = conn.recv(65536)
            if not b:
                break
            conn.sendall(b)
"""


def fillp_config(extra=""):
    return FILLP_TO.replace("{prefix}", "127.0.0.0/8").format(mode="bbr", extra=extra)


def start_server(port=0, extra=""):
    proc = subprocess.Popen([sys.executable, "-c", SERVER, fillp_config(extra), str(port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        proc.wait()
        raise RuntimeError("the FillP echo server did not start")
    return proc, int(line)


def stop(proc):
    proc.kill()
    proc.wait()


def counters():
    return dsocket.stack_counters()["wan"]


def echo_once(port, payload):
    with dsocket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.dmm_stack == "wan"
        c.sendall(payload)
        c.shutdown(dsocket.SHUT_WR)
        got = b""
        while len(got) < len(payload):
            b = c.recv(65536)
            if not b:
                break
            got += b
        assert got == payload


@pytest.mark.parametrize("client_port", ["per-connection", "shared"])
def test_repeat_connects_resume_with_the_servers_ticket(client_port):
    use_config(fillp_config(f'client_port = "{client_port}"'))
    proc, port = start_server()
    try:
        echo_once(port, b"first")
        assert counters()["resumed"] == 0 and counters()["tickets"] == 1
        for i in range(5):
            echo_once(port, f"again {i}".encode() * 1000)
        c = counters()
        assert (c["resumed"], c["resumptions_refused"], c["tickets"]) == (5, 0, 1)
    finally:
        stop(proc)


def test_a_ticket_from_a_restarted_server_costs_a_round_trip_not_the_connection():
    use_config(fillp_config())
    proc, port = start_server()
    try:
        echo_once(port, b"before")
        assert counters()["tickets"] == 1
    finally:
        stop(proc)
    # Same port, new process: a new cookie secret, so the ticket's MAC fails.
    proc, port2 = start_server(port)
    try:
        assert port2 == port
        echo_once(port, b"after the restart")
        c = counters()
        assert (c["resumed"], c["resumptions_refused"]) == (0, 1)
        # The full handshake brought a new ticket, which the server takes.
        echo_once(port, b"and again")
        assert counters()["resumed"] == 1
    finally:
        stop(proc)


@pytest.mark.parametrize("client_extra, server_extra", [
    ("resumption = false", ""),  # the client keeps no tickets
    ("", "resumption = false"),  # the server gives none
])
def test_no_resumption_when_it_is_off_at_either_end(client_extra, server_extra):
    use_config(fillp_config(client_extra))
    proc, port = start_server(extra=server_extra)
    try:
        for _ in range(3):
            echo_once(port, b"x")
        c = counters()
        assert (c["resumed"], c["tickets"]) == (0, 0)
    finally:
        stop(proc)


def test_a_refused_resumption_to_a_gone_server_fails_as_a_connect_does():
    use_config(fillp_config())
    proc, port = start_server()
    echo_once(port, b"hello")
    stop(proc)
    # Nothing listens on the port now: ICMP port unreachable refuses the
    # resumed CONN_REQ as it would an INIT, and the ticket is dropped.
    with pytest.raises(ConnectionRefusedError):
        dsocket.create_connection(("127.0.0.1", port), timeout=10)
    assert counters()["tickets"] == 0
