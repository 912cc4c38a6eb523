"""File-sync routing (use case 1, DESIGN.md section 7): kernel TCP for every
client against dmm routing the internet client over FillP, side by side.

Runs :func:`dmm.usecases.filesync_lab.run` (one server, clients on the
``internet``, ``inter-dc`` and ``intra-dc`` links; each uploads a file and
downloads it back, sha256 checked) and writes
``benches/results/filesync.md`` and ``filesync.json``. Needs root.

``--tcp-cc default,cubic`` repeats the run with kernel TCP on CUBIC (set per
route in every namespace: the namespaces inherit the host's default, BBR
here, and refuse a new default of cubic).

    python benches/filesync.py [--size 32MB] [--rate-control bbr] [--rounds 1] [--tcp-cc default,cubic]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from dmm.usecases import filesync_lab

HERE = Path(__file__).resolve().parent


def parse_mb(text: str) -> int:
    t = text.lower().removesuffix("mb")
    return int(float(t) * 1e6)


def table(rounds: list[dict]) -> list[str]:
    """The side-by-side table of one congestion control's rounds (medians)."""
    runs: dict = {}
    for res in rounds:
        for run in res["runs"]:
            runs.setdefault((run.client, run.mode), []).append(run)

    def med(client: str, mode: str, op: str) -> float | None:
        vals = [getattr(run, op).get("seconds") for run in runs[(client, mode)]]
        return None if any(v is None for v in vals) else statistics.median(vals)

    lines = ["| client | link | kernel PUT s | kernel GET s | dmm stack | dmm PUT s | dmm GET s | "
             "PUT speed-up | GET speed-up | sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for client, params in rounds[0]["links"].items():
        times = {(mode, op): med(client, mode, op) for mode in ("kernel", "dmm") for op in ("put", "get")}
        row = [client, params.replace(",", ", ")]
        row += ["failed" if times[k] is None else f"{times[k]:.2f}" for k in (("kernel", "put"), ("kernel", "get"))]
        row.append(runs[(client, "dmm")][0].put.get("stack") or "?")
        row += ["failed" if times[k] is None else f"{times[k]:.2f}" for k in (("dmm", "put"), ("dmm", "get"))]
        for op in ("put", "get"):
            k, d = times[("kernel", op)], times[("dmm", op)]
            row.append("-" if k is None or d is None else f"{k / d:.2f}x")
        ok = all(run.ok for mode in ("kernel", "dmm") for run in runs[(client, mode)])
        row.append("ok" if ok else "MISMATCH")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_mb, default=32 * 10 ** 6, help="file size, e.g. 32MB (default)")
    ap.add_argument("--rate-control", default="bbr", choices=["bbr", "fillp", "fixed"])
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole run; medians reported")
    ap.add_argument("--tcp-cc", default="default",
                    help="kernel TCP congestion controls to run with, comma-separated "
                         "('default': the system's; e.g. default,cubic)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("filesync: needs root (CAP_NET_ADMIN) for network namespaces and TAP devices", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    by_cc: dict[str, list[dict]] = {}
    for cc in args.tcp_cc.split(","):
        for r in range(args.rounds):
            def say(text: str, r: int = r, cc: str = cc) -> None:
                print(f"[tcp {cc}, round {r + 1}/{args.rounds}] {text}", file=sys.stderr, flush=True)

            with tempfile.TemporaryDirectory(prefix="dmm-filesync-") as tmp:
                res = filesync_lab.run(args.size, Path(tmp), rate_control=args.rate_control,
                                       tcp_cc=None if cc == "default" else cc, progress=say)
            by_cc.setdefault(cc, []).append(res)
    first = next(iter(by_cc.values()))[0]
    lines = ["# File-sync routing: kernel TCP for all vs dmm routing per client", "",
             f"Run {started}; dmm under `dmm run`, Python {platform.python_version()}, kernel {platform.release()}, "
             f"{os.cpu_count()} CPUs shared with other work (load average {load0:.2f} at the start). "
             f"Each client uploads a {args.size / 1e6:g} MB file (PUT) and downloads it back (GET), sha256 checked "
             f"end to end; clients run one after the other; times from connect to the last byte, median of "
             f"{args.rounds} round(s). FillP rate control: `{args.rate_control}`. Kernel TCP's congestion control "
             "applies to every kernel connection, under dmm too: inter-dc and intra-dc are on kernel TCP in both "
             "columns, so their differences are run-to-run variance, not dmm.", ""]
    for cc, rounds in by_cc.items():
        lines += [f"## Kernel TCP congestion control: `{rounds[0]['tcp_congestion_control']}`"
                  + (" (the system default here)" if cc == "default" else ""), ""] + table(rounds) + [""]
    runs = {run.client: run for run in first["runs"] if run.mode == "dmm"}
    lines += ["Routing decisions under dmm (`dmm route explain`, run in each client's namespace):", ""]
    for client, run in runs.items():
        lines += [f"- **{client}**:", "", "  ```", *["  " + ln for ln in run.explain.splitlines()], "  ```"]
    lines += ["", "The server under dmm: " + "; ".join(
        f"one listening socket on {li['listening']}, stacks `{', '.join(li.get('stacks') or [li['stack']])}`"
        for li in first["listeners"]["dmm"]) + " (see dmm.usecases.filesync_lab).", "",
        "The config every dmm process used:", "", "```toml", first["config"].rstrip(), "```", ""]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filesync.md").write_text(text)
    data = {cc: [dict(res, runs=[asdict(run) for run in res["runs"]]) for res in rounds]
            for cc, rounds in by_cc.items()}
    (args.out / "filesync.json").write_text(json.dumps(data, indent=1))
    print(text)
    return 0 if all(run.ok for rounds in by_cc.values() for res in rounds for run in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
