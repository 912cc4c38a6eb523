"""A network lab: namespaces joined by user-space emulated links.

``with Lab("internet") as lab: lab.exec("client", [...])``. See
:mod:`dmm.lab.topology` for the layout and addresses, :mod:`dmm.lab.profiles`
for the built-in profiles and :mod:`dmm.lab.cli` for ``dmm lab up/down``.
"""

from .netns import LabError
from .profiles import LINK_PROFILES, TOPOLOGIES
from .topology import Lab

__all__ = ["LINK_PROFILES", "TOPOLOGIES", "Lab", "LabError"]
