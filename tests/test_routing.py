"""Routing: rules, overrides, hooks, [listen], and MPTCP end to end."""

import logging
import socket as stdsocket
import threading
import time

import pytest

import dmm.config
import dmm.policy
import dmm.runtime
import dmm.socket as dsocket
from dmm.policy import Decision, Request

from conftest import TWO_KERNELS, mptcp_available, use_config

IPPROTO_MPTCP = 262

needs_mptcp = pytest.mark.skipif(mptcp_available() is not None, reason=str(mptcp_available()))


def serve_once(srv, out):
    conn, _ = srv.accept()
    with conn:
        out["stack"] = conn.dmm_stack
        out["proto"] = conn.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL)
        conn.sendall(conn.recv(100).upper())


def round_trip(dest, port, **kw):
    with dsocket.create_connection((dest, port)) if not kw else dsocket.socket(**kw) as s:
        if kw:
            s.connect((dest, port))
        s.sendall(b"ping")
        assert s.recv(10) == b"PING"
        return s.dmm_stack, s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL)


@needs_mptcp
def test_prefix_rule_sends_one_destination_over_mptcp():
    use_config(TWO_KERNELS + """
[[route]]
to = "127.0.0.2/32"
stacks = ["mptcp", "kernel"]
""")
    srv = dsocket.create_server(("0.0.0.0", 0))
    port = srv.getsockname()[1]
    for dest, stack, proto in [("127.0.0.2", "mptcp", IPPROTO_MPTCP), ("127.0.0.1", "kernel", stdsocket.IPPROTO_TCP)]:
        seen = {}
        t = threading.Thread(target=serve_once, args=(srv, seen))
        t.start()
        assert round_trip(dest, port) == (stack, proto)
        t.join()
    srv.close()


@needs_mptcp
def test_mptcp_listener_from_listen_section_accepts_tcp_and_mptcp():
    use_config(TWO_KERNELS + """
[[route]]
to = "127.0.0.3/32"
stacks = ["mptcp"]

[listen]
stacks = ["mptcp"]
""")
    srv = dsocket.create_server(("127.0.0.1", 0))
    assert srv.dmm_stack == "mptcp"
    assert srv.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL) == IPPROTO_MPTCP
    seen = {}
    t = threading.Thread(target=serve_once, args=(srv, seen))
    t.start()
    assert round_trip("127.0.0.1", srv.getsockname()[1]) == ("kernel", stdsocket.IPPROTO_TCP)
    t.join()
    assert seen["stack"] == "mptcp"
    srv.close()


@needs_mptcp
def test_options_set_before_routing_survive_the_switch_to_mptcp():
    use_config(TWO_KERNELS + """
[[route]]
to = "127.0.0.0/8"
stacks = ["mptcp"]
""")
    srv = dsocket.create_server(("127.0.0.1", 0), family=stdsocket.AF_INET)
    s = dsocket.socket()
    fd = s.fileno()
    s.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE, 1)
    s.settimeout(4.0)
    s.bind(("127.0.0.1", 0))
    local = s.getsockname()
    s.connect(srv.getsockname())
    with s, srv:
        assert s.fileno() == fd
        assert s.proto == IPPROTO_MPTCP
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL) == IPPROTO_MPTCP
        assert s.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY) == 1
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE) == 1
        assert s.gettimeout() == 4.0
        assert s.getsockname() == local


@needs_mptcp
def test_per_socket_override_keyword_and_setsockopt():
    use_config(TWO_KERNELS)
    srv = dsocket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with srv:
        with dsocket.socket(stack="mptcp") as s:
            s.connect(("127.0.0.1", port))
            assert s.dmm_stack == "mptcp" and s.proto == IPPROTO_MPTCP
        with dsocket.socket() as s:
            s.setsockopt(dsocket.SOL_DMM, dsocket.DMM_STACK, b"mptcp")
            s.connect(("127.0.0.1", port))
            assert s.getsockopt(dsocket.SOL_DMM, dsocket.DMM_STACK) == b"mptcp"
            assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL) == IPPROTO_MPTCP
            with pytest.raises(OSError):
                s.setsockopt(dsocket.SOL_DMM, dsocket.DMM_STACK, b"kernel")


def test_override_to_unknown_stack_is_a_clear_error():
    srv = dsocket.create_server(("127.0.0.1", 0))
    with srv, dsocket.socket(stack="nope") as s:
        with pytest.raises(OSError, match="no stack is named 'nope'"):
            s.connect(srv.getsockname())


