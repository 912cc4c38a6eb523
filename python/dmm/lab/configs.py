"""dmm configurations for programs run in a lab.

Benchmarks and use cases put some of a lab's prefixes on a FillP instance
and leave the rest on kernel TCP; :func:`fillp_routes_toml` writes that
config, so they all use one shape of it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["fillp_routes_toml"]


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
    parts = ['[[stack]]\nname = "kernel"\nkind = "kernel"\n',
             f'[[stack]]\nname = "wan"\nkind = "fillp"\nrate_control = "{rate_control}"\n'
             + (f"fixed_rate = {fixed_rate}\n" if fixed_rate is not None else "")]
    parts += [f'[[route]]\nto = "{p}"\nstacks = ["wan", "kernel"]\n' for p in prefixes]
    if listen_on_both:
        parts.append('[listen]\nstacks = ["kernel", "wan"]\n')
    return "\n".join(parts)
