"""The package's types: the stubs match the built modules, and a program
typed against the stdlib's socket type-checks against ``dmm.socket``."""

import os
import re
import subprocess
import sys

HERE = os.path.join(os.path.dirname(__file__), "typecheck")


def mypy(*args):
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", *args], capture_output=True,
                          text=True, timeout=600)


def test_stubs_match_the_built_modules():
    out = subprocess.run([sys.executable, "-m", "mypy.stubtest", "dmm._core", "dmm.socket", "--allowlist",
                          os.path.join(HERE, "stubtest-allowlist.txt")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_a_stdlib_socket_program_type_checks_against_dmm_socket():
    out = mypy("--strict", os.path.join(HERE, "drop_in.py"))
    assert out.returncode == 0, out.stdout


def test_misuse_is_rejected_where_marked():
    path = os.path.join(HERE, "misuse.py")
    with open(path) as f:
        marked = {i for i, line in enumerate(f, 1) if "# E:" in line}
    out = mypy(path)
    flagged = {int(m.group(1)) for m in re.finditer(r"misuse\.py:(\d+): error", out.stdout)}
    assert marked and flagged == marked, out.stdout
