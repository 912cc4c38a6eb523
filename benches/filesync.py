"""File-sync routing (use case 1, DESIGN.md section 7): kernel TCP for every
client against dmm, side by side, in one run.

Runs :func:`dmm.usecases.filesync_lab.run` (one server, clients on the
``internet``, ``inter-dc`` and ``intra-dc`` links; each uploads a file and
downloads it back, sha256 checked) ``--rounds`` times per kernel congestion
control and writes ``benches/results/filesync.md``, ``filesync.json`` and
``filesync.png``. Needs root.

By default dmm runs the adaptive policy with no route at all: each client
learns its path from its own connections (its L-RD store is kept across the
rounds of one congestion control, fresh for the next), so round 1 shows the
learning and the median shows what was learned. ``--routing routes`` uses
the hand-written route of the internet client's prefix instead.

``--tcp-cc default,cubic`` repeats the run with kernel TCP on CUBIC (set per
route in every namespace: the namespaces inherit the host's default, BBR
here, and refuse a new default of cubic); the adaptive policy is told so.

    python benches/filesync.py [--size 32MB] [--rounds 3] [--tcp-cc default,cubic] [--routing adaptive]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from dmm.usecases import filesync_lab
from dmm.usecases import filesync_report as report

HERE = Path(__file__).resolve().parent


def parse_mb(text: str) -> int:
    t = text.lower().removesuffix("mb")
    return int(float(t) * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_mb, default=32 * 10 ** 6, help="file size, e.g. 32MB (default)")
    ap.add_argument("--rate-control", default="bbr", choices=["bbr", "fillp", "fixed"])
    ap.add_argument("--rounds", type=int, default=3, help="repeat the whole run; medians reported")
    ap.add_argument("--routing", default="adaptive", choices=["adaptive", "routes"])
    ap.add_argument("--tcp-cc", default="default",
                    help="kernel TCP congestion controls to run with, comma-separated "
                         "('default': the system's; e.g. default,cubic)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("filesync: needs root (CAP_NET_ADMIN) for network namespaces and TAP devices", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    by_cc: dict[str, list[dict]] = {}
    for cc in args.tcp_cc.split(","):
        with tempfile.TemporaryDirectory(prefix="dmm-filesync-state-") as state:
            for r in range(args.rounds):
                def say(text: str, r: int = r, cc: str = cc) -> None:
                    print(f"[tcp {cc}, round {r + 1}/{args.rounds}] {text}", file=sys.stderr, flush=True)

                with tempfile.TemporaryDirectory(prefix="dmm-filesync-") as tmp:
                    res = filesync_lab.run(args.size, Path(tmp), rate_control=args.rate_control,
                                           tcp_cc=None if cc == "default" else cc, progress=say,
                                           routing=args.routing, state=Path(state))
                by_cc.setdefault(cc, []).append(res)
    first = next(iter(by_cc.values()))[0]
    lines = ["# File-sync routing: kernel TCP for all vs dmm", "",
             f"Run {started}, {(time.monotonic() - t0) / 60:.1f} min in all; dmm under `dmm run`, Python "
             f"{platform.python_version()}, kernel {platform.release()}, {os.cpu_count()} CPUs (load average "
             f"{load0:.2f} at the start). Each client uploads a {args.size / 1e6:g} MB file (PUT) and downloads "
             "it back (GET), sha256 checked end to end; clients run one after the other; times from connect to "
             f"the last byte, median (and range) of {args.rounds} round(s). dmm routing: `{args.routing}`"
             + (" (no route: the adaptive policy decides each connection from what the client's earlier "
                "connections measured; the client's L-RD store is kept across the rounds, so round 1 "
                "includes the learning)" if args.routing == "adaptive" else "")
             + f". FillP rate control: `{args.rate_control}`. The stack columns list the stack of each "
             "round's connection. Ideal: size / (rate x (1 - loss)) + 2 RTT.", ""]
    for cc, rounds in by_cc.items():
        lines += [f"## Kernel TCP congestion control: `{rounds[0]['tcp_congestion_control']}`"
                  + (" (the system default here)" if cc == "default" else ""), ""] + report.markdown(rounds) + [""]
        last = {run.client: run for run in rounds[-1]["runs"] if run.mode == "dmm"}
        lines += ["What each client's dmm knew after the last round, and what it decides for its next "
                  "connection (`dmm paths`, `dmm route explain`, in its namespace):", ""]
        for client, run in last.items():
            lines += [f"- **{client}**: measured {report.describe_path(run.path)}", "", "  ```",
                      *["  " + ln for ln in run.explain.splitlines()], "  ```"]
        lines.append("")
    why_not = report.plot({rounds[0]["tcp_congestion_control"]: rounds for rounds in by_cc.values()},
                          args.out / "filesync.png")
    lines += ["![file-sync times](filesync.png)" if why_not is None else f"(no plot: {why_not})", "",
              "The server under dmm: " + "; ".join(
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
