"""Transport benchmark over the emulated link: kernel TCP against dmm FillP.

Contenders (issue 5), each one bulk transfer from the lab's ``client`` node
to its ``server`` node, both ends in fresh processes:

* ``cubic``       -- stdlib socket, kernel TCP, ``TCP_CONGESTION`` = cubic
* ``tcp-bbr``     -- stdlib socket, kernel TCP, ``TCP_CONGESTION`` = bbr
* ``fillp-bbr``   -- ``import dmm.socket`` routed to a FillP instance,
  ``rate_control = "bbr"`` (FillP's default mode)
* ``fillp-fillp`` -- the same with ``rate_control = "fillp"``
* ``fillp-fixed`` -- the same with ``rate_control = "fixed"`` and
  ``fixed_rate`` set to the cell's link rate (in datagrams)

The grid: RTT {1, 10, 50, 100, 200} ms x loss {0, 0.1, 1, 2, 5, 10, 20} % at
100 Mbit/s, plus 1 Gbit/s at 1 and 10 ms RTT without loss. One lab is built
once; every cell sets the link live (``Lab.set_params``) and runs all the
contenders one after the other, in an order that rotates from cell to cell.
Loss applies to both directions (as in the lab's profiles); the delay is
half the RTT each way; the drop-tail queue is 1 x BDP, at least 64
full-size frames.

A transfer is timed at the receiver, from ``accept()`` to end of stream;
one that has not finished after ``--max-seconds`` reports its goodput over
the cap and a completion time of "> cap". Goodput counts application bytes.
The Mathis estimate (MSS/RTT x 1.22/sqrt(p)) is printed beside TCP.

Then the fairness cell: two flows share the bottleneck (50 ms, 1 %, 100
Mbit/s, queue 1 x BDP) for ``--fairness-seconds``: FillP-bbr vs CUBIC, and
as references CUBIC vs CUBIC and CUBIC vs TCP-BBR; each flow's goodput and
Jain's index.

Writes ``transport.md``, ``transport.json`` and ``transport.png`` (needs
matplotlib; without it the tables are still written) to ``--out``
(default benches/results/; ``--quick`` writes ``transport-quick.*``). A
progress line goes to stderr. Needs root.

    python benches/transport_grid.py [--quick] [--rtt 10,50] [--loss 0,1]
        [--size 100MB] [--max-seconds 30] [--contenders cubic,fillp-bbr]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

CONTENDERS = ("cubic", "tcp-bbr", "fillp-bbr", "fillp-fillp", "fillp-fixed")
LABELS = {
    "cubic": "TCP CUBIC",
    "tcp-bbr": "TCP BBR",
    "fillp-bbr": "FillP bbr",
    "fillp-fillp": "FillP fillp",
    "fillp-fixed": "FillP fixed",
}
#: FillP's default rate-control mode: the one the issue's targets are about.
DEFAULT_FILLP = "fillp-bbr"
RTTS = (1, 10, 50, 100, 200)
LOSSES = (0, 0.1, 1, 2, 5, 10, 20)
GBIT_RTTS = (1, 10)
FAIR_PAIRS = (("fillp-bbr", "cubic"), ("cubic", "cubic"), ("cubic", "tcp-bbr"))
FAIR_CELL = (100, 50, 1.0)  # Mbit/s, RTT ms, loss %
#: TCP's MSS on these links (1500-byte MTU, timestamps on).
TCP_MSS = 1448
FRAME = 1514
#: Environment variable through which each cell tells the ends of a
#: ``fillp-fixed`` transfer the rate to send at, bits/s.
FIXED_RATE_ENV = "DMM_GRID_FIXED_RATE"
#: FillP's datagram (1400 B) and the Ethernet frame carrying it (+ UDP, IP
#: and Ethernet headers): ``fixed`` is told the link's capacity in datagrams.
FILLP_DATAGRAM, FILLP_FRAME = 1400, 1442
MIN_QUEUE_FRAMES = 64
PORT_BASE = 20000
CHUNK = 1 << 18

# -- the two ends of a transfer (each in its own process) ---------------------------


def socket_module(contender: str):
    """The socket module a contender's ends use, configured."""
    if not contender.startswith("fillp-"):
        return socket
    import dmm.runtime
    import dmm.socket
    from dmm import config
    from dmm.lab.configs import fillp_routes_toml

    # The whole lab on FillP: connects, and listeners bound inside it.
    mode = contender.split("-", 1)[1]
    fixed = os.environ.get(FIXED_RATE_ENV) if mode == "fixed" else None
    toml = fillp_routes_toml(["10.201.0.0/16"], mode, fixed_rate=int(fixed) if fixed else None)
    dmm.runtime.configure(config.parse(toml, f"<{contender}>"))
    return dmm.socket


