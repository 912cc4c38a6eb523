"""The `dmm` command."""

import json
import os
import subprocess
import sys

import pytest

import dmm
from dmm import cli

from conftest import TWO_KERNELS, mptcp_available


def run(args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "dmm", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **(env or {})), timeout=120)


def test_version_and_help():
    out = run(["--version"])
    assert out.returncode == 0 and out.stdout.strip() == f"dmm {dmm.__version__}"
    out = run(["--help"])
    assert out.returncode == 0
    for word in ("run", "stacks", "routes", "route", "demo"):
        assert word in out.stdout


def write_config(tmp_path):
    path = tmp_path / "dmm.toml"
    path.write_text(TWO_KERNELS + """
[[route]]
to = "10.0.0.0/8"
stacks = ["mptcp", "kernel"]

[[route]]
to = "10.1.0.0/16"
ports = "443"
priority = 2
stacks = ["kernel"]
""")
    return path


def test_stacks_and_routes(tmp_path):
    write_config(tmp_path)
    out = run(["stacks"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "kernel tcp, syscalls" in out.stdout and "kernel mptcp" in out.stdout
    out = run(["routes"], cwd=tmp_path)
    assert "route[0]  to 10.0.0.0/8 -> mptcp, kernel" in out.stdout
    assert "route[1]  to 10.1.0.0/16 ports 443 priority 2 -> kernel" in out.stdout
    assert "default   -> kernel" in out.stdout


def test_route_explain_names_the_rule_and_the_losers(tmp_path):
    write_config(tmp_path)
    out = run(["route", "explain", "10.1.2.3:443"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "-> kernel" in out.stdout and "route[1]" in out.stdout
    assert "also matched route[0]" in out.stdout
    out = run(["route", "explain", "10.9.9.9:80", "--udp"], cwd=tmp_path)
    assert "-> kernel" in out.stdout and "mptcp cannot carry it" in out.stdout
    out = run(["route", "explain", "192.0.2.1:80"], cwd=tmp_path)
    assert "decided by: default" in out.stdout and "no route matched" in out.stdout
    out = run(["route", "explain", "[2001:db8::1]:80", "--stack", "mptcp"], cwd=tmp_path)
    assert "-> mptcp" in out.stdout and "override" in out.stdout
    out = run(["route", "explain", "nonsense"], cwd=tmp_path)
    assert out.returncode != 0 and "HOST:PORT" in out.stderr


def test_bad_config_is_reported_not_raised(tmp_path):
    (tmp_path / "dmm.toml").write_text('[[stack]]\nname = "k"\nkind = "kernel"\nio = "fast"\n')
    out = run(["stacks"], cwd=tmp_path)
    assert out.returncode != 0 and "dmm.toml:4: stack[0].io" in out.stderr and "Traceback" not in out.stderr


def test_demo_runs_on_builtin_defaults(tmp_path):
    out = run(["demo", "loopback", "--size", "8"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    rows = [line for line in lines if line.startswith("127.0.0.")]
    assert len(rows) == 3 and all(" ok " in r for r in rows)
    # 127.0.0.2 is routed to the instance named "mptcp" (plain TCP where MPTCP is refused).
    assert rows[0].split()[1] == "kernel" and rows[1].split()[1] == "mptcp"
    assert rows[1].split()[3] == ("MPTCP" if mptcp_available() is None else "TCP")
    # 127.0.0.3 goes over FillP, to a FillP listener on the same port number.
    assert rows[2].split()[1:4] == ["wan", "route[1]", "FillP"] and rows[2].split()[-1] == "wan"


@pytest.mark.needs_root("the file-sync lab (namespaces, TAP devices)")
def test_demo_as_root_runs_the_filesync_lab(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dmm", "demo", "--size", "1", "--rounds", "1", "--out", "res"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "res" / "filesync.md").read_text()
    assert "## Kernel TCP: cubic (set per route)" in report
    rows = [ln for ln in report.splitlines() if ln.startswith("| internet ") or ln.startswith("| intra-dc ")]
    assert len(rows) == 4 and all(r.rstrip().endswith("| ok |") for r in rows), rows
    # The first connection of a path is the kernel's: it measures the path.
    assert all(r.split("|")[6].strip().startswith("kernel") for r in rows), rows
    assert (tmp_path / "res" / "filesync.png").stat().st_size > 10_000
    assert "decided by: adaptive" in out.stdout


@pytest.mark.needs_root("namespaces and a TAP device for smoltcp")
def test_demo_web_serves_lan_on_smoltcp_and_wan_on_the_kernel():
    out = subprocess.run([sys.executable, "-m", "dmm", "demo", "web"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines() if ln.startswith(("lan ", "wan "))}
    assert rows["lan"][2:4] == ["20", "200"] and rows["wan"][2:4] == ["20", "200"], out.stdout
    assert "lan0    accepted  20, refused by policy 0" in out.stdout
    assert "kernel  accepted  20, refused by policy 0" in out.stdout


def test_main_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_run_writes_stack_counters_on_exit(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import socket\n"
        "srv = socket.create_server(('127.0.0.1', 0))\n"
        "c = socket.create_connection(srv.getsockname())\n"
        "conn, _ = srv.accept()\n"
        "raise KeyboardInterrupt  # the stats are written on the way out too\n"
    )
    stats = tmp_path / "stats.json"
    proc = run(["run", "--stats", str(stats), str(script)])
    assert proc.returncode != 0 and "KeyboardInterrupt" in proc.stderr
    counts = json.loads(stats.read_text())
    assert counts["kernel"]["connects"] == 1 and counts["kernel"]["accepts"] == 1 and counts["kernel"]["listens"] == 1
