"""The figures the stress suite produces for README's "Safety" section."""

from __future__ import annotations

import json
import os
from pathlib import Path

FIGURES = Path("/tmp/treeguard-stress.json")


def add_figures(**figures: float) -> None:
    """Merge ``figures`` into :data:`FIGURES` (a later run of a test replaces its own)."""
    old: dict[str, float] = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    old.update(figures)
    tmp = FIGURES.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps(old, indent=1, sort_keys=True))
    tmp.replace(FIGURES)
    print("\nstress figures:", figures)
