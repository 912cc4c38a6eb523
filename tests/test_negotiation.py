"""Negotiation: candidates raced, what servers speak learned and shared.

Real peers only: the stdlib's http.server and redis-server as servers that
know nothing of dmm, dmm servers listening on the kernel and FillP at once,
a UDP socket that swallows everything as a path that drops FillP without a
word (no ICMP), processes killed mid-race. The root-only part (netfilter
blackholes and loss in a namespace) is in ``test_negotiation_netns.py``.
"""

import asyncio
import json
import os
import selectors
import shutil
import signal
import socket as stdsocket
import subprocess
import sys
import threading
import time
import http.server
import urllib.request

import pytest

import dmm
import dmm.runtime
import dmm.socket as dsocket
from dmm import _core
from dmm.rd import Store

from conftest import eventually, run_python, use_config

#: FillP first, the kernel as the fallback, for loopback.
RACE = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"
address = "127.0.0.1"

[listen]
stacks = ["kernel", "wan"]

[[route]]
to = "127.0.0.0/8"
stacks = [{order}]
{route_extra}
[rd]
attempt_delay_ms = {delay}
{rd_extra}
"""


def race_config(order='"wan", "kernel"', delay=250, route_extra="", rd_extra=""):
    return RACE.format(order=order, delay=delay, route_extra=route_extra, rd_extra=rd_extra)


def negotiation():
    return dmm.runtime.get().negotiator.counts()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(tmp_path):
    """The stdlib's http.server on plain stdlib sockets (it knows no dmm)."""
    (tmp_path / "hello.txt").write_text("hello from a plain server\n")
    handler = lambda *a, **kw: _Quiet(*a, directory=str(tmp_path), **kw)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def dmm_server(port_holder, n, stacks_seen, hold=None):
    """A dmm listener on kernel + FillP (needs the RACE config installed).

    It closes after ``n`` connections, or once ``hold`` (an Event) is set
    if one is given: a discovery query may still be on its way.
    """
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(10)
    port_holder.append(srv.getsockname()[1])

    def serve():
        try:
            for _ in range(n):
                conn, _ = srv.accept()
                with conn:
                    stacks_seen.append(conn.dmm_stack)
                    conn.sendall(b"served by " + conn.dmm_stack.encode())
            if hold is not None:
                hold.wait(10)
        finally:
            srv.close()

    t = threading.Thread(target=serve)
    t.start()
    return t


def fetch(port, path="/hello.txt"):
    """GET through urllib, unmodified, with dmm patched in."""
    dmm.patch_all()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.read()
    finally:
        dmm.unpatch_all()


def test_plain_tcp_server_through_a_fillp_first_route(http_server):
    use_config(race_config())
    # The FillP attempt is refused (ICMP port unreachable) and the kernel
    # candidate starts at once: the connection works.
    assert fetch(http_server) == b"hello from a plain server\n"
    counts = negotiation()
    assert counts["races_started"] == 1 and counts["races_won_kernel"] == 1 and counts["fallbacks"] == 1
    facts = dmm.runtime.get().negotiator.rd.facts("127.0.0.1", http_server)
    assert facts["fillp"].speaks is False and facts["tcp"].speaks is True
    assert facts["tcp"].rtt_ms is not None and facts["tcp"].rtt_ms > 0
    # Later connections know: straight to the kernel, no race.
    for _ in range(3):
        assert fetch(http_server) == b"hello from a plain server\n"
    assert negotiation()["races_started"] == 1


def test_dmm_server_is_reached_on_fillp_without_a_fallback():
    use_config(race_config())
    port, seen = [], []
    t = dmm_server(port, 2, seen)
    for _ in range(2):
        c = dsocket.create_connection(("127.0.0.1", port[0]), timeout=10)
        with c:
            assert c.dmm_stack == "wan"
            assert c.recv(100) == b"served by wan"
    t.join(10)
    assert seen == ["wan", "wan"]
    counts = negotiation()
    assert counts.get("fallbacks", 0) == 0 and counts["races_won_wan"] == 2


