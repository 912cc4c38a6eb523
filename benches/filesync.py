"""File-sync routing (use case 1, DESIGN.md section 7): kernel TCP for every
client against dmm routing the internet client over FillP, side by side.

Runs :func:`dmm.usecases.filesync_lab.run` (one server, clients on the
``internet``, ``inter-dc`` and ``intra-dc`` links; each uploads a file and
downloads it back, sha256 checked) and writes
``benches/results/filesync.md`` and ``filesync.json``. Needs root.

    python benches/filesync.py [--size 32MB] [--rate-control bbr] [--rounds 1]
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_mb, default=32 * 10 ** 6, help="file size, e.g. 32MB (default)")
    ap.add_argument("--rate-control", default="bbr", choices=["bbr", "fillp", "fixed"])
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole run; medians reported")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("filesync: needs root (CAP_NET_ADMIN) for network namespaces and TAP devices", file=sys.stderr)
        return 2
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    rounds = []
    for r in range(args.rounds):
        def say(text: str, r: int = r) -> None:
            print(f"[round {r + 1}/{args.rounds}] {text}", file=sys.stderr, flush=True)

        with tempfile.TemporaryDirectory(prefix="dmm-filesync-") as tmp:
            rounds.append(filesync_lab.run(args.size, Path(tmp), rate_control=args.rate_control, progress=say))
    first = rounds[0]
    runs = {(run.client, run.mode): [] for run in first["runs"]}
    for res in rounds:
        for run in res["runs"]:
            runs[(run.client, run.mode)].append(run)

    def med(client: str, mode: str, op: str) -> str:
        vals = [getattr(run, op).get("seconds") for run in runs[(client, mode)]]
        if any(v is None for v in vals):
            return "failed"
        return f"{statistics.median(vals):.2f}"

    def stack(client: str) -> str:
        run = runs[(client, "dmm")][0]
        return run.put.get("stack") or "?"

    mb = args.size / 1e6
    lines = ["# File-sync routing: kernel TCP for all vs dmm routing per client", "",
             f"Run {started}; dmm under `dmm run`, Python {platform.python_version()}, kernel {platform.release()}, "
             f"{os.cpu_count()} CPUs shared with other work (load average {load0:.2f} at the start). "
             f"Each client uploads a {mb:g} MB file (PUT) and downloads it back (GET), sha256 checked end to end; "
             f"clients run one after the other; times from connect to the last byte, median of {args.rounds} "
             f"round(s). Kernel TCP congestion control in the namespaces: "
             f"`{first['tcp_congestion_control']}` (the system default). FillP rate control: "
             f"`{args.rate_control}`.", "",
             "| client | link | kernel PUT s | kernel GET s | dmm stack | dmm PUT s | dmm GET s | "
             "PUT speed-up | GET speed-up | sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for client, params in first["links"].items():
        row = [client, params.replace(",", ", "), med(client, "kernel", "put"), med(client, "kernel", "get"),
               stack(client), med(client, "dmm", "put"), med(client, "dmm", "get")]
        for op in ("put", "get"):
            try:
                row.append(f"{float(med(client, 'kernel', op)) / float(med(client, 'dmm', op)):.2f}x")
            except ValueError:
                row.append("-")
        ok = all(run.ok for mode in ("kernel", "dmm") for run in runs[(client, mode)])
        row.append("ok" if ok else "MISMATCH")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Routing decisions under dmm (`dmm route explain`, run in each client's namespace):", ""]
    for client in first["links"]:
        lines += [f"- **{client}**:", "", "  ```", *["  " + ln for ln in runs[(client, "dmm")][0].explain.splitlines()],
                  "  ```"]
    lines += ["", "The servers under dmm: " + "; ".join(
        f"listening on {li['listening']} on stack `{li['stack']}`" for li in first["listeners"]["dmm"]) +
        " (the same program started twice with the same config; see dmm.usecases.filesync_lab).", "",
        "The config every dmm process used:", "", "```toml", first["config"].rstrip(), "```", ""]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "filesync.md").write_text(text)
    data = [dict(res, runs=[asdict(run) for run in res["runs"]]) for res in rounds]
    (args.out / "filesync.json").write_text(json.dumps(data, indent=1))
    print(text)
    return 0 if all(run.ok for res in rounds for run in res["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
