"""Patching the stdlib so unmodified programs use dmm.

The ``socket`` module's constructors become dmm's, and
``selectors.DefaultSelector`` (what asyncio's event loop and
``socketserver`` create) becomes :class:`dmm.selectors.DefaultSelector`,
which waits for writability of sockets on user-space stacks exactly.

Call :func:`patch_all` as early as possible, before other modules do
``from socket import socket``: a name copied before patching keeps the
stdlib class. ``dmm run`` patches before the program's first line runs.
"""

from __future__ import annotations

import selectors as _selectors
import socket as _std
import threading

__all__ = ["get_original", "is_patched", "patch_all", "unpatch_all"]

#: The names replaced in the stdlib module, all from ``dmm.socket.__implements__``.
PATCHED_NAMES = ("socket", "create_connection", "create_server", "socketpair", "fromfd")

_lock = threading.Lock()
_originals: dict[str, object] = {}
_original_selector: list = []


def patch_all() -> None:
    """Replaces the stdlib socket module's constructors and the default
    selector with dmm's. Idempotent."""
    from . import selectors as dmm_selectors
    from . import socket as dmm_socket

    with _lock:
        for name in PATCHED_NAMES:
            _originals.setdefault(name, getattr(_std, name))
            setattr(_std, name, getattr(dmm_socket, name))
        if not _original_selector:
            _original_selector.append(_selectors.DefaultSelector)
        _selectors.DefaultSelector = dmm_selectors.DefaultSelector


def unpatch_all() -> None:
    """Puts the stdlib's originals back."""
    with _lock:
        for name, value in _originals.items():
            setattr(_std, name, value)
        _originals.clear()
        if _original_selector:
            _selectors.DefaultSelector = _original_selector.pop()


def is_patched() -> bool:
    """Whether :func:`patch_all` is in effect."""
    return bool(_originals)


def get_original(name: str):
    """The stdlib's own object for ``name``, patched or not."""
    with _lock:
        if name in _originals:
            return _originals[name]
    return getattr(_std, name)
