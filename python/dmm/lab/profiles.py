"""Built-in link profiles and topologies.

A link profile is a parameter string in the emulator's compact form (see
``dmm._core.Linkem.start``), applied to both directions of a link; each
direction gets the full delay (so RTT = 2 x delay) and the full loss rate.
A topology profile names several links.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LINK_PROFILES", "TOPOLOGIES", "LinkProfile", "describe"]


@dataclass(frozen=True)
class LinkProfile:
    """A named set of link parameters."""

    name: str
    params: str
    description: str


#: Link profiles by name.
LINK_PROFILES: dict[str, LinkProfile] = {
    p.name: p
    for p in [
        LinkProfile(
            "internet",
            "delay=40ms,loss=1%,rate=100mbit,queue=1bdp",
            "100 Mbit/s, 80 ms RTT, 1% loss each way",
        ),
        LinkProfile(
            "inter-dc",
            "delay=10ms,loss=0.1%,rate=1gbit,queue=1bdp",
            "1 Gbit/s, 20 ms RTT, 0.1% loss each way",
        ),
        LinkProfile(
            # 10 Gbit/s is above what the relay moves (see
            # benches/results/linkem.md), so the relay's ceiling is the limit.
            "intra-dc",
            "delay=100us,rate=10gbit,queue=1mb",
            "10 Gbit/s (in practice the emulator's ceiling), 0.2 ms RTT, no loss",
        ),
        LinkProfile("perfect", "", "no impairment: the emulator's own ceiling"),
    ]
}

#: Topologies with more than one client: client name -> link profile.
#: Every client sits behind its own link to the one server.
TOPOLOGIES: dict[str, dict[str, str]] = {
    "filesync": {"internet": "internet", "inter-dc": "inter-dc", "intra-dc": "intra-dc"},
}


def describe() -> str:
    """A human-readable list of the profiles."""
    lines = [f"{p.name:10} {p.description}  [{p.params}]" for p in LINK_PROFILES.values()]
    for name, clients in TOPOLOGIES.items():
        lines.append(f"{name:10} server + clients " + ", ".join(f"{c} ({p})" for c, p in clients.items()))
    return "\n".join(lines)
