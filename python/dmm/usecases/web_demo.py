"""``dmm demo web``: use case 2, a dual-mode web server (root).

Runs :func:`dmm.usecases.dualmode_lab.run` (an unmodified ``http.server``
under ``dmm run``, one listening socket on the kernel and a smoltcp
instance, LAN clients admitted on smoltcp, the others on the kernel) and
prints what each client got and which stack the server accepted it on.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from . import dualmode_lab
from .filesync_demo import available

__all__ = ["run"]


def run(requests: int = 20, page_bytes: int = 100_000) -> int:
    """Runs the demo; returns a process exit code."""
    why = available()
    if why:
        print(f"dmm demo web: {why}")
        return 2
    with tempfile.TemporaryDirectory(prefix="dmm-web-") as tmp:
        res = dualmode_lab.run(Path(tmp), requests=requests, page_bytes=page_bytes, progress=print)
    stats = res.get("stats") or {}
    print("\nOne listening socket (http.server on 0.0.0.0:8080) spans the kernel and smoltcp (lan0); accept rules "
          "admit 10.77.x.0/24 on lan0 only, everyone else on the kernel.\n")
    header = f"{'client':<6} {'url':<36} {'requests':>8} {'status':>6} {'median ms':>9} {'p90 ms':>7}"
    print(header)
    print("-" * len(header))
    ok = True
    for side in ("lan", "wan"):
        got = res.get(side) or {}
        times = sorted(got.get("seconds") or [])
        good = got.get("status") == 200 and got.get("bytes") == page_bytes // 10 * 10 and len(times) == requests
        ok &= good
        med = f"{statistics.median(times) * 1e3:.2f}" if times else "-"
        p90 = f"{times[int(0.9 * (len(times) - 1))] * 1e3:.2f}" if times else "-"
        print(f"{side:<6} {res[side + '_url']:<36} {len(times):>8} {got.get('status') or 'failed':>6} {med:>9} "
              f"{p90:>7}" + ("" if good else f"   {got.get('error', '')[-300:]}"))
    print("\nthe server's stacks (dmm run --stats):")
    for name in ("lan0", "kernel"):
        c = stats.get(name, {})
        print(f"  {name:<7} accepted {c.get('accepts', 0):>3}, refused by policy {c.get('policy_refused', 0)}")
    if not stats:
        ok = False
        print("  (no --stats file: the server's stderr follows)\n" + res.get("server_stderr", "")[-2000:])
    return 0 if ok else 1
