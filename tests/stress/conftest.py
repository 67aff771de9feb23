"""The stress suite's figures, written once the session ends."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.stress._figures import FIGURES


@pytest.fixture(scope="session", autouse=True)
def _write_figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if FIGURES:
        out = tmp_path_factory.getbasetemp() / "stress.json"
        out.write_text(json.dumps(FIGURES, indent=1, sort_keys=True))
