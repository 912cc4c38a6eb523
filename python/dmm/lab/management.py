"""A management network: the root namespace reaches every lab node directly.

Control-plane services a test or benchmark starts in the root namespace (an
etcd cluster for central RD) must be reachable from each node without
crossing the lab's emulated links, so that stopping the service never
touches the links and the links' delay and loss never touch the service.
Each node gets a veth to the root namespace (``10.253.<i>.0/30``) and a
route to one service address on the root's loopback.

``with ManagementNetwork(lab) as mgmt: start_service(mgmt.address)``.
"""

from __future__ import annotations

from typing import Any

from . import netns as nsu

#: The service address: on the root namespace's loopback, routed from every node.
SERVICE_ADDRESS = "10.253.0.254"


class ManagementNetwork:
    """Veths from the root namespace into every node of a running lab, and
    :data:`SERVICE_ADDRESS` on the root's loopback. Torn down on exit: the
    root's ends are deleted at once, since a namespace's devices go only
    when the kernel gets round to it and the next lab reuses the subnets."""

    def __init__(self, lab: Any, address: str = SERVICE_ADDRESS) -> None:
        self.lab = lab
        self.address = address
        self._devices: list[str] = []
        self._address_added = False

    def __enter__(self) -> "ManagementNetwork":
        try:
            nsu.ip("addr", "replace", f"{self.address}/32", "dev", "lo")
            self._address_added = True
            for i, node in enumerate(self.lab.nodes, 1):
                self._join(i, node)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _join(self, i: int, node: str) -> None:
        root_dev, node_dev, ns = f"mg{self.lab.tag}{i}", f"mg{self.lab.tag}{i}n", self.lab.netns(node)
        nsu.ip("link", "add", root_dev, "type", "veth", "peer", "name", node_dev, "netns", ns)
        self._devices.append(root_dev)
        nsu.ip("addr", "add", f"10.253.{i}.1/30", "dev", root_dev)
        nsu.ip("link", "set", root_dev, "up")
        nsu.ip("addr", "add", f"10.253.{i}.2/30", "dev", node_dev, netns=ns)
        nsu.ip("link", "set", node_dev, "up", netns=ns)
        nsu.ip("route", "add", f"{self.address}/32", "via", f"10.253.{i}.1", netns=ns)

    def close(self) -> None:
        """Deletes the root's veth ends (their peers go with them) and the
        service address; safe to call twice."""
        steps = [("link", "del", dev) for dev in reversed(self._devices)]
        if self._address_added:
            steps.append(("addr", "del", f"{self.address}/32", "dev", "lo"))
        self._devices, self._address_added = [], False
        for step in steps:
            try:
                nsu.ip(*step)
            except nsu.LabError:
                pass  # already gone with its namespace
