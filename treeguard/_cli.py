"""The ``treeguard`` command line (issues 2 and 5)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    raise NotImplementedError
