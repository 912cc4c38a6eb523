"""CPython's own test_socket, run against dmm.socket patched into the stdlib.

The suite runs twice on this machine, once plain and once with
``dmm.patch_all()``; dmm must add no failure of its own. (Tests that fail for
the plain stdlib here, if any, fail for reasons that are not dmm's.)
"""

import os
import subprocess
import sys

RUNNER = os.path.join(os.path.dirname(__file__), "stdlib", "run_cpython_test_socket.py")


def failures(*flags):
    out = subprocess.run([sys.executable, RUNNER, *flags], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAN" in out.stderr and int(out.stderr.split("RAN")[1].split()[0]) > 500, out.stderr[-2000:]
    return set(out.stdout.split("\n")) - {""}


def test_dmm_adds_no_failure_to_cpython_test_socket():
    plain = failures()
    with_dmm = failures("--dmm")
    assert with_dmm - plain == set()
