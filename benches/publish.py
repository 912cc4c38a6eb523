"""Where the Python benches leave what they measured: the table, printed
and written to ``benches/results/<name>.md``, and the samples to
``<name>.json``."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def publish(name: str, lines: list[str], data=None) -> None:
    """Prints ``lines`` and writes them to ``<name>.md``; ``data``, if given,
    to ``<name>.json``."""
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    if data is not None:
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
