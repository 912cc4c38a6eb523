"""The built-in adaptive policy: the stack for a path, from what was measured.

Enabled by an ``[adaptive]`` section in the config. It decides connects that
no rule matched (it takes the default route's place) from the path estimate
of the destination (:mod:`dmm.rd.paths`) and from the kernel's congestion
control, because the two families of kernel TCP fail on different paths:

* loss-based controls (CUBIC, Reno, ...) collapse with loss at any real
  RTT: on this project's grid (``benches/results/transport.md``, 100 Mbit/s)
  CUBIC made 45 Mbit/s at 10 ms / 0.1% loss and 12 at 10 ms / 1%, where
  FillP made 94 (``transport-rerun.md``). FillP is chosen where the Mathis
  bound, MSS/RTT x 1.22/sqrt(loss), falls below :data:`CUBIC_MATHIS_MBIT`
  (at 1 ms / 0.1%, 447 Mbit/s, CUBIC kept up: 92 against 93);
* BBR holds its rate up to high loss; FillP beat it by 5% or more only at
  long RTTs (1.15x at 100 ms even without loss, 1.54x at 200 ms / 0.1%) and
  at heavy loss (1.10x at 10-50 ms / 10%, 1.9x at 1 ms / 20%), and lost
  by 1-4% almost everywhere else. From 50 ms with 1% loss FillP is ahead
  too: 1.01x on the grid's 100 MB transfers, and more on shorter ones,
  whose time BBR's startup dominates (32 MB at 80 ms / 1%: 3.0 s against
  3.7 s, ``benches/results/filesync.md``). :data:`BBR_FILLP` lists those
  regions; the 50 ms one starts at 0.5% loss, as a link that drops 1%
  measures anywhere from 0.9% to 1.1%.

A path with no measurement (or no loss measured) goes to the kernel: the
first connection measures it, the next ones use what it measured. FillP is
only tried toward peers that may speak it: L-RD facts that say otherwise
leave the kernel alone; where nothing is known, FillP and the kernel race
(:mod:`dmm.race`), so a wrong guess costs a refused datagram, never the
connection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # dmm.rd imports the config, which imports this
    from .rd.paths import Estimate

__all__ = ["BBR_FILLP", "CUBIC_MATHIS_MBIT", "Adaptive", "AdaptiveSpec", "Choice", "system_congestion_control"]

#: Loss-based TCP: FillP where the Mathis bound is below this, Mbit/s.
CUBIC_MATHIS_MBIT = 200.0
#: BBR: FillP in these regions, as (minimum RTT ms, minimum loss rate).
BBR_FILLP = ((90.0, 0.0), (50.0, 0.005), (10.0, 0.10), (0.0, 0.15))
_MSS_BITS = 1448 * 8
_BBR_LIKE = ("bbr",)


@dataclass(frozen=True)
class AdaptiveSpec:
    """The ``[adaptive]`` section."""

    #: The stack for good paths (default: the first stack that keeps the
    #: kernel's fd, i.e. a kernel TCP or MPTCP instance).
    kernel: Optional[str] = None
    #: The stack for long or lossy paths (default: the first FillP stack).
    lossy: Optional[str] = None
    #: The kernel's congestion control: ``"auto"`` reads
    #: ``/proc/sys/net/ipv4/tcp_congestion_control``.
    congestion: str = "auto"
    line: Optional[int] = None


@dataclass(frozen=True)
class Choice:
    """The policy's answer: stacks in order, and why."""

    stacks: tuple[str, ...]
    reason: str


def system_congestion_control() -> str:
    """The kernel's default congestion control (``"cubic"`` if unreadable)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip() or "cubic"
    except OSError:
        return "cubic"


class Adaptive:
    """The adaptive policy for one runtime's stacks."""

    def __init__(self, spec: AdaptiveSpec, stacks: dict[str, Any], order: list[str]):
        self.spec = spec
        self.kernel = spec.kernel or next((n for n in order if stacks[n].keeps_fd), None)
        self.lossy = spec.lossy or next((n for n in order if stacks[n].protocol == "fillp"), None)
        self.congestion = system_congestion_control() if spec.congestion == "auto" else spec.congestion

    def problem(self) -> Optional[str]:
        """Why the policy cannot work with these stacks, or ``None``."""
        if self.kernel is None:
            return "no kernel stack is configured (name one with kernel = ...)"
        if self.lossy is None:
            return "no FillP stack is configured (name one with lossy = ...)"
        return None

    def choose(self, est: Optional[Estimate], fillp_spoken: Optional[bool]) -> Choice:
        """The stacks for a path measured as ``est``; ``fillp_spoken`` is
        what L-RD knows of the peer (``None``: nothing)."""
        assert self.kernel is not None and self.lossy is not None
        better, why = self.fillp_is_better(est)
        if not better:
            return Choice((self.kernel,), why)
        if fillp_spoken is False:
            return Choice((self.kernel,), why + "; but the peer does not speak FillP (L-RD)")
        return Choice((self.lossy, self.kernel), why)

    def fillp_is_better(self, est: Optional[Estimate]) -> tuple[bool, str]:
        """Whether FillP beats this kernel's TCP on the path, and why."""
        if est is None or est.rtt_ms is None:
            return False, "no measurement of this path yet: the kernel measures it"
        cc = self.congestion
        if cc in _BBR_LIKE:
            loss = est.loss or 0.0
            for rtt, min_loss in BBR_FILLP:
                if est.rtt_ms >= rtt and loss >= min_loss:
                    return True, (f"{cc}: FillP is faster at rtt >= {rtt:g} ms with loss >= {min_loss * 100:g}% "
                                  f"(measured {_metrics(est)})")
            return False, f"{cc} keeps up on this path (measured {_metrics(est)})"
        if est.loss is None:
            return False, f"{cc}: loss not measured yet (no bulk transfer): the kernel measures it"
        if est.loss <= 0:
            # Any loss counts: the Mathis bound below grows without limit
            # as loss falls, so rare loss on a short path stays on TCP.
            return False, f"{cc} keeps up without loss (measured {_metrics(est)})"
        bound = _MSS_BITS / (max(est.rtt_ms, 0.01) / 1000) * 1.22 / math.sqrt(est.loss) / 1e6
        if bound < CUBIC_MATHIS_MBIT:
            return True, f"{cc} is loss-bound to ~{bound:.0f} Mbit/s here (measured {_metrics(est)})"
        return False, f"{cc}'s loss bound, {bound:.0f} Mbit/s, is not the limit (measured {_metrics(est)})"


def _metrics(est: Estimate) -> str:
    loss = f"{est.loss * 100:.2f}%" if est.loss is not None else "?"
    return f"rtt {est.rtt_ms:.3g} ms, loss {loss}"
