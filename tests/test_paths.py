"""Path knowledge: samples, aging, the shared store, conditions and the
adaptive policy's choices (without a lab; ``test_paths_lab.py`` measures
real emulated links)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

import dmm.policy
import dmm.runtime
import dmm.socket as dsocket
from dmm import _sampling
from dmm import config as dconfig
from dmm.adaptive import Adaptive, AdaptiveSpec
from dmm.rd import paths
from dmm.rd.paths import Aggregate, Estimate, Sample, keys_for, prefix_key, sample_from_counters

from conftest import TWO_KERNELS, mptcp_available, use_config

TWO = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"
"""


def est(rtt=None, loss=None, rate=None, samples=1):
    return Estimate("10.0.0.1", rtt, loss, rate, samples, 0.0)


# -- samples and aggregates ------------------------------------------------------


def test_a_kernel_sample_takes_min_rtt_and_loss_only_from_a_bulk_sender():
    bulk = {"min_rtt_us": 80_500, "rtt_us": 95_000, "bytes_sent": 4_000_000, "bytes_retransmitted": 40_000,
            "bytes_received": 10, "delivery_rate_bps": 93_000_000}
    s = sample_from_counters(bulk, 2.0, "kernel")
    assert (s.rtt_ms, s.loss, s.rate_mbit, s.stack) == (80.5, 0.01, 93.0, "kernel")
    short = dict(bulk, bytes_sent=2000, bytes_retransmitted=1000)
    s = sample_from_counters(short, 0.1)
    assert (s.rtt_ms, s.loss, s.rate_mbit) == (80.5, None, None)
    # A receiver: its rate is what it received over the connection's life.
    recv = {"min_rtt_us": 1000, "bytes_sent": 100, "bytes_received": 5_000_000}
    assert sample_from_counters(recv, 4.0).rate_mbit == pytest.approx(10.0)
    assert sample_from_counters({}, 1.0).empty()


def test_a_fillp_sample_counts_resent_datagrams_over_the_whole_connection():
    c = {"min_rtt_us": 20_000, "bytes_sent": 1 << 20, "loss_ppm": 3_000, "delivery_rate_bps": 50_000_000,
         "packets_sent": 1000, "retransmits": 12}
    s = sample_from_counters(c, 1.0, "wan")
    assert (s.rtt_ms, s.loss, s.rate_mbit) == (20.0, 0.012, 50.0)


def test_aggregates_halve_their_weight_every_half_life():
    a = Aggregate(updated=1000.0).add(Sample(rtt_ms=10.0, loss=0.0), 1000.0, 600)
    # A sample one half-life later weighs twice the old one.
    a = a.add(Sample(rtt_ms=40.0), 1600.0, 600)
    e = a.estimate("k", 1600.0, 600)
    assert e.rtt_ms == pytest.approx((10 * 0.5 + 40) / 1.5)
    assert e.loss == 0.0 and e.samples == 2 and e.age_s == 0
    # Aging keeps the mean and lowers the weight until it is gone.
    later = a.estimate("k", 1600.0 + 600 * 5, 600)
    assert later.rtt_ms == pytest.approx(e.rtt_ms) and later.age_s == 3000
    assert a.estimate("k", 1600.0 + 600 * 12, 600) is None


def test_loss_is_pooled_by_the_bytes_it_was_measured_over():
    # 1 MiB with no loss seen, then 9 MiB at 1%: 0.9%, not the 0.5% a plain mean says.
    a = Aggregate(updated=0.0).add(Sample(loss=0.0, loss_weight=1.0), 0.0, 600)
    a = a.add(Sample(loss=0.01, loss_weight=9.0), 0.0, 600)
    assert a.estimate("k", 0.0, 600).loss == pytest.approx(0.009)
    assert sample_from_counters({"bytes_sent": 4 << 20, "bytes_retransmitted": 0}, 1.0).loss_weight == 4.0


def test_prefix_keys_for_both_families():
    assert prefix_key("10.1.2.3", 24) == "10.1.2.0/24"
    assert prefix_key("fd00:1:2:3:4::5", 64) == "fd00:1:2:3::/64"
    assert prefix_key("not an address", 24) is None
    assert keys_for("10.1.2.3", 16, 64) == ("10.1.2.3", "10.1.0.0/16")


# -- the store, this process and others ----------------------------------------------


