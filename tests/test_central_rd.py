"""Central RD against real etcd servers (Debian's etcd-server).

The test process plays one host (its own runtime, ``host = "b"``); other
hosts are child processes with configs of their own. Every test has an
etcd of its own (a single member, or three), so no test sees another's keys.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import dmm.policy
import dmm.socket as dsocket
from dmm.rd import central as central_mod
from dmm.rd.paths import Sample

from conftest import use_config
from etcd_cluster import Cluster

pytest.importorskip("aetcd", reason="needs the etcd client: pip install 'dmm[central]'")

TWO = """
[[stack]]
name = "kernel"
kind = "kernel"
[[stack]]
name = "wan"
kind = "fillp"
"""


def rd_section(cluster, host, extra=""):
    urls = ", ".join(f'"{u}"' for u in cluster.urls())
    return f'\n[rd]\ncentral = [{urls}]\nhost = "{host}"\nlease_ttl_s = 2\ntimeout_ms = 2000\n{extra}'


@pytest.fixture(autouse=True)
def stop_centrals():
    yield
    with central_mod._centrals_lock:
        centrals = list(central_mod._centrals.values())
        central_mod._centrals.clear()
    for c in centrals:
        c.stop()


def wait_for(check, timeout=10.0, step=0.01):
    """Polls ``check`` until it returns something true; returns it and the
    seconds it took."""
    t0 = time.monotonic()
    while True:
        v = check()
        if v:
            return v, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)


def connect_request(address, port=80):
    return dmm.policy.Request(role="connect", family=2, type=1, address=address, port=port)


SERVER = """
import sys, time, dmm.runtime, dmm.socket as s
from dmm import config
dmm.runtime.configure(config.parse(sys.argv[1], "<server>"))
l = s.socket(); l.bind(("127.0.0.1", 0)); l.listen(16)
print(l.getsockname()[1], flush=True)
while True:
    c, _ = l.accept(); c.close()
