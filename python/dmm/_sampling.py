"""Path samples from closing connections (the producer side of
:mod:`dmm.rd.paths`).

A stream socket routed for a connect while path knowledge is on gets the
:class:`PathSampled` mixin. Its ``close()`` reads the connection's counters
once (kernel ``TCP_INFO``, or the user-space stack's own estimators) and
hands the sample to L-RD. Nothing runs on ``send``/``recv``: the cost is one
``getsockopt`` per connection, and sockets of a config without path
knowledge never get the mixin.
"""

from __future__ import annotations

import logging
import time as _time

from . import runtime as _runtime
from .rd.paths import sample_from_counters

__all__ = ["PathSampled"]

log = logging.getLogger("dmm.paths")


class PathSampled:
    """``close()`` leaves the connection's measurements in L-RD first
    (``_dmm_path`` holds when the connect started and to where)."""

    __slots__ = ()

    def close(self):
        path, self._dmm_path = self._dmm_path, None
        if path is not None and not self._closed:
            _record(self, path)
        super().close()


def _record(sock, path) -> None:
    started, address = path
    rt = _runtime._runtime
    if rt is None or rt.paths is None or not sock._dmm_stack:
        return
    try:
        counters = sock.dmm_counters()
    except (OSError, AttributeError, ValueError):  # not connected, or still racing
        return
    if not counters:
        return
    try:
        rt.paths.record_path(address, sample_from_counters(counters, _time.monotonic() - started, sock._dmm_stack))
    except Exception:  # knowledge is optional; closing the socket is not
        log.exception("dmm: could not record the path sample of a closing connection")
