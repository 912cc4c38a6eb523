"""dmm configurations for programs run in a lab.

Benchmarks and use cases put some of a lab's prefixes on a FillP instance
and leave the rest on kernel TCP (:func:`fillp_routes_toml`), or let the
adaptive policy choose from what each path measures (:func:`adaptive_toml`);
these functions write those configs, so they all use one shape of them.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["adaptive_toml", "fillp_routes_toml"]


def _stacks(rate_control: str, fixed_rate: int | None) -> list[str]:
    return ['[[stack]]\nname = "kernel"\nkind = "kernel"\n',
            f'[[stack]]\nname = "wan"\nkind = "fillp"\nrate_control = "{rate_control}"\n'
            + (f"fixed_rate = {fixed_rate}\n" if fixed_rate is not None else "")]


def adaptive_toml(rate_control: str = "bbr", congestion: str | None = None, listen_on_both: bool = True) -> str:
    """A dmm config with the stacks of :func:`fillp_routes_toml`, no route,
    and the adaptive policy; ``congestion`` tells it the kernel's congestion
    control where the sysctl does not (a per-route ``congctl``).

    With ``listen_on_both`` (the default), listening sockets span both stacks.
    """
    parts = _stacks(rate_control, None)
    parts.append("[adaptive]\n" + (f'congestion = "{congestion}"\n' if congestion else ""))
    if listen_on_both:
        parts.append('[listen]\nstacks = ["kernel", "wan"]\n')
    return "\n".join(parts)


def fillp_routes_toml(prefixes: Sequence[str], rate_control: str = "bbr", listen_on_both: bool = False,
                      fixed_rate: int | None = None) -> str:
    """A dmm config: stack ``kernel`` (declared first, so the default route),
    a FillP stack ``wan`` with ``rate_control`` (and ``fixed_rate``, bits/s,
    for the ``fixed`` mode), and one route per prefix to ``wan`` with the
    kernel as fallback.

    Routes match listeners by their bind address, so a listener bound to an
    address inside a prefix is on FillP too (one bound to 0.0.0.0 is not).
    With ``listen_on_both``, a ``[listen]`` section makes every listening
    socket span the kernel and ``wan`` instead.
    """
    parts = _stacks(rate_control, fixed_rate)
    parts += [f'[[route]]\nto = "{p}"\nstacks = ["wan", "kernel"]\n' for p in prefixes]
    if listen_on_both:
        parts.append('[listen]\nstacks = ["kernel", "wan"]\n')
    return "\n".join(parts)