def test_closing_connections_leave_samples_that_routing_sees(monkeypatch):
    monkeypatch.setattr(_sampling, "SHORT", 0.0)  # both count, however short
    rt = use_config(TWO)
    srv = dsocket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def sink():
        for _ in range(2):
            c, _ = srv.accept()
            while c.recv(1 << 16):
                pass
            c.sendall(b"done")
            c.close()

    t = threading.Thread(target=sink)
    t.start()
    for size in (1 << 20, 100):
        c = dsocket.create_connection(("127.0.0.1", port))
        c.sendall(b"x" * size)
        c.shutdown(dsocket.SHUT_WR)
        assert c.recv(16) == b"done"
        c.close()
    t.join(5)
    srv.close()
    e = rt.path_for("127.0.0.1")
    assert e.samples == 2 and e.key == "127.0.0.1"
    assert 0 < e.rtt_ms < 5 and e.loss == 0.0 and e.rate_mbit > 0
    # Another address in the same /24 has the prefix's estimate.
    assert rt.path_for("127.0.0.9").key == "127.0.0.0/24"
    assert rt.path_for("10.9.9.9") is None


def test_of_many_short_connections_to_one_address_one_a_second_is_sampled(monkeypatch):
    monkeypatch.setattr(_sampling, "_short_last", {})  # no other test's
    rt = use_config(TWO)
    srv = dsocket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve(n):
        for _ in range(n):
            c, _ = srv.accept()
            c.recv(16)
            c.close()

    def connect(hold=0.0):
        c = dsocket.create_connection(("127.0.0.1", port))
        time.sleep(hold)
        c.sendall(b"x")
        c.close()

    t = threading.Thread(target=serve, args=(22,))
    t.start()
    for _ in range(20):
        connect()
    assert rt.path_for("127.0.0.1").samples == 1
    # A connection that lived longer than SHORT always leaves its sample;
    # after SHORT_EVERY, a short one does again.
    connect(hold=_sampling.SHORT * 2)
    assert rt.path_for("127.0.0.1").samples == 2
    monkeypatch.setattr(_sampling, "SHORT_EVERY", 0.0)
    connect()
    assert rt.path_for("127.0.0.1").samples == 3
    t.join(5)
    srv.close()


def test_since_takes_differences_of_cumulative_counters_only():
    before = {"bytes_sent": 100, "retransmits": 2, "min_rtt_us": 900}
    now = {"bytes_sent": 350, "retransmits": 5, "min_rtt_us": 800, "delivery_rate_bps": 10}
    assert paths.since(now, before) == {"bytes_sent": 250, "retransmits": 3, "min_rtt_us": 800,
                                        "delivery_rate_bps": 10}


def test_a_long_connection_leaves_samples_while_open():
    """With sample_every_s = 1 a connection still open is measured: its
    estimate is there before it closes, and it counts as one connection
    once it does."""
    rt = use_config(TWO + "[paths]\nsample_every_s = 1\n")
    srv = dsocket.create_server(("127.0.0.1", 0))
    c = dsocket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    with srv, conn:
        c.sendall(b"x" * (1 << 20))
        got = 0
        while got < 1 << 20:
            got += len(conn.recv(1 << 16))
        deadline = time.monotonic() + 10
        while rt.path_for("127.0.0.1") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        e = rt.path_for("127.0.0.1")
        assert e is not None, "no sample from the open connection"
        assert e.samples == 0 and 0 < e.rtt_ms < 5 and e.loss == 0.0
        c.close()
    e = rt.path_for("127.0.0.1")
    assert e.samples == 1


def test_a_store_locked_by_another_process_is_waited_out_not_given_up():
    rt = use_config(TWO)
    store = rt.paths.path / "lrd.sqlite"
    rt.paths.submit(lambda: None)
    deadline = time.monotonic() + 5
    while not store.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    # Another process's writer holds the lock past SQLite's 2 s busy timeout.
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys, time\n"
                               "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                               "db.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(2.5)\n"
                               "db.execute('ROLLBACK')", str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for _ in range(5):
            rt.paths.record_path("10.20.30.40", Sample(rtt_ms=10.0))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run([sys.executable, "-c", "import sqlite3, sys\n"
                                  "print(sqlite3.connect(sys.argv[1], timeout=10).execute("
                                  "\"SELECT samples FROM paths WHERE key = '10.20.30.0/24'\").fetchone())", str(store)],
                                 capture_output=True, text=True, check=True)
            if out.stdout.strip() == "(5.0,)" or out.stdout.strip() == "(5,)":
                break
            time.sleep(0.2)
        assert out.stdout.strip() in ("(5.0,)", "(5,)"), out.stdout
    finally:
        holder.wait(10)
    counts = rt.paths.counters
    assert counts["store_busy"] >= 1 and counts["store_errors"] == 0, counts