def test_a_kernel_first_race_asks_the_peer_what_it_speaks():
    use_config(race_config(order='"kernel", "wan"'))
    port, seen, hold = [], [], threading.Event()
    # The listener stays open until the answer is in: the query is sent
    # after the kernel wins and may arrive after the one connection ends.
    t = dmm_server(port, 1, seen, hold)
    c = dsocket.create_connection(("127.0.0.1", port[0]), timeout=10)
    with c:
        assert c.dmm_stack == "kernel" and c.recv(100) == b"served by kernel"
    rd = dmm.runtime.get().negotiator.rd
    deadline = time.monotonic() + 5
    while "fillp" not in rd.facts("127.0.0.1", port[0]) and time.monotonic() < deadline:
        time.sleep(0.02)
    hold.set()
    t.join(10)
    fact = rd.facts("127.0.0.1", port[0])["fillp"]
    assert fact.speaks and fact.source == "answer"
    counts = negotiation()
    assert counts["discovery_queries"] == 1 and counts["discovery_answers"] == 1


def test_the_listener_answers_discovery_and_drops_junk():
    use_config(race_config())
    srv = dsocket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    q = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
    q.settimeout(5)
    try:
        nonce = os.urandom(16)
        query = _core.discovery_query(nonce)
        q.sendto(query, ("127.0.0.1", port))
        answer, _ = q.recvfrom(2048)
        assert len(answer) <= len(query)  # never amplifies
        assert sorted(_core.parse_offer(answer, nonce)) == [("fillp", port), ("tcp", port)]
        with pytest.raises(ValueError):
            _core.parse_offer(answer, os.urandom(16))  # not an answer to another query
        before = dsocket.stack_counters()["wan"]["malformed"]
        for junk in (b"", b"\x01\x0a", query[:60], b"\x01\x0b" + bytes(30), os.urandom(200)):
            q.sendto(junk, ("127.0.0.1", port))
        deadline = time.monotonic() + 5
        while dsocket.stack_counters()["wan"]["malformed"] < before + 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dsocket.stack_counters()["wan"]["malformed"] >= before + 4
        # Still answering, still accepting.
        q.sendto(query, ("127.0.0.1", port))
        assert _core.parse_offer(q.recvfrom(2048)[0], nonce)
        c = dsocket.socket(stack="wan")
        c.settimeout(10)
        c.connect(("127.0.0.1", port))
        c.close()
    finally:
        q.close()
        srv.close()


def blackholed_fillp():
    """A UDP socket that takes every datagram and answers none: to FillP the
    path is a blackhole (no reply, no ICMP). Its port is free for TCP too."""
    for _ in range(100):
        probe = stdsocket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        s = stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_DGRAM)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.close()
            continue
        finally:
            probe.close()
        return s
    raise RuntimeError("no port free for both TCP and UDP")


def tcp_server_on(port):
    """A plain kernel TCP server on ``port`` answering b"tcp" to each client."""
    srv = stdsocket.socket()
    srv.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(16)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"tcp")

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_a_silent_fillp_path_falls_back_after_the_attempt_delay():
    use_config(race_config(delay=60))
    hole = blackholed_fillp()
    port = hole.getsockname()[1]
    srv = tcp_server_on(port)
    try:
        start = time.monotonic()
        c = dsocket.create_connection(("127.0.0.1", port), timeout=10)
        elapsed = time.monotonic() - start
        with c:
            assert c.dmm_stack == "kernel" and c.recv(10) == b"tcp"
        # The FillP attempt was aborted: no connection left on the instance.
        assert eventually(lambda: dsocket.stack_counters()["wan"]["connections"] == 0)
        assert elapsed >= 0.06  # the kernel started only after the delay
        assert hole.recv(2048)  # the FillP INIT did go out
        fact = dmm.runtime.get().negotiator.rd.facts("127.0.0.1", port)["fillp"]
        assert not fact.speaks and fact.source == "race"
    finally:
        hole.close()
        srv.close()


