"""CPython's own socket, selectors and asyncio-streams suites on every stack.

Each suite runs once with the plain stdlib (the baseline: what passes on
this machine) and once per stack kind with ``dmm.patch_all()`` under a
config that forces every stream socket onto that kind
(``tests/stack_kinds.py``). A test that passes with the stdlib must pass
on the stack unless ``tests/stdlib/excluded.py`` lists it for that kind
with the reason; an excluded test that passes is a stale entry and fails
too, so the list stays what is true. ``builtin`` is dmm under its
built-in config (the single-kernel fast path). The pass counts per stack
and suite are printed at the end of the pytest run.
"""

import functools
import json
import os
import subprocess
import sys

import pytest

import stack_kinds
from stdlib.excluded import EXCLUDED, HANGS

RUNNER = os.path.join(os.path.dirname(__file__), "stdlib", "run_cpython_suite.py")
SUITES = ("socket", "selectors", "asyncio_streams")
KINDS = ("builtin", *stack_kinds.CONFIGS)
BAD = ("fail", "error")
RANK = {"pass": 0, "skip": 1, "fail": 2, "error": 3}

#: (kind, suite) -> counts, printed by conftest's terminal summary.
RESULTS = stack_kinds.RESULTS


def run_suite(suite, env, *flags):
    """Runs ``suite``; returns {test id: worst outcome} (a threaded test can
    report both a failure and an error)."""
    out = subprocess.run([sys.executable, RUNNER, suite, *flags], capture_output=True, text=True, timeout=1800,
                         env=env)
    assert out.returncode == 0, f"exit {out.returncode} (a test that hung dumps its stacks):\n{out.stderr[-8000:]}"
    outcomes = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if RANK[entry["outcome"]] >= RANK.get(outcomes.get(entry["id"]), -1):
                outcomes[entry["id"]] = entry["outcome"]
    assert outcomes, out.stderr[-3000:]
    return outcomes, out.stderr


@functools.cache
def baseline(suite):
    env = {k: v for k, v in os.environ.items() if k != "DMM_CONFIG"}
    return run_suite(suite, env)[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("suite", SUITES)
def test_cpython_suite_on_each_stack(suite, kind, tmp_path):
    why = stack_kinds.unavailable(kind)
    if why:
        pytest.skip(why)
    env = dict(os.environ, DMM_RD_DIR=str(tmp_path / "lrd"))
    env.pop("DMM_CONFIG", None)
    if kind != "builtin":
        cfg = tmp_path / "dmm.toml"
        cfg.write_text(stack_kinds.toml(kind))
        env["DMM_CONFIG"] = str(cfg)
    plain = baseline(suite)
    hangs = HANGS.get(kind, {})
    got, stderr = run_suite(suite, env, "--dmm", *(a for i in hangs for a in ("--skip", i)))
    passing = {i for i, o in plain.items() if o == "pass"}
    excluded = {i: why for i, why in EXCLUDED.get(kind, {}).items() if i in passing}
    not_run = {i for i in hangs if i in passing}
    passed = {i for i, o in got.items() if o == "pass"}
    RESULTS[(kind, suite)] = {"passed": len(passed & passing), "run": len(passing),
                              "excluded": len(excluded) + len(not_run)}
    new = sorted(i for i in passing if got.get(i) in BAD and i not in excluded)
    missing = sorted(passing - set(got) - not_run)
    stale = sorted(i for i in excluded if got.get(i) == "pass")
    assert not missing, f"{kind}: tests that never reported (a hang?): {missing[:20]}"
    assert not new, f"{kind}: fail with dmm, pass with the stdlib: {new}\n{stderr[-6000:]}"
    assert not stale, f"{kind}: excluded but passing now (remove from tests/stdlib/excluded.py): {stale}"