def test_mptcp_cannot_carry_udp_so_the_next_stack_does():
    use_config(TWO_KERNELS + """
[[route]]
to = "127.0.0.0/8"
stacks = ["mptcp", "kernel"]
""")
    rx = dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM)
    tx = dsocket.socket(dsocket.AF_INET, dsocket.SOCK_DGRAM)
    with rx, tx:
        rx.bind(("127.0.0.1", 0))
        tx.sendto(b"u", rx.getsockname())
        assert tx.dmm_stack == "kernel"
        assert rx.recv(1) == b"u"


def test_hook_decides_and_sees_host_and_properties():
    use_config(TWO_KERNELS)
    seen = []

    @dmm.policy.register
    def hook(req: Request):
        seen.append(req)
        if req.properties.get("bulk") == "yes":
            return Decision(["mptcp"], reason="bulk")
        return None

    srv = dsocket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    with srv:
        with dsocket.create_connection(("localhost", port)) as s:
            assert s.dmm_stack == "kernel"
        with dsocket.socket(properties={"bulk": "yes"}) as s:
            s.connect(("127.0.0.1", port))
            assert s.dmm_stack == ("mptcp" if mptcp_available() is None else "kernel")
    connects = [r for r in seen if r.role == "connect"]
    assert connects[0].host == "localhost" and connects[0].port == port
    assert connects[1].properties == {"bulk": "yes"} and connects[1].host is None
    assert any(r.role == "listen" for r in seen)


def test_hook_that_raises_is_logged_and_the_table_decides(caplog):
    use_config(TWO_KERNELS)

    def broken(req):
        raise RuntimeError("boom")

    def silly(req):
        return 42

    dmm.policy.register(broken)
    dmm.policy.register(silly)
    srv = dsocket.create_server(("127.0.0.1", 0))
    with caplog.at_level(logging.ERROR, logger="dmm.policy"):
        with srv, dsocket.create_connection(srv.getsockname()) as s:
            assert s.dmm_stack == "kernel"
    assert "broken" in caplog.text and "boom" in caplog.text
    assert "not a decision" in caplog.text


def test_hook_naming_unknown_stack_falls_through(caplog):
    use_config(TWO_KERNELS)
    dmm.policy.register(lambda req: ["ghost"])
    rt = dmm.runtime.get()
    with caplog.at_level(logging.ERROR, logger="dmm.policy"):
        out = rt.decide(Request("connect", stdsocket.AF_INET, stdsocket.SOCK_STREAM, "10.0.0.1", 80), explain=True)
    assert out.stack == "kernel" and out.source == "default"
    assert any("ghost" in line for line in out.trace)
    assert "'ghost', which no configured stack is" in caplog.text


def test_a_hook_past_the_sockets_timeout_is_abandoned_and_connect_times_out(caplog):
    use_config(TWO_KERNELS)
    release, finished = threading.Event(), []
    srv = dsocket.create_server(("127.0.0.1", 0))  # before the hook, which would hold up listen()

    @dmm.policy.register
    def stuck(req):
        release.wait(30)
        finished.append(req.role)
        return "mptcp"

    try:
        with caplog.at_level(logging.ERROR, logger="dmm.policy"):
            with pytest.raises(TimeoutError):
                dsocket.create_connection(srv.getsockname(), timeout=0.5)
        # connect() gave up while the hook was still running.
        assert finished == []
        assert "hook" in caplog.text and "stuck" in caplog.text and "abandoned" in caplog.text
    finally:
        release.set()
        srv.close()


def test_a_slow_hook_within_the_timeout_decides_and_the_timeout_stays():
    use_config(TWO_KERNELS)
    dmm.policy.register(lambda req: time.sleep(0.2) or "mptcp")
    with dsocket.create_server(("127.0.0.1", 0)) as srv:
        with dsocket.create_connection(srv.getsockname(), timeout=5) as s:
            assert s.dmm_stack == "mptcp"
            assert s.gettimeout() == 5
        with dsocket.socket() as s:
            s.settimeout(5)
            assert s.connect_ex(srv.getsockname()) == 0 and s.dmm_stack == "mptcp"


