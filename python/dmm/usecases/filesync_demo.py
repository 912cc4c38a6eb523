"""``dmm demo`` as root: use case 1 in the lab, kernel TCP against dmm.

The lab's ``filesync`` topology (a server and clients behind an internet,
an inter-DC and an intra-DC link) runs the unmodified file-sync program
(:mod:`dmm.usecases.filesync_lab`) for a few rounds, in two scenarios: kernel
TCP with the system's congestion control, then with CUBIC set per route
(the default of most distributions). In each, every client syncs once on
plain kernel TCP and once under ``dmm run`` with the adaptive policy and no
route at all: dmm learns each path from the client's own connections. A
live display shows the transfers; at the end come a table per scenario
(median and range of the rounds, speed-ups), what dmm measured and decided,
and ``filesync.md`` / ``filesync.png`` in the output directory.

The display uses ``rich`` and the plot ``matplotlib`` (``pip install
'dmm[demo]'``); without them the demo prints plain lines and skips the plot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from . import filesync_lab
from . import filesync_report as report

__all__ = ["available", "run"]


def available() -> Optional[str]:
    """Why the lab demo cannot run here, or ``None``."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces and TAP devices)"
    if shutil.which("ip") is None:
        return "it needs the ip command (iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "it needs /dev/net/tun (TAP devices)"
    return None


def _system_cc() -> str:
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return "unknown"


class _Plain:
    """Progress as one line per transfer, for terminals without rich."""

    def __init__(self) -> None:
        self.key: Any = None
        self.started = 0.0

    def watch(self, mode: str, client: str, op: str, done: int, total: int) -> None:
        if (mode, client, op) != self.key:
            self.key, self.started = (mode, client, op), time.monotonic()
            print(f"  {mode:<6} {client:<9} {op.upper()} {total / 1e6:g} MB ...", flush=True)

    def heading(self, text: str) -> None:
        print(f"\n{text}", flush=True)

    def table(self, title: str, rows: list[list[str]], header: list[str]) -> None:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(f"\n{title}")
        for r in [header, *rows]:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))

    def text(self, text: str) -> None:
        print(text)

    def close(self) -> None:
        pass


class _Rich:
    """A live progress bar per transfer, tables with rich."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TransferSpeedColumn)

        self.console = Console()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeElapsedColumn(), console=self.console)
        self.progress.start()
        self.key: Any = None
        self.task: Any = None

    def watch(self, mode: str, client: str, op: str, done: int, total: int) -> None:
        if (mode, client, op) != self.key:
            if self.task is not None:
                self.progress.update(self.task, completed=self.progress.tasks[-1].total)
            self.key = (mode, client, op)
            self.task = self.progress.add_task(f"{mode:<6} {client:<9} {op.upper()}", total=total)
        self.progress.update(self.task, completed=done)

    def heading(self, text: str) -> None:
        self._finish()
        self.console.rule(text)

    def _finish(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.progress.tasks[-1].total)
        for task in list(self.progress.tasks):
            self.progress.remove_task(task.id)
        self.task, self.key = None, None

    def table(self, title: str, rows: list[list[str]], header: list[str]) -> None:
        from rich.table import Table

        self._finish()
        t = Table(title=title)
        for h in header:
            t.add_column(h, no_wrap=True)
        for r in rows:
            t.add_row(*r)
        self.console.print(t)

    def text(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        self._finish()
        self.progress.stop()


def _display() -> Any:
    try:
        return _Rich()
    except ImportError:
        print("(pip install 'dmm[demo]' for a live progress display and the plot)")
        return _Plain()


def _runs(names: list[Optional[str]]) -> str:
    """``kernel, wan x2``: the stacks of the rounds, repeats folded."""
    out: list[list[Any]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    if len(out) == 1:
        return out[0][0] or "?"
    return ", ".join(f"{n or '?'}" + (f" x{k}" if k > 1 else "") for n, k in out)


def _rows(rounds: list[dict[str, Any]]) -> list[list[str]]:
    cells = report.summarize(rounds)
    rows = []
    for client in rounds[0]["links"]:
        row = [client]
        for op in report.OPS:
            k, d = cells[(client, "kernel", op)], cells[(client, "dmm", op)]
            ratio = report.speedup(cells, client, op)
            row += ["-" if k.median is None else f"{k.median:.2f}", "-" if d.median is None else f"{d.median:.2f}",
                    "-" if ratio is None else f"{ratio:.2f}x"]
        rows.append(row)
    return rows


def _stacks_line(rounds: list[dict[str, Any]], client: str) -> str:
    cells = report.summarize(rounds)
    return "; ".join(f"{op.upper()} on {_runs(cells[(client, 'dmm', op)].stacks)}" for op in report.OPS)


HEADER = ["client", "PUT kernel", "PUT dmm", "speed-up", "GET kernel", "GET dmm", "speed-up"]


def run(size: int = 4 * 10 ** 6, rounds: int = 3, out: Path = Path("dmm-demo")) -> int:
    """Runs the demo; returns a process exit code (0: every transfer
    complete with matching checksums)."""
    system = _system_cc()
    scenarios = [("default", None)] + ([] if system == "cubic" else [("cubic", "cubic")])
    show = _display()
    show.text(f"File sync in the lab: {size / 1e6:g} MB up and down per client, {rounds} round(s) per scenario; "
              f"kernel TCP's congestion control here: {system}.")
    if len(scenarios) == 1:
        show.text("The system's default is already CUBIC: one scenario.")
    results: dict[str, list[dict[str, Any]]] = {}
    ok = True
    try:
        for name, cc in scenarios:
            label = f"{system} (system default)" if cc is None else f"{cc} (set per route)"
            with tempfile.TemporaryDirectory(prefix="dmm-demo-") as tmp:
                state = Path(tmp) / "state"
                for r in range(rounds):
                    show.heading(f"kernel TCP {label}: round {r + 1} of {rounds}")
                    res = filesync_lab.run(size, Path(tmp) / f"round{r}", tcp_cc=cc, routing="adaptive",
                                           state=state, watch=show.watch)
                    results.setdefault(label, []).append(res)
                    ok &= all(run_.ok for run_ in res["runs"])
            show.table(f"kernel TCP {label} against dmm (adaptive, no route): seconds, medians of {rounds}",
                       _rows(results[label]), HEADER)
            for run_ in results[label][-1]["runs"]:
                if run_.mode == "dmm":
                    decided = next((ln.strip() for ln in run_.explain.splitlines() if "decided by" in ln), "?")
                    show.text(f"  {run_.client}: {_stacks_line(results[label], run_.client)} (round by round); "
                              f"measured {report.describe_path(run_.path)}; next connection {decided}")
    finally:
        show.close()
    if not results:
        return 1
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# dmm demo: file sync, {size / 1e6:g} MB each way, {rounds} round(s)", ""]
    for label, rounds_ in results.items():
        lines += [f"## Kernel TCP: {label}", ""] + report.markdown(rounds_) + [""]
    why_not = report.plot(results, out / "filesync.png")
    lines.append("![times](filesync.png)" if why_not is None else f"(no plot: {why_not})")
    (out / "filesync.md").write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out / 'filesync.md'}" + ("" if why_not else f" and {out / 'filesync.png'}")
          + ("" if ok else "\nSOME TRANSFERS FAILED (see the tables)"))
    return 0 if ok else 1