def receiver(contender: str, host: str, port: int, cap: float, epoch: float) -> None:
    """Accepts one connection and reads it to the end or for ``cap`` seconds.

    Prints ``ready`` once listening, then one JSON line: bytes, seconds,
    whether the stream ended, and bytes per wall-clock second since
    ``epoch`` (what the fairness cell compares across two receivers).
    """
    sk = socket_module(contender)
    srv = sk.socket(sk.AF_INET, sk.SOCK_STREAM)
    srv.setsockopt(sk.SOL_SOCKET, sk.SO_REUSEADDR, 1)
    srv.bind((host, port))
    srv.listen(4)
    print("ready", flush=True)
    srv.settimeout(60)
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        print(json.dumps({"error": "no connection within 60 s"}), flush=True)
        return
    t0 = time.monotonic()
    wall0 = time.time()
    deadline = t0 + cap
    # A short timeout so that a stalled transfer still ends at the cap.
    conn.settimeout(0.2)
    buf = bytearray(CHUNK)
    total, eof, last, bins = 0, False, t0, {}
    while True:
        try:
            n = conn.recv_into(buf)
        except TimeoutError:
            n = None
        now = time.monotonic()
        if now > deadline:
            break
        if n == 0:
            eof, last = True, now
            break
        if n:
            total += n
            last = now
            second = int(wall0 + (now - t0) - epoch)
            bins[second] = bins.get(second, 0) + n
    print(json.dumps({"bytes": total, "seconds": (last if eof else now) - t0, "eof": eof,
                      "stack": getattr(conn, "dmm_stack", None) or "kernel",
                      "bins": sorted(bins.items())}), flush=True)
    conn.close()
    srv.close()


def sender(contender: str, host: str, port: int, size: int, cap: float) -> None:
    """Connects and sends ``size`` bytes (or for ``cap`` seconds), then waits
    for the receiver to close: a FillP socket's data lives in this process,
    so it must not exit before the receiver has everything."""
    sk = socket_module(contender)
    s = sk.socket(sk.AF_INET, sk.SOCK_STREAM)
    if not contender.startswith("fillp-"):
        algo = contender.replace("tcp-", "").encode()
        s.setsockopt(sk.IPPROTO_TCP, sk.TCP_CONGESTION, algo)
        got = s.getsockopt(sk.IPPROTO_TCP, sk.TCP_CONGESTION, 16).rstrip(b"\0")
        if got != algo:
            raise SystemExit(f"TCP_CONGESTION is {got!r}, wanted {algo!r}")
    s.settimeout(30)
    s.connect((host, port))
    deadline = time.monotonic() + cap + 2
    block = memoryview(os.urandom(CHUNK))
    s.settimeout(1.0)
    sent = 0
    try:
        while sent < size and time.monotonic() < deadline:
            # send(), not sendall(): after a timeout it is known what went out.
            try:
                sent += s.send(block[:min(CHUNK, size - sent)])
            except TimeoutError:
                continue
        s.shutdown(sk.SHUT_WR)
        s.settimeout(max(1.0, deadline - time.monotonic() + 10))
        while s.recv(1024):
            pass
    except OSError:
        pass  # the receiver closed at the cap
    s.close()


# -- the grid -------------------------------------------------------------------------


