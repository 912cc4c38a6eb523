"""dmm: run a program's sockets over several network stacks at once.

``import dmm.socket as socket`` for a drop-in socket module whose sockets are
routed per connection, or ``dmm.patch_all()`` (or ``dmm run app.py``) to make
an unmodified program use it. See :mod:`dmm.config` for the configuration,
:mod:`dmm.policy` for Python policy hooks.
"""

from ._core import __version__
from .patch import get_original, is_patched, patch_all, unpatch_all
from .runtime import configure

__all__ = ["__version__", "configure", "get_original", "is_patched", "patch_all", "unpatch_all"]
