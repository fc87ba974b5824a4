"""Sphinx configuration of jxent's documentation site (built by ``docs/build.py``).

The source directory is the repository root (``sphinx-build -c docs . OUT``), so the
README, DESIGN.md, benchmarks/README.md and the notebooks are rendered in place and
their relative links resolve as on a repository page; ``include_patterns`` keeps
everything else out.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jxent  # noqa: E402

project = "jxent"
author = "the jxent authors"
release = version = jxent.__version__
copyright = "the jxent authors, Apache-2.0"

root_doc = "docs/index"
include_patterns = [
    "docs/*.md",
    "docs/*.rst",
    "README.md",
    "CHANGELOG.md",
    "DESIGN.md",
    "benchmarks/README.md",
    "notebooks/*.ipynb",
]
exclude_patterns = ["docs/_build", "**/.ipynb_checkpoints"]

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",  # Markdown (MyST) pages and notebooks
]

# The API reference: Google-style docstrings (Args/Returns/Raises/Example).
autodoc_typehints = "signature"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = True

# Notebooks are rendered with the outputs they were saved with; tests/test_notebooks.py
# executes them, the docs build does not.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"jxent {release}"
html_static_path: list[str] = []