@dataclass
class Cell:
    """One point of the grid: link rate, RTT and loss."""

    rate_mbit: float
    rtt_ms: float
    loss_pct: float
    results: dict = field(default_factory=dict)

    @property
    def queue_bytes(self) -> int:
        """1 x BDP, at least MIN_QUEUE_FRAMES full frames."""
        bdp = self.rate_mbit * 1e6 / 8 * self.rtt_ms / 1e3
        return int(max(bdp, MIN_QUEUE_FRAMES * FRAME))

    @property
    def params(self) -> str:
        """The link's parameters in the emulator's compact form."""
        return (f"delay={int(self.rtt_ms * 500)}us,loss={self.loss_pct}%,rate={int(self.rate_mbit)}mbit,"
                f"queue={self.queue_bytes}b")

    @property
    def ideal_mbit(self) -> float:
        """link x (1 - loss): the goodput the targets compare against."""
        return self.rate_mbit * (1 - self.loss_pct / 100)

    @property
    def mathis_mbit(self) -> float | None:
        """Mathis et al.: MSS/RTT x 1.22/sqrt(p); None without loss."""
        if self.loss_pct <= 0:
            return None
        return TCP_MSS * 8 / (self.rtt_ms / 1e3) * 1.22 / math.sqrt(self.loss_pct / 100) / 1e6

    @property
    def label(self) -> str:
        return f"{self.rtt_ms:g} ms, {self.loss_pct:g}% loss, {self.rate_mbit:g} Mbit/s"


