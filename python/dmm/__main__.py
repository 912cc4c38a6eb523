"""``python -m dmm``: the same as the ``dmm`` command."""

from .cli import main

raise SystemExit(main())