def test_an_inline_hook_runs_in_the_callers_thread_and_is_not_abandoned():
    use_config(TWO_KERNELS)
    threads, finished = [], []

    def slow(req):
        threads.append(threading.current_thread())
        time.sleep(0.4)
        finished.append(req.role)
        return "mptcp"

    dmm.policy.register(slow, roles=("connect",), inline=True)
    with dsocket.create_server(("127.0.0.1", 0)) as srv:
        # Not abandoned: the hook runs to its end, and then the connect,
        # whose 0.2 s are spent, times out.
        with pytest.raises(TimeoutError):
            dsocket.create_connection(srv.getsockname(), timeout=0.2)
        assert finished == ["connect"]
        with dsocket.create_connection(srv.getsockname(), timeout=5) as s:
            assert s.dmm_stack == "mptcp"
    assert threads == [threading.current_thread()] * 2


def test_unregister_and_type_checks():
    f = dmm.policy.register(lambda r: None)
    dmm.policy.unregister(f)
    with pytest.raises(ValueError):
        dmm.policy.unregister(f)
    with pytest.raises(TypeError):
        dmm.policy.register("not callable")


def test_table_semantics_longest_prefix_ports_role_priority_ipv6():
    rt = use_config(TWO_KERNELS + """
[[route]]
to = "10.0.0.0/8"
stacks = ["mptcp"]

[[route]]
to = "10.1.0.0/16"
stacks = ["kernel"]

[[route]]
to = "10.1.0.0/16"
ports = "8000-8999"
priority = 5
stacks = ["mptcp"]

[[route]]
to = "10.2.0.0/16"
role = "listen"
stacks = ["mptcp"]

[[route]]
to = "2001:db8::/32"
stacks = ["mptcp"]
""")

    def pick(addr, port=80, role="connect", fam=stdsocket.AF_INET):
        return rt.decide(Request(role, fam, stdsocket.SOCK_STREAM, addr, port)).stack

    assert pick("10.9.9.9") == "mptcp"
    assert pick("10.1.2.3") == "kernel"
    assert pick("10.1.2.3", 8080) == "mptcp"
    assert pick("10.2.0.1") == "mptcp"  # /8 rule, the listen-only /16 does not apply
    assert pick("10.2.0.1", role="listen") == "mptcp"
    assert pick("2001:db8::1", fam=stdsocket.AF_INET6) == "mptcp"
    assert pick("2001:db9::1", fam=stdsocket.AF_INET6) == "kernel"
    assert pick("192.0.2.1") == "kernel"


def test_stack_counters_count_decisions():
    srv = dsocket.create_server(("127.0.0.1", 0))
    with srv, dsocket.create_connection(srv.getsockname()):
        conn, _ = srv.accept()
        conn.close()
    c = dsocket.stack_counters()["kernel"]
    assert c["listens"] == 1 and c["connects"] == 1 and c["accepts"] == 1


@needs_mptcp
def test_a_repeated_connect_follows_a_policy_change_and_what_rd_learns():
    # The second connect to a destination skips the decision (the runtime
    # remembers "the plain kernel, as the socket is"); a new table or new
    # L-RD knowledge must still be seen by the next one.
    use_config(TWO_KERNELS + "\n[paths]\nenabled = false\n")
    rt = dmm.runtime.get()
    srv = dsocket.create_server(("127.0.0.1", 0))
    addr = srv.getsockname()
    seen = []

    def serve(n):
        for _ in range(n):
            conn, _ = srv.accept()
            seen.append(conn.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL))
            conn.close()

    t = threading.Thread(target=serve, args=(4,))
    t.start()
    stacks = []
    for _ in range(2):
        with dsocket.socket() as s:
            s.connect(addr)
            stacks.append((s.dmm_stack, s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL)))
    key = (stdsocket.AF_INET, stdsocket.SOCK_STREAM, 0, addr)
    assert rt.direct(*key) == (rt.stacks["kernel"], None)
    rt.negotiator.rd.version += 1  # what L-RD knows changed: decide again
    assert rt.direct(*key) is None
    with dsocket.socket() as s:
        s.connect(addr)
        stacks.append((s.dmm_stack, s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL)))
    policy = dmm.config.parse(TWO_KERNELS + '\n[[route]]\nto = "127.0.0.1/32"\nstacks = ["mptcp"]\n', "<policy>")
    rt.apply_policy(policy.routes, None, "a test policy")
    with dsocket.socket() as s:
        s.connect(addr)
        stacks.append((s.dmm_stack, s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PROTOCOL)))
    t.join()
    srv.close()
    tcp = stdsocket.IPPROTO_TCP
    assert stacks == [("kernel", tcp)] * 3 + [("mptcp", IPPROTO_MPTCP)]
    assert len(seen) == 4
    assert dsocket.stack_counters()["kernel"]["connects"] == 3