def test_a_config_with_one_stack_measures_nothing():
    rt = use_config("[[stack]]\nname = 'kernel'\nkind = 'kernel'\n")
    assert rt.paths is None
    s = dsocket.socket()
    assert type(s) is dsocket.socket
    s.close()


PRODUCER = """
import sys, dmm.runtime
from dmm import config
from dmm.rd.paths import Sample
rt = dmm.runtime.configure(config.parse(sys.argv[1]))
for i in range(int(sys.argv[2])):
    rt.paths.record_path("10.20.30.40", Sample(rtt_ms=float(sys.argv[3])))
rt.paths.submit(lambda: None)
import time
deadline = time.time() + 10
while rt.paths._samples and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.2)
"""


def test_processes_share_the_path_store_and_lose_no_sample():
    procs = [subprocess.Popen([sys.executable, "-c", PRODUCER, TWO, "20", rtt]) for rtt in ("10", "30")]
    for p in procs:
        assert p.wait(60) == 0
    # A process started afterwards reads both producers' samples.
    out = subprocess.run([sys.executable, "-c", "import sys, json, dmm.runtime\nfrom dmm import config\n"
                          "rt = dmm.runtime.configure(config.parse(sys.argv[1]))\n"
                          "e = rt.path_for('10.20.30.77')\nprint(json.dumps([e.samples, e.rtt_ms, e.key]))", TWO],
                         capture_output=True, text=True, check=True)
    samples, rtt, key = json.loads(out.stdout)
    assert (samples, key) == (40, "10.20.30.0/24")
    assert rtt == pytest.approx(20.0, rel=0.01)
    listing = subprocess.run([sys.executable, "-m", "dmm", "paths"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, DMM_CONFIG=_write_config(TWO)))
    assert "10.20.30.40: rtt 20.0 ms" in listing.stdout and "40 samples" in listing.stdout


