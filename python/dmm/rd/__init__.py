"""Resource discovery (RD): what this host's listeners accept on, and what
remote endpoints were seen to speak.

* :mod:`dmm.rd.store`: the host's L-RD, an SQLite store shared by every dmm
  process on the host;
* :mod:`dmm.rd.local`: a process's in-process view of it (what ``connect()``
  reads; it never touches the store) and the RD thread that keeps both in
  step, asks servers what they accept (DISCOVER over their FillP port) and
  drives non-blocking races.

The routing side (candidates, racing) is :mod:`dmm.race`; how they fit is
in :mod:`dmm.runtime`.
"""

from .local import LocalRD, get_local, wire_protocol
from .store import Listener, PeerFact, Store, default_dir

__all__ = ["Listener", "LocalRD", "PeerFact", "Store", "default_dir", "get_local", "wire_protocol"]
