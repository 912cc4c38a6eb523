"""Shared fixtures: every test starts from the built-in config and no hooks."""

import os
import socket as stdsocket
import subprocess
import sys
import textwrap

import pytest

import dmm.policy
import dmm.runtime
from dmm import config as dconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.needs_root("why")``: skipped, saying why, unless root."""
    if os.geteuid() == 0:
        return
    for item in items:
        mark = item.get_closest_marker("needs_root")
        if mark is not None:
            why = mark.args[0] if mark.args else "namespaces and TAP devices"
            item.add_marker(pytest.mark.skip(reason=f"needs root: {why}"))


@pytest.fixture(autouse=True)
def fresh_runtime(monkeypatch, tmp_path_factory):
    """Built-in config, no hooks, nothing patched, and an L-RD store of its
    own (child processes inherit it), before and after each test."""
    monkeypatch.delenv("DMM_CONFIG", raising=False)
    monkeypatch.setenv("DMM_RD_DIR", str(tmp_path_factory.mktemp("lrd")))
    dmm.policy.clear()
    dmm.runtime.configure(dconfig.parse(dconfig.DEFAULT_TOML, "<test default>"))
    yield
    dmm.policy.clear()
    dmm.unpatch_all()
    dmm.runtime.reset()


def use_config(text):
    """Installs a config from TOML text and returns the runtime."""
    return dmm.runtime.configure(dconfig.parse(textwrap.dedent(text), "<test>"))


#: Destinations in ``{prefix}`` routed to a FillP instance ``wan`` with
#: rate control ``{mode}`` and any more keys in ``{extra}``; listeners on it
#: too.
FILLP_TO = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "wan"
kind = "fillp"
rate_control = "{mode}"
{extra}

[[route]]
to = "{prefix}"
stacks = ["wan"]

[listen]
stacks = ["wan"]
"""

#: Loopback routed to ``wan``; ``{mode}`` is its rate control.
FILLP_LOOPBACK = FILLP_TO.replace("{prefix}", "127.0.0.0/8").replace("{extra}", "")


TWO_KERNELS = """
[[stack]]
name = "kernel"
kind = "kernel"

[[stack]]
name = "mptcp"
kind = "kernel"
protocol = "mptcp"
"""


def mptcp_available():
    try:
        stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM, 262).close()
    except OSError as exc:
        return f"MPTCP sockets are refused here: {exc}"
    return None


def run_python(code, *args, timeout=60, env=None, **kw):
    """Runs Python code in a child process; returns CompletedProcess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kw)


def eventually(check, timeout=5.0):
    """Whether ``check()`` becomes true within ``timeout`` seconds (for state
    another thread brings about, such as a connection being reaped)."""
    import time

    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def pytest_terminal_summary(terminalreporter):
    """The conformance suite's pass counts per stack kind and suite."""
    import stack_kinds

    if not stack_kinds.RESULTS:
        return
    rep = terminalreporter
    rep.section("conformance: tests passing with the stdlib that pass on each stack")
    suites = sorted({suite for _, suite in stack_kinds.RESULTS})
    rep.write_line(f"{'stack':10}" + "".join(f"{s:>28}" for s in suites))
    for kind in dict.fromkeys(k for k, _ in stack_kinds.RESULTS):
        cells = []
        for suite in suites:
            r = stack_kinds.RESULTS.get((kind, suite))
            cells.append("-" if r is None else f"{r['passed']}/{r['run']} ({r['excluded']} excluded)")
        rep.write_line(f"{kind:10}" + "".join(f"{c:>28}" for c in cells))