def _write_config(text):
    path = os.path.join(os.environ["DMM_RD_DIR"], "dmm.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


# -- conditions and rules without a destination --------------------------------------


def test_conditions_parse_with_units_and_bad_ones_name_file_line_field():
    cfg = dconfig.parse(TWO + """
[[route]]
when = { rtt_ms = ">= 0.03s", loss = "> 0.5%", rate_mbit = "< 1gbit", samples = ">= 2" }
stacks = ["wan"]
""")
    r = cfg.routes[0]
    assert r.to is None
    assert [(c.metric, c.op, c.value) for c in r.when] == [
        ("rtt_ms", ">=", 30.0), ("loss", ">", 0.005), ("rate_mbit", "<", 1000.0), ("samples", ">=", 2.0)]
    assert "to any" in r.describe() and "loss > 0.5%" in r.describe()
    bad = {
        'when = { rtt = ">= 3" }': ("route[0].when.rtt", "unknown metric"),
        'when = { rtt_ms = 30 }': ("route[0].when.rtt_ms", "expected an operator"),
        'when = { rtt_ms = "== 30" }': ("route[0].when.rtt_ms", "expected an operator"),
        'when = { loss = ">= 150%" }': ("route[0].when.loss", "at most 100%"),
        'when = { rate_mbit = "< 5 furlongs" }': ("route[0].when.rate_mbit", "unknown unit"),
        'when = {}': ("route[0].when", "expected a table"),
    }
    for line, (fld, message) in bad.items():
        with pytest.raises(dconfig.ConfigError) as info:
            dconfig.parse(TWO + f'\n[[route]]\nstacks = ["wan"]\n{line}\n', "t.toml")
        assert (info.value.field, info.value.line) == (fld, 12), line
        assert message in info.value.message


def test_other_path_sections_are_checked():
    for text, fld in [("[paths]\nhalf_life_s = 0", "paths.half_life_s"), ("[paths]\nprefix_v4 = 40", "paths.prefix_v4"),
                      ("[paths]\nspeed = 1", "paths.speed"), ("[adaptive]\nlossy = 'nope'", "adaptive.lossy"),
                      ("[adaptive]\ncongestion = 'Not A Name'", "adaptive.congestion")]:
        with pytest.raises(dconfig.ConfigError) as info:
            dconfig.parse(TWO + "\n" + text + "\n", "t.toml")
        assert info.value.field == fld and info.value.line is not None
    with pytest.raises(dconfig.ConfigError, match="no FillP stack"):
        use_config("[[stack]]\nname = 'k'\nkind = 'kernel'\n[[stack]]\nname = 'm'\nkind = 'memory'\n[adaptive]\n")


def test_a_rule_whose_conditions_have_no_data_does_not_match_until_measured():
    rt = use_config(TWO + """
[[route]]
when = { rtt_ms = ">= 30", loss = ">= 0.5%" }
stacks = ["wan", "kernel"]
race = false
""")
    req = dmm.policy.Request("connect", 2, 1, "10.7.0.5", 80)
    out = rt.decision("connect", 2, 1, "10.7.0.5", 80, None, {}, None)
    assert (out.stack, out.source) == ("kernel", "default")
    explained = rt.decide(req, explain=True)
    assert any("conditions not met (nothing measured)" in line for line in explained.trace)
    # A short connection measures RTT only: still no match (loss unknown).
    rt.paths.record_path("10.7.0.5", Sample(rtt_ms=80.0))
    assert rt.decision("connect", 2, 1, "10.7.0.5", 80, None, {}, None).source == "default"
    rt.paths.record_path("10.7.0.5", Sample(rtt_ms=80.0, loss=0.01))
    out = rt.decision("connect", 2, 1, "10.7.0.5", 80, None, {}, None)
    assert (out.stack, out.source, out.candidates) == ("wan", "route[0]", ("wan", "kernel"))
    # A neighbour in the same /24 matches through the prefix; IPv6 does not.
    assert rt.decision("connect", 2, 1, "10.7.0.99", 80, None, {}, None).source == "route[0]"
    assert rt.decision("connect", 10, 1, "fd00::1", 80, None, {}, None).source == "default"


@pytest.mark.skipif(mptcp_available() is not None, reason=str(mptcp_available()))
def test_repeated_connects_are_sampled_and_rerouted_once_the_path_is_measured(monkeypatch):
    # From the second connect to a destination on, the socket skips the
    # decision (the runtime remembers it); it must still leave its path
    # sample, and a new estimate must still change where the next one goes.
    monkeypatch.setattr(_sampling, "_short_last", {})  # no other test's
    rt = use_config(TWO_KERNELS + """
[[route]]
when = { rtt_ms = ">= 30" }
stacks = ["mptcp"]
race = false
""")
    srv = dsocket.create_server(("127.0.0.1", 0))
    addr = srv.getsockname()

    def serve(n):
        for _ in range(n):
            c, _ = srv.accept()
            c.close()

    t = threading.Thread(target=serve, args=(5,))
    t.start()
    stacks = []
    for _ in range(3):
        with dsocket.socket() as s:
            s.connect(addr)
            stacks.append(s.dmm_stack)
    # The first left a sample (of short connections, one a second does).
    assert rt.direct(dsocket.AF_INET, dsocket.SOCK_STREAM, 0, addr) is not None
    assert rt.path_for("127.0.0.1").samples == 1
    monkeypatch.setattr(_sampling, "SHORT_EVERY", 0.0)
    with dsocket.socket() as s:  # remembered, and sampled
        s.connect(addr)
        assert rt.direct(dsocket.AF_INET, dsocket.SOCK_STREAM, 0, addr) is not None
        stacks.append(s.dmm_stack)
    assert rt.path_for("127.0.0.1").samples == 2
    for _ in range(5):  # now it reads as a long path
        rt.paths.record_path("127.0.0.1", Sample(rtt_ms=80.0))
    assert rt.path_for("127.0.0.1").rtt_ms >= 30
    with dsocket.socket() as s:
        s.connect(addr)
        stacks.append(s.dmm_stack)
    t.join(5)
    srv.close()
    assert stacks == ["kernel"] * 4 + ["mptcp"]


def test_a_rule_without_to_matches_both_families():
    rt = use_config(TWO + '\n[[stack]]\nname = "k2"\nkind = "kernel"\n[[route]]\nstacks = ["k2"]\nrole = "connect"\n')
    for family, addr in ((2, "192.0.2.1"), (10, "2001:db8::1")):
        assert rt.decision("connect", family, 1, addr, 80, None, {}, None).stack == "k2"


def test_hooks_see_the_path():
    rt = use_config(TWO)
    seen = []
    dmm.policy.register(lambda req: seen.append(req.path) or None)
    rt.paths.record_path("10.8.0.1", Sample(rtt_ms=42.0, loss=0.02, rate_mbit=10.0))
    rt.decision("connect", 2, 1, "10.8.0.1", 80, None, {}, None)
    rt.decision("connect", 2, 1, "10.9.0.1", 80, None, {}, None)
    first, second = seen
    assert (first.rtt_ms, first.loss, first.rate_mbit) == pytest.approx((42.0, 0.02, 10.0))
    assert first.samples == 1
    assert first.age_s < 5 and second is None


# -- the adaptive policy ---------------------------------------------------------------


class _Inst:
    def __init__(self, keeps_fd, protocol):
        self.keeps_fd, self.protocol = keeps_fd, protocol


STACKS = {"kernel": _Inst(True, "tcp"), "wan": _Inst(False, "fillp")}


@pytest.mark.parametrize("cc, rtt, loss, fillp", [
    # The three lab profiles (internet, inter-DC, intra-DC).
    ("bbr", 80, 0.01, True), ("bbr", 20, 0.001, False), ("bbr", 0.2, 0.0, False),
    ("cubic", 80, 0.01, True), ("cubic", 20, 0.001, True), ("cubic", 0.2, 0.0, False),
    # The grid's edges: BBR loses to FillP at long RTT and heavy loss.
    ("bbr", 100, 0.0, True), ("bbr", 20, 0.10, True), ("bbr", 1, 0.20, True), ("bbr", 50, 0.05, True),
    ("bbr", 50, 0.002, False), ("bbr", 40, 0.02, False), ("bbr", 80, 0.001, False),
    ("cubic", 1, 0.001, False), ("cubic", 1, 0.01, True), ("reno", 10, 0.001, True),
])
def test_adaptive_choices_follow_the_measured_grid(cc, rtt, loss, fillp):
    a = Adaptive(AdaptiveSpec(congestion=cc), STACKS, ["kernel", "wan"])
    choice = a.choose(est(rtt, loss), None)
    assert choice.stacks == (("wan", "kernel") if fillp else ("kernel",)), choice.reason
    assert cc in choice.reason


def test_adaptive_measures_first_and_respects_what_the_peer_speaks():
    a = Adaptive(AdaptiveSpec(congestion="cubic"), STACKS, ["kernel", "wan"])
    assert a.choose(None, None).stacks == ("kernel",)
    assert a.choose(est(80), None).stacks == ("kernel",)  # loss not measured yet
    assert a.choose(est(80, 0.01), False).stacks == ("kernel",)
    assert "does not speak FillP" in a.choose(est(80, 0.01), False).reason
    assert a.choose(est(80, 0.01), True).stacks == ("wan", "kernel")


def test_adaptive_takes_the_default_routes_place_and_explains(capsys):
    rt = use_config(TWO + '\n[adaptive]\ncongestion = "cubic"\n[[route]]\nto = "10.1.0.0/16"\nstacks = ["kernel"]\n')
    rt.paths.record_path("10.2.0.1", Sample(rtt_ms=80.0, loss=0.01))
    rt.paths.record_path("10.1.0.1", Sample(rtt_ms=80.0, loss=0.01))
    out = rt.decision("connect", 2, 1, "10.2.0.1", 80, None, {}, None)
    assert (out.source, out.candidates) == ("adaptive", ("wan", "kernel"))
    # A rule still wins over the policy; datagrams and listeners are not its business.
    assert rt.decision("connect", 2, 1, "10.1.0.1", 80, None, {}, None).source == "route[0]"
    assert rt.decision("sendto", 2, 2, "10.2.0.1", 80, None, {}, None).source == "default"
    from dmm.cli import main

    path = _write_config(TWO + '\n[adaptive]\ncongestion = "cubic"\n')
    assert main(["--config", path, "route", "explain", "10.2.0.1:80"]) == 0
    text = capsys.readouterr().out
    assert "decided by: adaptive: cubic is loss-bound" in text and "note: path: 10.2.0.1: rtt 80.0 ms" in text