"""


def start_server(cluster, host, tmp_path):
    toml = TWO + '[listen]\nstacks = ["kernel", "wan"]\n' + rd_section(cluster, host)
    env = dict(os.environ, DMM_RD_DIR=str(tmp_path / f"lrd-{host}"))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, toml], stdout=subprocess.PIPE, text=True, env=env)
    return proc, int(proc.stdout.readline())


def test_a_listener_is_advertised_and_vanishes_within_the_ttl_after_its_process_dies(tmp_path):
    with Cluster(tmp_path) as etcd:
        proc, port = start_server(etcd, "a", tmp_path)
        try:
            rt = use_config(TWO + rd_section(etcd, "b"))
            facts, _ = wait_for(lambda: rt.negotiator.facts("127.0.0.1", port).get("fillp"))
            assert facts.speaks and facts.host == "a" and facts.pid == proc.pid
            assert rt.negotiator.facts("127.0.0.1", port)["tcp"].speaks
            stored = etcd.ctl("get", "--prefix", "/dmm/hosts/a/ads/", "--print-value-only").stdout
            ad = json.loads(stored.splitlines()[0])
            assert ad["addresses"] == ["127.0.0.1"] and ad["port"] == port and ["fillp", port] in ad["protocols"]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        # The lease (2 s) expires; every process's cache follows the watch.
        _, took = wait_for(lambda: "fillp" not in rt.negotiator.facts("127.0.0.1", port), timeout=10)
        assert took < 2 + 1.5, took
        assert etcd.ctl("get", "--prefix", "/dmm/hosts/a/", "--keys-only").stdout.strip() == ""


def test_a_pushed_policy_changes_the_next_decision_and_a_bad_one_is_refused(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="dmm.central")
    with Cluster(tmp_path) as etcd:
        rt = use_config(TWO + rd_section(etcd, "b"))
        wait_for(lambda: rt.central.connected)
        assert rt.decide(connect_request("10.9.3.4")).stack == "kernel"
        cfg = tmp_path / "dmm.toml"
        cfg.write_text(TWO + rd_section(etcd, "ops"))
        policy = tmp_path / "policy.toml"
        policy.write_text('[[route]]\nto = "10.9.0.0/16"\nstacks = ["wan"]\n')
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "dmm", "--config", str(cfg), "rd", "push", str(policy)],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, DMM_RD_DIR=str(tmp_path / "lrd-ops")))
        assert out.returncode == 0, out.stderr
        assert "revision" in out.stdout
        pushed = time.monotonic()
        outcome, _ = wait_for(lambda: (o := rt.decide(connect_request("10.9.3.4"))).stack == "wan" and o)
        assert time.monotonic() - pushed < 1.0, time.monotonic() - t0
        assert outcome.source.startswith("route[0] of central policy /dmm/policy@")
        # A policy naming a stack this host lacks is refused, with the key
        # and the field; the last good one stays in force.
        bad = '[[route]]\nto = "10.9.0.0/16"\nstacks = ["nosuch"]\n'
        etcd.ctl("put", "/dmm/policy", "--", bad)
        wait_for(lambda: rt.central.counters["policies_refused"] == 1)
        assert "/dmm/policy@" in caplog.text and "route[0].stacks" in caplog.text
        assert rt.decide(connect_request("10.9.3.4")).stack == "wan"
        # The CLI refuses it before it gets there.
        policy.write_text(bad)
        out = subprocess.run([sys.executable, "-m", "dmm", "--config", str(cfg), "rd", "push", str(policy)],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, DMM_RD_DIR=str(tmp_path / "lrd-ops")))
        assert out.returncode != 0 and "route[0].stacks" in out.stderr
        # No policy: the file's rules again.
        etcd.ctl("del", "/dmm/policy")
        wait_for(lambda: rt.decide(connect_request("10.9.3.4")).stack == "kernel")


PUBLISHER = """
import sys, time, dmm.runtime
from dmm import config
from dmm.rd.paths import Sample
rt = dmm.runtime.configure(config.parse(sys.argv[1], "<c>"))
for i in range(int(sys.argv[2])):
    rt.paths.record_path("10.9.1.%d" % (i % 200 + 1), Sample(80.0, 0.02, 40.0, "kernel", loss_weight=4.0))
    time.sleep(0.05)
