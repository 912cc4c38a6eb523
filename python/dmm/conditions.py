"""Route conditions on measured path state: ``when = { ... }`` in a rule.

::

    [[route]]
    stacks = ["wan", "kernel"]
    when = { rtt_ms = ">= 30", loss = ">= 0.5%" }

Every condition must hold for the rule to match; a condition on a metric
that was not measured for the destination (or its prefix) does not hold, so
the first connection takes the next rule and measures the path.

Metrics and the units their values take:

============ ============================================ =================
metric       meaning                                      value examples
============ ============================================ =================
``rtt_ms``   round-trip time, milliseconds                ``">= 30"``, ``"< 5ms"``
``loss``     share of data lost, percent or a fraction    ``">= 0.5%"``, ``"> 0.01"``
``rate_mbit`` delivery rate, Mbit/s                       ``"< 50"``, ``">= 1gbit"``
``samples``  connections measured                         ``">= 3"``
============ ============================================ =================

Operators: ``<``, ``<=``, ``>``, ``>=``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:  # dmm.rd imports the config, which imports this
    from .rd.paths import Estimate

__all__ = ["Condition", "ConditionError", "METRICS", "holds", "parse_when"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}

#: Metric name -> (unit suffixes and their scale to the stored unit).
METRICS: dict[str, dict[str, float]] = {
    "rtt_ms": {"": 1.0, "ms": 1.0, "us": 1e-3, "s": 1000.0},
    "loss": {"": 1.0, "%": 0.01},
    "rate_mbit": {"": 1.0, "kbit": 1e-3, "mbit": 1.0, "gbit": 1000.0},
    "samples": {"": 1.0},
}

_TEXT = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z%]*)\s*$", re.IGNORECASE)


class ConditionError(ValueError):
    """A condition that cannot be parsed; ``field`` names the metric."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Condition:
    """``metric op value``, the value in the metric's stored unit."""

    metric: str
    op: str
    value: float

    def holds(self, est: Optional[Estimate]) -> bool:
        """Whether it holds for ``est``; never without a measurement."""
        if est is None:
            return False
        measured = est.samples if self.metric == "samples" else getattr(est, self.metric)
        return measured is not None and _OPS[self.op](measured, self.value)

    def describe(self) -> str:
        if self.metric == "loss":
            return f"loss {self.op} {self.value * 100:g}%"
        return f"{self.metric} {self.op} {self.value:g}"


def parse_when(raw: Any) -> tuple[Condition, ...]:
    """Parses a ``when`` table; raises :class:`ConditionError` naming the
    metric at fault."""
    if not isinstance(raw, dict) or not raw:
        raise ConditionError("", "expected a table of conditions such as { rtt_ms = \">= 30\", loss = \">= 1%\" }")
    out = []
    for metric, text in raw.items():
        units = METRICS.get(metric)
        if units is None:
            raise ConditionError(metric, "unknown metric (expected one of: " + ", ".join(METRICS) + ")")
        m = _TEXT.match(text) if isinstance(text, str) else None
        if m is None:
            raise ConditionError(metric, f"expected an operator (<, <=, >, >=) and a number, such as \">= 30\", got {text!r}")
        op, number, unit = m.group(1), float(m.group(2)), m.group(3).lower()
        if unit not in units:
            expected = ", ".join(repr(u) for u in units if u) or "none"
            raise ConditionError(metric, f"unknown unit {unit!r} (expected {expected})")
        value = number * units[unit]
        if metric == "loss" and value > 1:
            raise ConditionError(metric, f"a loss rate is at most 100%, got {text!r}")
        out.append(Condition(metric, op, value))
    return tuple(out)


def holds(conditions: tuple[Condition, ...], est: Optional[Estimate]) -> bool:
    """Whether every condition holds for ``est``."""
    return all(c.holds(est) for c in conditions)
