"""Use case 1 end to end: the file-sync program in the lab, kernel TCP for
every client, then under ``dmm run`` with the internet client routed to FillP.

Checks correctness only (bytes, sha256, the stack each connection used);
timings belong to ``benches/filesync.py``. Needs root for the lab.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from dmm import config as dconfig
from dmm.lab.configs import fillp_routes_toml
from dmm.usecases import filesync_lab

needs_root = pytest.mark.needs_root("CAP_NET_ADMIN, for network namespaces and TAP devices")

SIZE = 3 * 10 ** 6


def test_config_routes_only_the_given_prefix_to_fillp():
    cfg = dconfig.parse(fillp_routes_toml(["10.201.1.0/24"]), "<filesync>")
    assert [s.name for s in cfg.stacks] == ["kernel", "wan"]
    assert cfg.stack("wan").kind == "fillp" and cfg.stack("wan").rate_control == "bbr"
    assert [(r.to, r.stacks) for r in cfg.routes] == [("10.201.1.0/24", ("wan", "kernel"))]
    assert not cfg.listen


@needs_root
def test_filesync_kernel_then_dmm(tmp_path):
    result = filesync_lab.run(SIZE, tmp_path)
    runs = {(r.client, r.mode): r for r in result["runs"]}
    assert set(runs) == {(c, m) for c in ("internet", "inter-dc", "intra-dc") for m in ("kernel", "dmm")}
    for (client, mode), run in runs.items():
        where = f"{client}/{mode}"
        assert run.put.get("ok") and run.get.get("ok"), (where, run.put, run.get)
        assert run.put["bytes"] == run.get["bytes"] == SIZE, where
        assert run.put["sha256"] == run.get["sha256"] == run.expected_sha256, where
        # Kernel mode is the plain program: no dmm at either end.
        want = None if mode == "kernel" else ("wan" if client == filesync_lab.FILLP_CLIENT else "kernel")
        assert run.put["stack"] == run.get["stack"] == want, where
        assert run.server_stacks == [want, want], where
    explained = runs[("internet", "dmm")].explain
    assert "-> wan" in explained and "route[0]" in explained
    assert "-> kernel" in runs[("intra-dc", "dmm")].explain
    # One listening socket on both stacks.
    assert [li["stacks"] for li in result["listeners"]["dmm"]] == [["kernel", "wan"]]


@needs_root
def test_filesync_adaptive_learns_from_the_first_transfer(tmp_path):
    """No route names any destination: each client's first connection goes
    to the kernel and measures its path, the next one (the GET) goes where
    the adaptive policy says for what was measured. Run twice with the same
    L-RD state, the second run starts from what the first one learned."""
    from dmm.adaptive import Adaptive, AdaptiveSpec
    from dmm.rd.paths import Estimate

    state = tmp_path / "state"
    first = filesync_lab.run(SIZE, tmp_path / "r1", routing="adaptive", tcp_cc="bbr", state=state)
    second = filesync_lab.run(SIZE, tmp_path / "r2", routing="adaptive", tcp_cc="bbr", state=state,
                              modes=("dmm",))
    assert "[adaptive]" in first["config"] and "[[route]]" not in first["config"]
    stacks = {"kernel": _Inst(True, "tcp"), "wan": _Inst(False, "fillp")}
    policy = Adaptive(AdaptiveSpec(congestion="bbr"), stacks, ["kernel", "wan"])
    for result in (first, second):
        for run in result["runs"]:
            where = f"{run.client}/{run.mode}"
            assert run.ok, (where, run.put, run.get)
            if run.mode == "kernel":
                continue
            assert run.server_stacks == [run.put["stack"], run.get["stack"]], where
            # What the client knows now, and what the policy makes of it.
            assert run.path is not None and run.path["samples"] >= 1, where
            est = Estimate(**{f.name: run.path.get(f.name) for f in dataclasses.fields(Estimate)})
            want = policy.choose(est, None).stacks[0]
            assert f"-> {want}" in run.explain, (where, run.explain, run.path)
    firsts = {run.client: run for run in first["runs"] if run.mode == "dmm"}
    assert all(run.put["stack"] == "kernel" for run in firsts.values()), "unmeasured paths go to the kernel"
    # The intra-DC path (0.2 ms, no loss) is the kernel's whatever it measured.
    assert {run.get["stack"] for run in second["runs"] if run.client == "intra-dc"} == {"kernel"}


class _Inst:
    def __init__(self, keeps_fd, protocol):
        self.keeps_fd, self.protocol = keeps_fd, protocol