class Progress:
    """One status line on stderr: cell i/N, contender, elapsed, ETA."""

    def __init__(self, transfers: int, cap: float) -> None:
        self.total = transfers
        self.done = 0
        self.cap = cap
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def show(self, text: str, keep: bool = False) -> None:
        """Replaces the status line (on a terminal); ``keep`` leaves it in place."""
        elapsed = time.monotonic() - self.start
        left = self.total - self.done
        # Before the first transfer ends, assume each takes half the cap.
        per = elapsed / self.done if self.done else self.cap / 2
        line = (f"[{self.done}/{self.total} transfers] {text} | elapsed {_hms(elapsed)} | "
                f"ETA {_hms(per * left)}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if keep else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Runner:
    """Runs transfers in a lab; hands out a fresh port to each."""

    def __init__(self, lab) -> None:  # noqa: ANN001
        self.lab = lab
        self.port = PORT_BASE

    def _script(self, *argv: object) -> list[str]:
        return [sys.executable, __file__, *map(str, argv)]

    def start_receiver(self, contender: str, cap: float, epoch: float):  # noqa: ANN201
        self.port += 1
        port = self.port
        proc = self.lab.popen("server", self._script("--recv", contender, self.lab.address("server"), port, cap, epoch),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        if not ready or proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"{contender} receiver did not start")
        return proc, port

    def start_sender(self, contender: str, port: int, size: int, cap: float):  # noqa: ANN201
        return self.lab.popen("client", self._script("--send", contender, self.lab.address("server"), port,
                                                     size, cap),
                              stderr=subprocess.PIPE, text=True)

    def finish(self, contender: str, recv, send, cap: float) -> dict:  # noqa: ANN001
        """Waits for both ends; the receiver's JSON line is the result."""
        try:
            out, rerr = recv.communicate(timeout=cap + 90)
        except subprocess.TimeoutExpired:
            recv.kill()
            out, rerr = recv.communicate()
        try:
            _, err = send.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            send.kill()  # its data has arrived (or the cap passed): nothing left to wait for
            _, err = send.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if lines else {"error": "no result from the receiver"}
        if "error" in result:
            result["error"] += (f"; receiver stderr: {(rerr or '').strip()[-300:]!r}; "
                                f"sender stderr: {(err or '').strip()[-500:]!r}")
            return result
        if send.returncode not in (0, -9) and err and err.strip():
            result["sender_error"] = err.strip()[-500:]
        return result

    def transfer(self, contender: str, size: int, cap: float) -> dict:
        """One bulk transfer; adds goodput (Mbit/s) and completion."""
        recv, port = self.start_receiver(contender, cap, time.time())
        send = self.start_sender(contender, port, size, cap)
        result = self.finish(contender, recv, send, cap)
        if "error" not in result:
            done = result["eof"] and result["bytes"] >= size
            result["completed"] = done
            secs = result["seconds"] if done else cap
            result["goodput_mbit"] = result["bytes"] * 8 / secs / 1e6 if secs > 0 else 0.0
        return result


def linkem_snapshot(lab) -> dict:  # noqa: ANN001
    """What the relay saw in one transfer: drops by cause, lateness, device drops."""
    st = lab.stats()["client"]
    out = {}
    for d in ("up", "down"):
        s = st[d]
        out[d] = {k: s[k] for k in ("frames_in", "dropped_loss", "dropped_queue", "dropped_overflow",
                                    "rx_errors", "tx_errors", "late_p99_us", "late_max_us")}
    drops = lab.device_drops()["client"]
    out["device_drops"] = drops["client"] + drops["server"]
    return out


def run_grid(lab, cells: list[Cell], contenders: list[str], args, progress: Progress) -> None:  # noqa: ANN001
    runner = Runner(lab)
    for i, cell in enumerate(cells):
        lab.set_params("client", cell.params, replace=True)
        # `fixed` is a sender told the path's capacity, as a user who knows
        # it would configure it (the ends inherit the environment).
        os.environ[FIXED_RATE_ENV] = str(int(cell.rate_mbit * 1e6 * FILLP_DATAGRAM / FILLP_FRAME))
        # Rotate the order so that no contender always goes first (or last).
        order = contenders[i % len(contenders):] + contenders[:i % len(contenders)]
        for j, c in enumerate(order):
            progress.show(f"cell {i + 1}/{len(cells)} ({cell.label}) | {LABELS[c]} ({j + 1}/{len(order)})")
            base_drops = sum(lab.device_drops()["client"].values())
            lab.reset_stats()
            res = runner.transfer(c, args.size, args.max_seconds)
            snap = linkem_snapshot(lab)
            snap["device_drops"] -= base_drops
            res["linkem"] = snap
            cell.results[c] = res
            progress.done += 1
            progress.show(f"cell {i + 1}/{len(cells)} ({cell.label}) | {LABELS[c]}: "
                          f"{fmt_result(res, args.max_seconds)}", keep=True)


def run_fairness(lab, pairs, seconds: float, warmup: float, progress: Progress) -> list[dict]:  # noqa: ANN001
    """Two flows at once over the fairness cell; goodput over a common window."""
    rate, rtt, loss = FAIR_CELL
    cell = Cell(rate, rtt, loss)
    lab.set_params("client", cell.params, replace=True)
    runner = Runner(lab)
    cap = warmup + seconds + 1
    out = []
    for a, b in pairs:
        progress.show(f"fairness ({cell.label}) | {LABELS[a]} vs {LABELS[b]}")
        base_drops = sum(lab.device_drops()["client"].values())
        lab.reset_stats()
        epoch = time.time()
        ends = [runner.start_receiver(c, cap, epoch) for c in (a, b)]
        senders = [runner.start_sender(c, port, 1 << 50, cap) for c, (_, port) in zip((a, b), ends)]
        results = [runner.finish(c, recv, send, cap) for c, (recv, _), send in zip((a, b), ends, senders)]
        # Both flows start within a few ms; compare them over the same
        # wall-clock seconds, after a warm-up.
        window = range(int(warmup) + 1, int(warmup) + 1 + int(seconds))
        flows = []
        for c, r in zip((a, b), results):
            bins = dict(r.get("bins", []))
            got = sum(bins.get(s, 0) for s in window)
            flows.append({"contender": c, "goodput_mbit": got * 8 / len(window) / 1e6,
                          "error": r.get("error") or r.get("sender_error")})
        x = [f["goodput_mbit"] for f in flows]
        jain = sum(x) ** 2 / (len(x) * sum(v * v for v in x)) if any(x) else 0.0
        snap = linkem_snapshot(lab)
        snap["device_drops"] -= base_drops  # the device counters never reset
        out.append({"pair": [a, b], "flows": flows, "jain": jain, "window_s": len(window), "linkem": snap})
        progress.done += 1
    return out


# -- targets and output ---------------------------------------------------------------


def targets(cell: Cell) -> dict[str, dict]:
    """The issue's targets for FillP's default mode in this cell: PASS/MISS."""
    res = cell.results
    f = res.get(DEFAULT_FILLP, {}).get("goodput_mbit")
    if f is None:
        return {}
    out = {}
    if cell.loss_pct <= 5 and cell.rtt_ms <= 200:
        frac = f / cell.ideal_mbit
        out["T1 >=90% of link x (1-loss)"] = {"ok": frac >= 0.9, "value": f"{frac:.0%}"}
    bbr = res.get("tcp-bbr", {}).get("goodput_mbit")
    cubic = res.get("cubic", {}).get("goodput_mbit")
    if cubic is not None and cell.loss_pct == 1 and cell.rtt_ms == 50:
        out["T2 >=10x CUBIC at 1%/50ms"] = {"ok": f >= 10 * cubic, "value": f"{f / max(cubic, 1e-9):.1f}x"}
    if bbr is not None:
        out["T3 never below BBR"] = {"ok": f >= bbr, "value": f"{f / max(bbr, 1e-9):.2f}x"}
        if cell.loss_pct == 20:
            out["T4 >=2x BBR at 20%"] = {"ok": f >= 2 * bbr, "value": f"{f / max(bbr, 1e-9):.2f}x"}
    return out


def fmt_result(r: dict | None, cap: float) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    t = f"{r['seconds']:.1f} s" if r["completed"] else f"> {cap:g} s"
    return f"{r['goodput_mbit']:.1f} ({t})"


def render(cells: list[Cell], fairness: list[dict], contenders: list[str], args, meta: dict) -> str:  # noqa: ANN001
    lines = [f"# Transport grid: kernel TCP vs dmm FillP over the emulated link", ""]
    lines += [meta["note"], ""]
    lines += ["Each entry: goodput in Mbit/s (application bytes / time) and, in brackets, the completion time of "
              f"the {args.size / 1e6:g} MB transfer (`> {args.max_seconds:g} s`: not finished at the cap; goodput "
              "then counts the bytes delivered by the cap). Mathis = MSS/RTT x 1.22/sqrt(p) with MSS 1448 B, "
              "an upper bound for Reno-like TCP (CUBIC does a little better at large BDPs). "
              f"`{LABELS[DEFAULT_FILLP]} %` = FillP's default mode as a share of link x (1 - loss).", ""]
    head = ["RTT ms", "loss %", "Mbit/s", "queue"] + [LABELS[c] for c in contenders] + ["Mathis"]
    if DEFAULT_FILLP in contenders:
        head += [f"{LABELS[DEFAULT_FILLP]} %", "targets"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        row = [f"{cell.rtt_ms:g}", f"{cell.loss_pct:g}", f"{cell.rate_mbit:g}",
               f"{cell.queue_bytes // 1000} KB ({cell.queue_bytes // FRAME} pkts)"]
        row += [fmt_result(cell.results.get(c), args.max_seconds) for c in contenders]
        m = cell.mathis_mbit
        row.append("-" if m is None else f"{m:.1f}")
        if DEFAULT_FILLP in contenders:
            f = cell.results.get(DEFAULT_FILLP, {}).get("goodput_mbit")
            row.append("-" if f is None else f"{f / cell.ideal_mbit:.0%}")
            row.append("; ".join(f"{k.split()[0]} {'PASS' if v['ok'] else 'MISS'} ({v['value']})"
                                 for k, v in targets(cell).items()) or "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    summary = {}
    for cell in cells:
        for k, v in targets(cell).items():
            summary.setdefault(k, [0, 0, []])
            summary[k][0 if v["ok"] else 1] += 1
            if not v["ok"]:
                summary[k][2].append(f"{cell.rtt_ms:g} ms/{cell.loss_pct:g}%/{cell.rate_mbit:g}M")
    if summary:
        lines += ["## Targets for FillP's default mode (a report, not an assertion)", "",
                  "| target | PASS | MISS | missed in |", "|---|---|---|---|"]
        for k, (ok, miss, where) in summary.items():
            lines.append(f"| {k} | {ok} | {miss} | {', '.join(where) or '-'} |")
        lines.append("")
    if fairness:
        rate, rtt, loss = FAIR_CELL
        q = Cell(rate, rtt, loss).queue_bytes
        lines += [f"## Fairness: two flows sharing {rate} Mbit/s, {rtt} ms RTT, {loss}% loss, queue {q // 1000} KB "
                  "(1 x BDP)", "",
                  f"Both flows start together; goodput over the same {fairness[0]['window_s']} s window after a "
                  "warm-up. Jain's index: 1 = equal shares, 0.5 = one flow takes everything.", "",
                  "| flow A | flow B | A Mbit/s | B Mbit/s | A + B | Jain |", "|---|---|---|---|---|---|"]
        for f in fairness:
            a, b = f["flows"]
            lines.append(f"| {LABELS[a['contender']]} | {LABELS[b['contender']]} | {a['goodput_mbit']:.1f} | "
                         f"{b['goodput_mbit']:.1f} | {a['goodput_mbit'] + b['goodput_mbit']:.1f} | {f['jain']:.3f} |")
        lines.append("")
    lines += ["## Is the emulator the bottleneck?", "", emulator_health(cells, fairness), ""]
    errors = [f"{cell.label} {c}: {r.get('error') or r.get('sender_error')}"
              for cell in cells for c, r in cell.results.items() if r.get("error") or r.get("sender_error")]
    if errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(lines)


def emulator_health(cells: list[Cell], fairness: list[dict]) -> str:
    snaps = [r["linkem"] for cell in cells for r in cell.results.values() if "linkem" in r]
    snaps += [f["linkem"] for f in fairness]
    if not snaps:
        return "No transfers."
    dirs = [s[d] for s in snaps for d in ("up", "down")]
    overflow = sum(d["dropped_overflow"] for d in dirs)
    errs = sum(d["rx_errors"] + d["tx_errors"] for d in dirs)
    dev = sum(s["device_drops"] for s in snaps)
    p99 = max(d["late_p99_us"] for d in dirs)
    worst = max(d["late_max_us"] for d in dirs)
    return (f"Over all {len(snaps)} transfers: the relay's release-queue overflow drops {overflow}, its read/write "
            f"errors {errs}, frames dropped by the kernel at the TAP devices before the relay read them "
            f"(device + qdisc counters) {dev}; the relay's lateness against its own schedule: worst per-transfer "
            f"p99 {p99:.0f} us, worst single frame {worst / 1000:.1f} ms. Every other drop is one the link model "
            "chose (random loss or the drop-tail queue), per transfer in the JSON.")


def plot(cells: list[Cell], contenders: list[str], path: Path) -> str | None:
    """Goodput against loss, one panel per RTT (100 Mbit/s cells); None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot, the tables are written"
    rtts = sorted({c.rtt_ms for c in cells if c.rate_mbit == 100})
    if not rtts:
        return "no 100 Mbit/s cells to plot"
    fig, axes = plt.subplots(1, len(rtts), figsize=(4 * len(rtts), 4), sharey=True, squeeze=False)
    for ax, rtt in zip(axes[0], rtts):
        row = sorted((c for c in cells if c.rate_mbit == 100 and c.rtt_ms == rtt), key=lambda c: c.loss_pct)
        xs = list(range(len(row)))
        for con in contenders:
            ys = [c.results.get(con, {}).get("goodput_mbit", float("nan")) for c in row]
            ax.plot(xs, ys, marker="o", label=LABELS[con])
        ax.plot(xs, [c.ideal_mbit for c in row], "k--", linewidth=0.8, label="link x (1 - loss)")
        ax.set_xticks(xs, [f"{c.loss_pct:g}" for c in row])
        # Log scale: the contenders differ by orders of magnitude under loss.
        ax.set_yscale("log")
        ax.set_title(f"RTT {rtt:g} ms, 100 Mbit/s")
        ax.set_xlabel("loss % (each way)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("goodput, Mbit/s (log scale)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- the command ----------------------------------------------------------------------


def parse_size(text: str) -> int:
    units = {"kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "kib": 1 << 10, "mib": 1 << 20, "b": 1}
    t = text.strip().lower()
    for unit in sorted(units, key=len, reverse=True):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * units[unit])
    return int(t)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_cells(args) -> list[Cell]:  # noqa: ANN001
    cells = [Cell(100, r, loss) for r in args.rtt for loss in args.loss]
    cells += [Cell(1000, r, 0) for r in args.gbit_rtt]
    return cells


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a smoke subset: RTT 10,50 ms x loss 0,2 %%, 5 MB, no 1 Gbit/s cells, 5 s fairness")
    p.add_argument("--rtt", type=floats, help="RTTs in ms at 100 Mbit/s (default 1,10,50,100,200)")
    p.add_argument("--loss", type=floats, help="loss rates in %% (default 0,0.1,1,2,5,10,20)")
    p.add_argument("--gbit-rtt", type=floats, help="RTTs in ms of the 1 Gbit/s lossless cells (default 1,10)")
    p.add_argument("--size", type=parse_size, help="bytes per transfer, e.g. 100MB (default 100MB)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="cap per transfer (default 30)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--fairness-seconds", type=float, help="length of each fairness run (0: skip; default 30)")
    p.add_argument("--out", type=Path, help="directory for the results (default benches/results)")
    p.add_argument("--note", default="", help="a remark on the conditions of the run, printed with the results")
    p.add_argument("--recv", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--send", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.recv:
        c, host, port, cap, epoch = args.recv
        receiver(c, host, int(port), float(cap), float(epoch))
        return 0
    if args.send:
        c, host, port, size, cap = args.send
        sender(c, host, int(port), int(size), float(cap))
        return 0

    quick = args.quick
    args.rtt = args.rtt or ([10, 50] if quick else list(RTTS))
    args.loss = args.loss if args.loss is not None else ([0, 2] if quick else list(LOSSES))
    args.gbit_rtt = args.gbit_rtt if args.gbit_rtt is not None else ([] if quick else list(GBIT_RTTS))
    args.size = args.size or (5 * 10 ** 6 if quick else 100 * 10 ** 6)
    fair_s = args.fairness_seconds if args.fairness_seconds is not None else (5.0 if quick else 30.0)
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)} (known: {', '.join(CONTENDERS)})")
    if os.geteuid() != 0:
        print("transport_grid: needs root (CAP_NET_ADMIN) for network namespaces and TAP devices", file=sys.stderr)
        return 2
    out_dir = args.out or RESULTS
    stem = "transport-quick" if quick and args.out is None else "transport"

    from dmm.lab import Lab

    cells = build_cells(args)
    pairs = [pr for pr in FAIR_PAIRS if set(pr) <= set(contenders)] if fair_s > 0 else []
    progress = Progress(len(cells) * len(contenders) + len(pairs), args.max_seconds)
    load0 = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0 = time.monotonic()
    fairness: list[dict] = []
    with Lab(None, "delay=1ms") as lab:
        run_grid(lab, cells, contenders, args, progress)
        if pairs:
            fairness = run_fairness(lab, pairs, fair_s, 2.0 if fair_s >= 10 else 1.0, progress)
    progress.finish()
    load1 = os.getloadavg()
    import dmm

    note = (f"Run {started}, {_hms(time.monotonic() - t0)} in all; dmm {dmm.__version__}, Python "
            f"{platform.python_version()}, kernel {platform.release()}, {os.cpu_count()} CPUs shared with other "
            f"work (load average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end{args.note and '; '}"
            f"{args.note}). The link emulator's relay threads run under "
            "SCHED_FIFO. Link: delay RTT/2 each way, loss on both directions, drop-tail queue of 1 x BDP but at "
            f"least {MIN_QUEUE_FRAMES} frames of {FRAME} B; the rate counts Ethernet frames, so application "
            "goodput tops out near 95% of the link (TCP: 1448 of 1514 B; FillP: 1374 of 1442 B). Transfers go "
            "client -> server; both ends are fresh processes; contenders run one after the other within a cell, "
            "the order rotating from cell to cell. FillP rate modes as configured (`rate_control`); `fixed` "
            "is given the link's capacity in datagrams (`fixed_rate` = link x 1400/1442), as a user who knows "
            "the path's rate would configure it.")
    meta = {"started": started, "size": args.size, "max_seconds": args.max_seconds, "contenders": contenders,
            "load_start": load0, "load_end": load1, "cpus": os.cpu_count(), "note": note,
            "fairness_cell": {"rate_mbit": FAIR_CELL[0], "rtt_ms": FAIR_CELL[1], "loss_pct": FAIR_CELL[2],
                              "seconds": fair_s}}
    text = render(cells, fairness, contenders, args, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    why = plot(cells, contenders, out_dir / f"{stem}.png")
    if why:
        text += f"\nPlot: {why}.\n"
        print(f"transport_grid: {why}", file=sys.stderr)
    else:
        text += f"\nPlot: `{stem}.png` (goodput against loss, one panel per RTT).\n"
    (out_dir / f"{stem}.md").write_text(text)
    data = {"meta": meta,
            "cells": [{"rate_mbit": c.rate_mbit, "rtt_ms": c.rtt_ms, "loss_pct": c.loss_pct,
                       "queue_bytes": c.queue_bytes, "params": c.params, "ideal_mbit": c.ideal_mbit,
                       "mathis_mbit": c.mathis_mbit, "results": c.results,
                       "targets": targets(c)} for c in cells],
            "fairness": fairness}
    (out_dir / f"{stem}.json").write_text(json.dumps(data, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