time.sleep(1.5)
print(rt.central.counters["paths_written"], flush=True)
"""


def test_shared_path_estimates_steer_a_new_hosts_first_connection(tmp_path):
    with Cluster(tmp_path) as etcd:
        # Host c measured 10.9.1.0/24 as long and lossy, for 3 s.
        toml = TWO + rd_section(etcd, "c")
        out = subprocess.run([sys.executable, "-c", PUBLISHER, toml, "60"], capture_output=True, text=True,
                             timeout=60, env=dict(os.environ, DMM_RD_DIR=str(tmp_path / "lrd-c")))
        assert out.returncode == 0, out.stderr
        # At most one write per prefix per 10 s: one for 10.9.1.0/24.
        assert int(out.stdout) == 1
        # Host b never connected there; with the adaptive policy its first
        # connect already goes to FillP.
        rt = use_config(TWO + "[adaptive]\ncongestion = \"cubic\"\n" + rd_section(etcd, "b"))
        est, _ = wait_for(lambda: rt.path_for("10.9.1.77"))
        # (What c had when it wrote: its first write came a second in.)
        assert est.key == "10.9.1.0/24" and 1 <= est.samples < 60
        assert abs(est.rtt_ms - 80) < 1 and abs(est.loss - 0.02) < 1e-3
        assert rt.decide(connect_request("10.9.1.77")).candidates[0] == "wan"
        # What b measures itself comes first.
        rt.paths.record_path("10.9.1.77", Sample(1.0, 0.0, 900.0, "kernel", loss_weight=4.0))
        assert rt.path_for("10.9.1.77").rtt_ms == 1.0
        assert rt.decide(connect_request("10.9.1.77")).candidates == ("kernel",)


def test_routing_goes_on_while_etcd_restarts_and_the_lease_is_published_again(tmp_path):
    with Cluster(tmp_path) as etcd:
        rt = use_config(TWO + '[listen]\nstacks = ["kernel", "wan"]\n' + rd_section(etcd, "b"))
        srv = dsocket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        key = f"/dmm/hosts/b/ads/127.0.0.1:{port}:{os.getpid()}"
        wait_for(lambda: etcd.ctl("get", key, "--keys-only").stdout.strip())
        stop = threading.Event()
        failures, done = [], [0]

        def accept():
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                    c.close()
                except OSError:
                    return

        def clients():
            while not stop.is_set():
                try:
                    c = dsocket.create_connection(("127.0.0.1", port), timeout=5)
                    c.close()
                    done[0] += 1
                except OSError as exc:
                    failures.append(exc)
                time.sleep(0.002)

        threads = [threading.Thread(target=accept), threading.Thread(target=clients)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            etcd.stop()
            wait_for(lambda: not rt.central.connected, timeout=15)
            before = done[0]
            time.sleep(1.0)
            assert done[0] > before  # connections go on with etcd down
            etcd.start(new=False)
            wait_for(lambda: rt.central.connected, timeout=20)
            # The restarted etcd gets the advertisement again, on a new lease.
            wait_for(lambda: etcd.ctl("get", key, "--keys-only").stdout.strip(), timeout=10)
        finally:
            # Clients first: a connection still in the accept queue when the
            # listener closes is reset, which is not etcd's doing.
            stop.set()
            threads[1].join(10)
            srv.close()
            threads[0].join(10)
        assert failures == [] and done[0] > 100
        assert rt.central.counters["sessions"] >= 2


def test_malformed_values_are_ignored_and_counted(tmp_path):
    with Cluster(tmp_path) as etcd:
        rt = use_config(TWO + rd_section(etcd, "b"))
        wait_for(lambda: rt.central.connected)
        etcd.ctl("put", "/dmm/hosts/x/ads/10.1.1.1:80:1", "not json")
        etcd.ctl("put", "/dmm/hosts/x/ads/10.1.1.2:80:1",
                 json.dumps({"host": "x", "addresses": ["10.1.1.2"], "port": 99999, "protocols": [["fillp", 80]],
                             "stacks": [], "pid": 1}))
        etcd.ctl("put", "/dmm/hosts/x/paths/10.1.1.0/24", json.dumps({"rtt_sum": -1}))
        etcd.ctl("put", "/dmm/hosts/x/paths/10.1.1.0/24", json.dumps({"rtt_sum": float("inf")}).replace("Infinity", "1e999"))
        etcd.ctl("put", "/dmm/hosts/../ads/x", "{}")
        etcd.ctl("put", "/dmm/hosts/x/ads/10.1.1.3:80:1",
                 json.dumps({"host": "x", "addresses": ["10.1.1.3"], "port": 80, "protocols": [["fillp", 80]],
                             "stacks": ["wan"], "pid": 7}))
        fact, _ = wait_for(lambda: rt.negotiator.facts("10.1.1.3", 80).get("fillp"))
        assert fact.speaks and fact.pid == 7
        assert rt.central.counters["malformed"] == 5
        assert rt.negotiator.facts("10.1.1.1", 80) == {} and rt.negotiator.facts("10.1.1.2", 80) == {}
        assert rt.path_for("10.1.1.9") is None


def test_with_auth_a_host_writes_only_its_own_keys(tmp_path):
    with Cluster(tmp_path) as etcd:
        for args in (["user", "add", "root:rootpw"], ["user", "grant-role", "root", "root"]):
            etcd.ctl(*args)
        for h in ("a", "b"):
            etcd.ctl("role", "add", h)
            etcd.ctl("role", "grant-permission", h, "read", "/dmm/", "--prefix=true")
            etcd.ctl("role", "grant-permission", h, "readwrite", f"/dmm/hosts/{h}/", "--prefix=true")
            etcd.ctl("user", "add", f"{h}:{h}pw")
            etcd.ctl("user", "grant-role", h, h)
        etcd.ctl("auth", "enable")
        proc, port = start_server_with_auth(etcd, tmp_path)
        try:
            key_out = wait_for(lambda: etcd.ctl("get", "--prefix", "/dmm/hosts/a/ads/", "--keys-only",
                                                user="b:bpw").stdout.strip())[0]
            key = key_out.splitlines()[0]
            # Host b reads a's advertisement (its process routes on it) ...
            rt = use_config(TWO + rd_section(etcd, "b", 'user = "b"\npassword = "bpw"\n'))
            fact, _ = wait_for(lambda: rt.negotiator.facts("127.0.0.1", port).get("fillp"))
            assert fact.host == "a"
            # ... but can neither overwrite nor delete it, nor write the policy.
            for args in (["put", key, "{}"], ["del", key], ["put", "/dmm/policy", "x"]):
                out = etcd.ctl(*args, user="b:bpw", check=False)
                assert out.returncode != 0 and "permission denied" in out.stderr, (args, out.stderr)
            # Without credentials: nothing at all.
            out = etcd.ctl("get", "--prefix", "/dmm/", check=False)
            assert out.returncode != 0 and out.stdout == ""
            assert etcd.ctl("get", key, "--print-value-only", user="root:rootpw").stdout.strip() != "{}"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def start_server_with_auth(etcd, tmp_path):
    toml = (TWO + '[listen]\nstacks = ["kernel", "wan"]\n'
            + rd_section(etcd, "a", 'user = "a"\npassword = "apw"\n'))
    env = dict(os.environ, DMM_RD_DIR=str(tmp_path / "lrd-a"))
    proc = subprocess.Popen([sys.executable, "-c", SERVER, toml], stdout=subprocess.PIPE, text=True, env=env)
    return proc, int(proc.stdout.readline())


def test_a_three_member_cluster_loses_the_member_a_process_uses(tmp_path):
    with Cluster(tmp_path, size=3) as etcd:
        rt = use_config(TWO + rd_section(etcd, "b"))
        wait_for(lambda: rt.central.connected)
        used = next(m for m in etcd.members if m.endpoint == rt.central.endpoint)
        etcd.stop(used)
        others = [m.endpoint for m in etcd.members if m is not used]
        etcd.ctl("put", "/dmm/policy", "--", '[[route]]\nto = "10.9.0.0/16"\nstacks = ["wan"]\n', endpoints=others)
        slowest = [0.0]

        def decided_on_wan():
            t0 = time.monotonic()
            stack = rt.decide(connect_request("10.9.3.4")).stack
            slowest[0] = max(slowest[0], time.monotonic() - t0)
            return stack == "wan"

        wait_for(decided_on_wan, timeout=20)
        assert rt.central.endpoint in others
        # Decisions never waited on etcd meanwhile (they read the cache).
        assert slowest[0] < 0.05, slowest


def test_without_central_rd_nothing_changes_and_a_config_names_its_errors():
    rt = use_config(TWO)
    assert rt.central is None and rt.negotiator.rd.central is None
    from dmm import config

    for bad, field in (('central = ["https://10.0.0.1:2379"]', "rd.central"), ('central = "x"', "rd.central"),
                       ('user = "u"', "rd.password"), ('prefix = "dmm"', "rd.prefix"),
                       ("lease_ttl_s = 0", "rd.lease_ttl_s")):
        with pytest.raises(config.ConfigError) as err:
            config.parse(textwrap.dedent(TWO) + "[rd]\n" + bad + "\n", "dmm.toml")
        assert err.value.field == field and err.value.line is not None
