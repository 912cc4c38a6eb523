"""The use cases of DESIGN.md section 7, as programs that run end to end.

* :mod:`dmm.usecases.filesync`: a small file-sync server and client written
  against the stdlib ``socket`` module only (dmm routes them from outside,
  with ``dmm run``);
* :mod:`dmm.usecases.filesync_lab`: runs them in the lab's ``filesync``
  topology, once on kernel TCP and once under dmm, and compares.
"""
