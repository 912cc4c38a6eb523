"""Patching the stdlib ``socket`` module so unmodified programs use dmm.

Call :func:`patch_all` as early as possible, before other modules do
``from socket import socket``: a name copied before patching keeps the
stdlib class. ``dmm run`` patches before the program's first line runs.
"""

from __future__ import annotations

import socket as _std
import threading

__all__ = ["get_original", "is_patched", "patch_all", "unpatch_all"]

#: The names replaced in the stdlib module, all from ``dmm.socket.__implements__``.
PATCHED_NAMES = ("socket", "create_connection", "create_server", "socketpair", "fromfd")

_lock = threading.Lock()
_originals: dict[str, object] = {}


def patch_all() -> None:
    """Replaces the stdlib socket module's constructors with dmm's. Idempotent."""
    from . import socket as dmm_socket

    with _lock:
        for name in PATCHED_NAMES:
            _originals.setdefault(name, getattr(_std, name))
            setattr(_std, name, getattr(dmm_socket, name))


def unpatch_all() -> None:
    """Puts the stdlib's originals back."""
    with _lock:
        for name, value in _originals.items():
            setattr(_std, name, value)
        _originals.clear()


def is_patched() -> bool:
    """Whether :func:`patch_all` is in effect."""
    return bool(_originals)


def get_original(name: str):
    """The stdlib's own object for ``name``, patched or not."""
    with _lock:
        if name in _originals:
            return _originals[name]
    return getattr(_std, name)
