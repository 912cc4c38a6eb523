"""Any arguments to any public socket method, on every stack kind: the call
returns or raises one of the stdlib's exception types, and the process
lives (``tests/stdlib/call_with_any_args.py``, run in a child per kind)."""

import os
import subprocess
import sys

import pytest

import stack_kinds

SCRIPT = os.path.join(os.path.dirname(__file__), "stdlib", "call_with_any_args.py")
EXAMPLES = 1000


@pytest.mark.parametrize("kind", ("builtin", *stack_kinds.CONFIGS))
def test_any_arguments_raise_only_stdlib_errors(kind, tmp_path):
    why = stack_kinds.unavailable(kind)
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "DMM_CONFIG"}
    if kind != "builtin":
        cfg = tmp_path / "dmm.toml"
        cfg.write_text(stack_kinds.toml(kind))
        env["DMM_CONFIG"] = str(cfg)
    out = subprocess.run([sys.executable, SCRIPT, str(EXAMPLES)], capture_output=True, text=True, timeout=900,
                         env=env)
    # A negative code is a signal: a Rust abort or a crash.
    assert out.returncode == 0, f"exit {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    assert out.stdout.split() == ["OK", str(EXAMPLES)], out.stdout
