"""The figures the stress suite produces for README's "Safety" section: printed as each is
made, and written at the end of the session to ``stress.json`` in pytest's temporary
directory (see tests/stress/conftest.py)."""

from __future__ import annotations

FIGURES: dict[str, float] = {}


def add_figures(**figures: float) -> None:
    """Record ``figures`` (a later run of a test replaces its own) and print them."""
    FIGURES.update(figures)
    print("\nstress figures:", figures)