def test_racing_off_for_a_route_tries_candidates_in_turn():
    use_config(race_config(delay=20, route_extra="race = false"))
    hole = blackholed_fillp()
    port = hole.getsockname()[1]
    srv = tcp_server_on(port)
    try:
        c = dsocket.socket()
        c.settimeout(0.5)
        # FillP never answers and the kernel is not tried while it is in
        # flight: the timeout ends the connect.
        with pytest.raises(TimeoutError):
            c.connect(("127.0.0.1", port))
        c.close()
        assert eventually(lambda: dsocket.stack_counters()["wan"]["connections"] == 0)
    finally:
        hole.close()
        srv.close()


def test_the_socket_timeout_bounds_the_whole_race():
    use_config(race_config(delay=50))
    hole = blackholed_fillp()
    port = hole.getsockname()[1]
    # A TCP listener that never accepts and whose queue is full: further
    # SYNs go unanswered, so the kernel candidate hangs too.
    full = stdsocket.socket()
    full.bind(("127.0.0.1", port))
    full.listen(0)
    fillers = []
    try:
        for _ in range(3):
            f = stdsocket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)
        time.sleep(0.1)
        c = dsocket.socket()
        c.settimeout(0.4)
        fd = c.fileno()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            c.connect(("127.0.0.1", port))
        elapsed = time.monotonic() - start
        assert 0.35 < elapsed < 3, elapsed
        assert c.fileno() == fd and c.dmm_stack is None
        c.close()
        assert eventually(lambda: dsocket.stack_counters()["wan"]["connections"] == 0)
    finally:
        for f in fillers:
            f.close()
        full.close()
        hole.close()


def test_asyncio_and_selectors_clients_race_transparently(http_server):
    use_config(race_config())
    dmm.patch_all()
    try:
        async def get():
            r, w = await asyncio.open_connection("127.0.0.1", http_server)
            w.write(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            body = await r.read()
            w.close()
            return body

        assert asyncio.run(get()).endswith(b"hello from a plain server\n")
        assert negotiation()["races_won_kernel"] == 1
    finally:
        dmm.unpatch_all()

    # A non-blocking connect through a selector, as event loops do it; a
    # dmm server this time, so FillP wins and the fd is taken over.
    port, seen = [], []
    t = dmm_server(port, 1, seen)
    c = dsocket.socket()
    c.setblocking(False)
    fd = c.fileno()
    assert c.connect_ex(("127.0.0.1", port[0])) == 115  # EINPROGRESS
    sel = selectors.DefaultSelector()
    sel.register(c, selectors.EVENT_WRITE)
    assert sel.select(10), "the race never decided"
    assert c.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR) == 0
    sel.unregister(c)
    assert c.fileno() == fd and c.dmm_stack == "wan"
    c.setblocking(True)
    assert c.recv(100) == b"served by wan"
    c.close()
    t.join(10)


REDIS_CLIENT = """
import json, sys, time
import redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), socket_timeout=10)
start = time.monotonic()
r.set("dmm", "negotiated")
value = r.get("dmm")
elapsed = time.monotonic() - start
import dmm.runtime
print(json.dumps({"value": value.decode(), "elapsed": elapsed,
                  "counts": dmm.runtime.get().negotiator.counts()}))
"""


