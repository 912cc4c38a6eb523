"""Tables and a plot of file-sync lab runs (:mod:`dmm.usecases.filesync_lab`).

Shared by ``dmm demo`` and ``benches/filesync.py``: several rounds of one
scenario (one kernel congestion control) are summarised per client and
direction as the median time with its spread, the stacks dmm used round by
round, the speed-up over kernel TCP and the ideal time of the link.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["Cell", "describe_path", "ideal_seconds", "markdown", "plot", "speedup", "summarize"]

OPS = ("put", "get")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_RATES = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def _param(params: str, name: str) -> Optional[str]:
    for part in params.split(","):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def ideal_seconds(params: str, size: int) -> Optional[float]:
    """The time ``size`` bytes take on a link described as ``params`` (the
    lab's ``delay=40ms,loss=1%,rate=100mbit,...``): size / (rate x (1 -
    loss)) plus two round trips (connect, last byte and its answer)."""
    rate, delay, loss = _param(params, "rate"), _param(params, "delay"), _param(params, "loss") or "0%"
    m_rate = re.fullmatch(r"([\d.]+)(kbit|mbit|gbit)", rate or "")
    m_delay = re.fullmatch(r"([\d.]+)(s|ms|us)", delay or "")
    if not m_rate or not m_delay:
        return None
    bps = float(m_rate.group(1)) * _RATES[m_rate.group(2)]
    rtt = 2 * float(m_delay.group(1)) * _UNITS[m_delay.group(2)]
    p = float(loss.rstrip("%")) / 100
    return size * 8 / (bps * (1 - p)) + 2 * rtt


@dataclass
class Cell:
    """One client, mode and direction over all rounds."""

    seconds: list[Optional[float]] = field(default_factory=list)
    #: The stack of each round's connection (``None``: plain stdlib).
    stacks: list[Optional[str]] = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        """Median time, ``None`` if any round failed."""
        if not self.seconds or any(s is None for s in self.seconds):
            return None
        return statistics.median(s for s in self.seconds if s is not None)

    def text(self) -> str:
        """``3.02 (2.98-3.10)``: the median and the spread over rounds."""
        med = self.median
        if med is None:
            return "failed"
        if len(self.seconds) == 1:
            return f"{med:.2f}"
        vals = [s for s in self.seconds if s is not None]
        return f"{med:.2f} ({min(vals):.2f}-{max(vals):.2f})"


def summarize(rounds: list[dict[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    """Cells keyed by (client, mode, op) over the rounds of one scenario."""
    cells: dict[tuple[str, str, str], Cell] = {}
    for res in rounds:
        for run in res["runs"]:
            for op in OPS:
                result = getattr(run, op)
                cell = cells.setdefault((run.client, run.mode, op), Cell())
                cell.seconds.append(result.get("seconds") if result.get("ok") else None)
                cell.stacks.append(result.get("stack"))
    return cells


def _stacks(cell: Cell) -> str:
    names = [s or "?" for s in cell.stacks]
    return names[0] if len(set(names)) == 1 else ", ".join(names)


def speedup(cells: dict[tuple[str, str, str], Cell], client: str, op: str) -> Optional[float]:
    """Kernel median over dmm median for one client and direction."""
    k, d = cells[(client, "kernel", op)].median, cells[(client, "dmm", op)].median
    return None if k is None or d is None or d <= 0 else k / d


def markdown(rounds: list[dict[str, Any]]) -> list[str]:
    """The side-by-side table of one scenario's rounds."""
    cells = summarize(rounds)
    size = rounds[0]["size"]
    lines = ["| client | link | ideal s | kernel PUT s | dmm PUT s | dmm PUT stack | PUT speed-up | "
             "kernel GET s | dmm GET s | dmm GET stack | GET speed-up | sha256 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for client, params in rounds[0]["links"].items():
        ideal = ideal_seconds(params, size)
        row = [client, params.replace(",", ", "), "-" if ideal is None else f"{ideal:.2f}"]
        for op in OPS:
            k, d = cells[(client, "kernel", op)], cells[(client, "dmm", op)]
            ratio = speedup(cells, client, op)
            row += [k.text(), d.text(), _stacks(d), "-" if ratio is None else f"{ratio:.2f}x"]
        ok = all(run.ok for res in rounds for run in res["runs"] if run.client == client)
        row.append("ok" if ok else "MISMATCH")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def describe_path(path: Optional[dict[str, Any]]) -> str:
    """One line for a ``dmm paths --json`` entry."""
    if not path:
        return "nothing measured"
    loss = "?" if path.get("loss") is None else f"{path['loss'] * 100:.2f}%"
    rate = "?" if path.get("rate_mbit") is None else f"{path['rate_mbit']:.0f} Mbit/s"
    return f"rtt {path.get('rtt_ms') or 0:.3g} ms, loss {loss}, rate {rate}, {path.get('samples')} connections"


def plot(scenarios: dict[str, list[dict[str, Any]]], path: Path) -> Optional[str]:
    """Writes a bar chart of median times (log scale) per client, direction
    and mode, one panel per scenario; returns why not if matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'dmm[demo]')"
    fig, axes = plt.subplots(1, len(scenarios), figsize=(6 * len(scenarios), 4.2), squeeze=False)
    for ax, (label, rounds) in zip(axes[0], scenarios.items()):
        cells = summarize(rounds)
        clients = list(rounds[0]["links"])
        width = 0.2
        for i, (mode, op) in enumerate((m, o) for o in OPS for m in ("kernel", "dmm")):
            xs = [j + (i - 1.5) * width for j in range(len(clients))]
            ys = [cells[(c, mode, op)].median or 0 for c in clients]
            ax.bar(xs, ys, width, label=f"{mode} {op.upper()}", color=("#999", "#1f77b4", "#ccc", "#2ca02c")[i])
        ax.set_xticks(range(len(clients)), clients)
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, log scale)")
        ax.set_title(f"kernel TCP: {label}")
        ax.legend(fontsize=8)
    fig.suptitle(f"File sync, {rounds[0]['size'] / 1e6:g} MB each way: kernel TCP vs dmm (adaptive)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
