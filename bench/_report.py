"""Shared by the benchmark scripts: print the figures and keep them as JSON."""

from __future__ import annotations

import json


def report(result: dict, path: str | None = None, shown: dict | None = None) -> None:
    """Print ``shown`` (default: ``result``) as JSON; write ``result`` to ``path`` if given."""
    print(json.dumps(result if shown is None else shown, indent=1), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
