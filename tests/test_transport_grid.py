"""Smoke test of ``benches/transport_grid.py --quick``: it runs, and the
Markdown, JSON and (with matplotlib) PNG it writes are well formed. Tiny
transfers; no timing is checked. Needs root for the lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benches" / "transport_grid.py"

needs_root = pytest.mark.needs_root("CAP_NET_ADMIN, for network namespaces and TAP devices")


@needs_root
def test_quick_grid_writes_its_results(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--rtt", "10", "--size", "500kB",
                           "--max-seconds", "10", "--fairness-seconds", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "transfers]" in done.stderr  # the progress display
    data = json.loads((tmp_path / "transport.json").read_text())
    contenders = data["meta"]["contenders"]
    assert len(contenders) == 5
    assert [(c["rtt_ms"], c["loss_pct"]) for c in data["cells"]] == [(10, 0), (10, 2)]
    for cell in data["cells"]:
        assert set(cell["results"]) == set(contenders)
        for name, res in cell["results"].items():
            assert "error" not in res, (name, res)
            assert res["bytes"] > 0 and res["goodput_mbit"] > 0, (name, res)
            assert res["stack"] == ("wan" if name.startswith("fillp-") else "kernel"), (name, res)
            assert res["linkem"]["up"]["frames_in"] > 0
        assert cell["targets"], cell
    assert cell["mathis_mbit"] > 0
    assert [f["pair"] for f in data["fairness"]] == [["fillp-bbr", "cubic"], ["cubic", "cubic"],
                                                     ["cubic", "tcp-bbr"]]
    assert all(0.5 <= f["jain"] <= 1.0 for f in data["fairness"])
    md = (tmp_path / "transport.md").read_text()
    assert md.startswith("# Transport grid")
    table = [ln for ln in md.splitlines() if ln.startswith("| 10 |")]
    assert len(table) == 2 and all(ln.count("|") == table[0].count("|") for ln in table)
    assert "Jain" in md and "Is the emulator the bottleneck?" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in md
    else:
        assert (tmp_path / "transport.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
