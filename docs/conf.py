"""Sphinx configuration of treeguard's documentation (``pip install '.[docs]'``, then
``sphinx-build -W --keep-going -n -b html docs OUTDIR``)."""

from __future__ import annotations

import os
import sys
from importlib import metadata

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "treeguard"
author = "treeguard developers"
copyright = "treeguard developers"
release = metadata.version("treeguard")
version = release

extensions = [
    "sphinx.ext.autodoc",  # the docstrings are reST (field lists, ``literals``) already
    "myst_parser",  # pages are Markdown, with the same ```python fences the tests run
    "treeguard_docs",  # the CLI reference from the parser; every public name documented
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": True}

# Command lines and option names keep their two hyphens.
smartquotes = False

nitpicky = True
# Outside types (the build must work offline: no intersphinx) and names the docstrings mention that
# are not part of the documented API (private modules, instance attributes, type variables).
nitpick_ignore_regex = [
    ("py:class", r"(collections\.abc|subprocess|multiprocessing|typing|types|os|psutil)\..*"),
    ("py:class", r"(T|Ts)"),
    ("py:(mod|data|attr|meth|func|class)", r"treeguard\._.*"),
    ("py:data", r"(REASONS|WARNING_KINDS)"),
    ("py:attr", r"(report|signum|not_stopped|root)"),
    ("py:meth", r"reread_brief"),
]

html_theme = "furo"
html_title = f"treeguard {release}"
html_static_path: list[str] = []