@pytest.fixture
def redis_server(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (.ci/run installs Debian's redis-server)")
    pytest.importorskip("redis")
    s = stdsocket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            stdsocket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def test_unmodified_redis_client_under_dmm_run_and_l_rd_shared_by_processes(redis_server, tmp_path):
    config = tmp_path / "dmm.toml"
    config.write_text(race_config())
    script = tmp_path / "client.py"
    script.write_text(REDIS_CLIENT)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-m", "dmm", "--config", str(config), "run", str(script),
                              str(redis_server)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["value"] == second["value"] == "negotiated"
    # The first process raced (FillP refused, kernel at once) and wrote what
    # it learned to the host's L-RD; the second read it and raced nothing.
    assert first["counts"]["fallbacks"] == 1 and first["counts"]["races_won_kernel"] == 1
    assert second["counts"].get("races_started", 0) == 0


def test_listeners_of_dead_processes_leave_l_rd(tmp_path):
    config = tmp_path / "dmm.toml"
    config.write_text(race_config())
    child = subprocess.Popen([sys.executable, "-c", (
        "import dmm.runtime, dmm.socket as s, sys, time\n"
        f"dmm.runtime.configure({str(config)!r})\n"
        "l = s.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
        "print(l.getsockname()[1], flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        store = Store(os.path.join(os.environ["DMM_RD_DIR"], "lrd.sqlite"))
        deadline = time.monotonic() + 5
        while not any(lst.port == port for lst in store.listeners()) and time.monotonic() < deadline:
            time.sleep(0.02)
        (lst,) = [x for x in store.listeners() if x.port == port]
        assert lst.pid == child.pid and sorted(lst.protocols) == [("fillp", port), ("tcp", port)]
        assert store.prune_dead() == 0
    finally:
        child.kill()
        child.wait(10)
    assert store.prune_dead() == 1
    assert not any(x.port == port for x in store.listeners())
    store.close()


def test_a_corrupt_store_is_logged_once_and_routing_carries_on(http_server, caplog):
    path = os.path.join(os.environ["DMM_RD_DIR"], "lrd.sqlite")
    with open(path, "wb") as f:
        f.write(b"this is not an SQLite database" * 100)
    with caplog.at_level("WARNING", logger="dmm.rd"):
        use_config(race_config())
        for _ in range(3):
            assert fetch(http_server) == b"hello from a plain server\n"
        time.sleep(0.2)
    warnings = [r for r in caplog.records if "not usable" in r.getMessage()]
    assert len(warnings) == 1
    # Knowledge lives in the process: the later fetches did not race.
    assert negotiation()["races_started"] == 1 and negotiation()["store_errors"] >= 1


def test_a_fillp_server_killed_mid_race_ends_on_the_kernel(tmp_path):
    """A FillP-only dmm server process, stopped (SIGSTOP) so that its
    handshake stalls, then killed; the port's kernel TCP server (another
    process's) takes the connection."""
    fillp_only = tmp_path / "fillp.toml"
    fillp_only.write_text(race_config().replace('stacks = ["kernel", "wan"]', 'stacks = ["wan"]', 1))
    child = subprocess.Popen([sys.executable, "-c", (
        "import dmm.runtime, dmm.socket as s, time\n"
        f"dmm.runtime.configure({str(fillp_only)!r})\n"
        "l = s.socket(); l.bind(('127.0.0.1', 0)); l.listen()\n"
        "print(l.getsockname()[1], flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        srv = tcp_server_on(port)
        os.kill(child.pid, signal.SIGSTOP)
        use_config(race_config(delay=100))
        result = {}

        def connect():
            c = dsocket.create_connection(("127.0.0.1", port), timeout=10)
            result["stack"] = c.dmm_stack
            result["data"] = c.recv(10)
            c.close()

        t = threading.Thread(target=connect)
        t.start()
        time.sleep(0.05)
        child.kill()  # dies mid-race
        t.join(15)
        assert result == {"stack": "kernel", "data": b"tcp"}
        srv.close()
    finally:
        child.kill()
        child.wait(10)


def test_single_candidate_routes_and_the_builtin_config_do_not_race(http_server):
    # The built-in config: the plain kernel path, no negotiator at all.
    assert dmm.runtime.get().negotiator is None
    assert fetch(http_server).startswith(b"hello")
    # MPTCP and TCP reach the same servers: they collapse to one candidate.
    rt = use_config("""
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "mp"
kind = "kernel"
protocol = "mptcp"

[[route]]
to = "127.0.0.0/8"
stacks = ["mp", "kernel"]
""")
    assert fetch(http_server).startswith(b"hello")
    assert rt.negotiator.counts().get("races_started", 0) == 0
    out = run_python(f"""
import dmm.runtime, dmm.policy
from dmm import config
rt = dmm.runtime.configure(config.parse('''{race_config()}'''))
req = dmm.policy.Request(role="connect", family=2, type=1, address="127.0.0.1", port={http_server})
print(rt.decide(req).candidates)
""")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('wan', 'kernel')"


def test_a_known_kernel_peer_falls_back_only_for_unbound_sockets():
    use_config(race_config())
    srv = stdsocket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with dsocket.create_connection(("127.0.0.1", port), timeout=10) as c:
        assert c.dmm_stack == "kernel"  # FillP refused: L-RD learns "no FillP"
    srv.close()
    before = negotiation()
    # The kernel is the one first choice and is refused now. A socket with
    # its own local port has nothing to race with: the error is the kernel's.
    s = dsocket.socket()
    s.bind(("127.0.0.1", 0))
    with pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", port))
    assert s.dmm_stack == "kernel"  # no FillP attempt was made for it
    s.close()
    assert negotiation() == before
    # An unbound one gives the last resort (FillP) its turn, refused too.
    with pytest.raises(ConnectionRefusedError):
        dsocket.create_connection(("127.0.0.1", port), timeout=10)
    assert negotiation()["races_started"] == before["races_started"] + 1


def test_a_confirmed_first_choice_waits_out_one_lost_handshake_packet_before_the_next_starts():
    use_config(race_config(delay=60))
    neg = dmm.runtime.get().negotiator
    # Nothing known of FillP there: the configured delay.
    assert neg.attempt_delay("10.9.9.9", 80, "wan") == pytest.approx(0.06)
    # Seen to speak FillP, connecting in 50 ms: twice that plus FillP's
    # 200 ms handshake retransmission, so one loss does not race.
    neg.rd.learn("10.9.9.9", 80, "fillp", True, "race", rtt_ms=50)
    assert neg.attempt_delay("10.9.9.9", 80, "wan") == pytest.approx(0.3)
    # Known not to speak it: the shortened, unconfirmed rule (a TCP
    # connect of 20 ms: two TCP round trips for FillP's handshake, twice).
    neg.rd.learn("10.9.9.8", 80, "fillp", False, "race")
    neg.rd.learn("10.9.9.8", 80, "tcp", True, "race", rtt_ms=20)
    assert neg.attempt_delay("10.9.9.8", 80, "wan") == pytest.approx(0.06)
    # Never beyond RFC 8305's 2 s, however slow the path.
    neg.rd.learn("10.9.9.7", 80, "fillp", True, "race", rtt_ms=5000)
    assert neg.attempt_delay("10.9.9.7", 80, "wan") == pytest.approx(2.0)


def lost_race(neg, address, port):
    """Settles a race in which FillP started first and the kernel, started
    after the attempt delay, connected first (as when a FillP handshake
    packet is lost)."""
    from dmm.race import Race

    stacks = dmm.runtime.get().stacks
    race = Race([(n, stacks[n]) for n in ("wan", "kernel")], 2, 1, (address, port), [], None, 0.25)
    fillp, kernel = race.attempts
    fillp.started, kernel.started, kernel.finished = 10.0, 10.25, 10.3
    race.winner, race.next = kernel, 2
    neg.settle(race, 2)


def test_a_protocol_the_peer_is_known_to_speak_is_not_given_up_after_one_slow_handshake():
    use_config(race_config())
    neg = dmm.runtime.get().negotiator
    # Nothing known: beaten once is enough to say FillP does not get through.
    lost_race(neg, "10.9.9.1", 80)
    assert neg.rd.facts("10.9.9.1", 80)["fillp"].speaks is False
    # Known to speak it: the first slow race is forgiven, the second in a
    # row is not.
    neg.rd.learn("10.9.9.2", 80, "fillp", True, "race", rtt_ms=160)
    lost_race(neg, "10.9.9.2", 80)
    assert neg.rd.facts("10.9.9.2", 80)["fillp"].speaks is True
    assert neg.counts()["races_lost_by_known"] == 1 and neg.counts()["races_contested"] == 2
    lost_race(neg, "10.9.9.2", 80)
    assert neg.rd.facts("10.9.9.2", 80)["fillp"].speaks is False
