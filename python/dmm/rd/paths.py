"""Path knowledge: what connections measured about the way to a destination.

Each connection that closes leaves one :class:`Sample` (round-trip time,
loss, delivery rate: whichever it measured well enough), and a long one
another every ``sample_every`` seconds while it is open, each covering its
own stretch of the connection (:func:`since`). Samples feed
:class:`Aggregate` records kept per destination address and per destination
prefix (/24 and /64 by default), so that a host never contacted before, on a
network already seen, has an estimate too.

An aggregate is a time-decayed mean: every sample weighs 1 when it arrives
(a loss rate: the MiB it was measured over) and half as much a half-life
later (10 minutes by default), so the estimate follows the path as it
changes and forgets it when nothing is measured. Each metric keeps its own
weight, since a short connection measures an RTT but no loss rate.

This module is pure computation (no I/O): the store keeps aggregates in the
host's L-RD (:mod:`dmm.rd.store`) and :mod:`dmm.rd.local` keeps this
process's copy current.
"""

from __future__ import annotations

import math
import socket as _std
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["CUMULATIVE", "Aggregate", "Estimate", "Sample", "keys_for", "live_estimates", "prefix_key",
           "sample_from_counters", "since"]

#: A connection that moved fewer bytes than this says nothing about loss or rate.
MIN_BULK_BYTES = 256 * 1024
#: Weights below this are no data at all (about 10 half-lives without a sample).
_NEGLIGIBLE = 1e-3
#: Counters that grow over a connection's life; the others are current values.
CUMULATIVE = ("bytes_sent", "bytes_received", "bytes_retransmitted", "packets_sent", "retransmits")


@dataclass(frozen=True)
class Sample:
    """What one connection measured; ``None`` where it measured nothing."""

    #: Minimum round-trip time seen, milliseconds.
    rtt_ms: Optional[float] = None
    #: Share of the bytes sent that had to be sent again (0..1).
    loss: Optional[float] = None
    #: Delivery rate, Mbit/s.
    rate_mbit: Optional[float] = None
    #: The stack that measured it.
    stack: str = ""
    #: How much the loss rate counts: the MiB it was measured over (a few
    #: hundred packets at 0.1% loss often see none, a long transfer says
    #: more), so aggregates pool loss as bytes lost over bytes sent.
    loss_weight: float = 1.0
    #: ``False`` for a sample of a connection still open (it counts in the
    #: means, not in the count of connections).
    connection: bool = True

    def empty(self) -> bool:
        return self.rtt_ms is None and self.loss is None and self.rate_mbit is None


def since(counters: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """The counters of what happened after ``before`` was read: the
    :data:`CUMULATIVE` ones as differences (a long connection's samples then
    each cover their own stretch), the rest as they are."""
    return {k: (v - before.get(k, 0) if k in CUMULATIVE else v) for k, v in counters.items()}


def sample_from_counters(counters: Mapping[str, int], seconds: float, stack: str = "",
                         connection: bool = True) -> Sample:
    """The sample a closing connection leaves, from its stack's counters
    (``dmm_counters()``: kernel ``TCP_INFO`` or a user-space stack's own).

    The RTT is the connection's minimum (the path's, without queueing). Loss
    comes from a sender that sent at least :data:`MIN_BULK_BYTES`: the share
    of bytes retransmitted (kernel ``TCP_INFO``), or of datagrams resent
    (FillP: its peer's smoothed loss report follows only the last round
    trips, this counts the whole connection). The rate is the latest delivery-rate sample of such a sender,
    else the bytes received over the connection's lifetime.
    """
    rtt_us = counters.get("min_rtt_us") or counters.get("rtt_us") or 0
    rtt_ms = rtt_us / 1000 if 0 < rtt_us < 600_000_000 else None
    sent = counters.get("bytes_sent", 0)
    received = counters.get("bytes_received", 0)
    loss = rate = None
    if sent >= MIN_BULK_BYTES:
        if "loss_ppm" in counters and counters.get("packets_sent"):
            loss = counters.get("retransmits", 0) / counters["packets_sent"]
        elif "bytes_retransmitted" in counters:
            loss = counters["bytes_retransmitted"] / sent
        if loss is not None:
            loss = min(max(loss, 0.0), 1.0)
        if counters.get("delivery_rate_bps"):
            rate = counters["delivery_rate_bps"] / 1e6
    if rate is None and received >= MIN_BULK_BYTES and seconds > 0:
        rate = received * 8 / seconds / 1e6
    return Sample(rtt_ms, loss, rate, stack, loss_weight=sent / (1 << 20), connection=connection)


@dataclass
class Aggregate:
    """A destination's decayed means: ``(sum, weight)`` per metric as of
    ``updated`` (seconds since the epoch), and the count of samples."""

    rtt_sum: float = 0.0
    rtt_w: float = 0.0
    loss_sum: float = 0.0
    loss_w: float = 0.0
    rate_sum: float = 0.0
    rate_w: float = 0.0
    samples: int = 0
    updated: float = 0.0

    def decayed(self, now: float, half_life: float) -> "Aggregate":
        """This aggregate as of ``now``: every sum and weight scaled down."""
        f = _decay(now - self.updated, half_life)
        return Aggregate(self.rtt_sum * f, self.rtt_w * f, self.loss_sum * f, self.loss_w * f,
                         self.rate_sum * f, self.rate_w * f, self.samples, max(now, self.updated))

    def add(self, sample: Sample, now: float, half_life: float) -> "Aggregate":
        """A new aggregate with ``sample`` (taken at ``now``) counted in."""
        a = self.decayed(now, half_life)
        if sample.rtt_ms is not None:
            a.rtt_sum += sample.rtt_ms
            a.rtt_w += 1
        if sample.loss is not None and sample.loss_weight > 0:
            a.loss_sum += sample.loss * sample.loss_weight
            a.loss_w += sample.loss_weight
        if sample.rate_mbit is not None:
            a.rate_sum += sample.rate_mbit
            a.rate_w += 1
        if sample.connection:
            a.samples += 1
        return a

    def estimate(self, key: str, now: float, half_life: float) -> Optional["Estimate"]:
        """What it says as of ``now``, or ``None`` once it has faded out."""
        a = self.decayed(now, half_life)

        def mean(total: float, weight: float) -> Optional[float]:
            return total / weight if weight >= _NEGLIGIBLE else None

        rtt, loss, rate = mean(a.rtt_sum, a.rtt_w), mean(a.loss_sum, a.loss_w), mean(a.rate_sum, a.rate_w)
        if rtt is None and loss is None and rate is None:
            return None
        return Estimate(key, rtt, loss, rate, self.samples, max(0.0, now - self.updated))


@dataclass(frozen=True)
class Estimate:
    """The path to a destination as measured (``req.path`` in hooks).

    Each metric is ``None`` when no recent connection measured it.
    """

    #: What it was measured for: ``"10.1.2.3"`` or ``"10.1.2.0/24"``.
    key: str
    #: Round-trip time (minimum per connection, averaged), milliseconds.
    rtt_ms: Optional[float]
    #: Loss rate, 0..1 (0.01 is 1%).
    loss: Optional[float]
    #: Delivery rate, Mbit/s.
    rate_mbit: Optional[float]
    #: Connections that contributed (ever, not decayed).
    samples: int
    #: Seconds since the newest sample.
    age_s: float

    def describe(self) -> str:
        """One line, as ``dmm paths`` and ``dmm route explain`` print it."""
        parts = [f"rtt {_ms(self.rtt_ms)} ms" if self.rtt_ms is not None else "rtt ?",
                 f"loss {self.loss * 100:.2f}%" if self.loss is not None else "loss ?",
                 f"rate {self.rate_mbit:.1f} Mbit/s" if self.rate_mbit is not None else "rate ?"]
        return f"{self.key}: " + ", ".join(parts) + f" ({self.samples} samples, newest {self.age_s:.0f} s ago)"


def live_estimates(aggregates: Mapping[str, Aggregate], now: float, half_life: float) -> list[Estimate]:
    """The estimates of ``aggregates`` that have not faded out, prefixes
    first, then addresses, each sorted."""
    out = (agg.estimate(key, now, half_life) for key, agg in aggregates.items())
    return sorted((e for e in out if e is not None), key=lambda e: ("/" not in e.key, e.key))


def _ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def _decay(dt: float, half_life: float) -> float:
    if dt <= 0:
        return 1.0
    return math.pow(0.5, dt / half_life)


def prefix_key(address: str, bits: int) -> Optional[str]:
    """``address``'s network of ``bits`` bits as ``"net/bits"``, or ``None``
    for something that is not a numeric address."""
    family = _std.AF_INET6 if ":" in address else _std.AF_INET
    try:
        raw = _std.inet_pton(family, address.partition("%")[0])
    except OSError:
        return None
    width = len(raw) * 8
    bits = min(bits, width)
    value = int.from_bytes(raw, "big") >> (width - bits) << (width - bits)
    return _std.inet_ntop(family, value.to_bytes(len(raw), "big")) + f"/{bits}"


def keys_for(address: str, prefix_v4: int, prefix_v6: int) -> tuple[str, ...]:
    """The keys a sample for ``address`` updates and a lookup tries, most
    specific first: the address, then its prefix."""
    net = prefix_key(address, prefix_v6 if ":" in address else prefix_v4)
    return (address, net) if net is not None else (address,)
