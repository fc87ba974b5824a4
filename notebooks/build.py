"""Builds the notebooks in this folder from the cell sources in ``notebooks/_cells/``
and executes them, saving their outputs.

    python notebooks/build.py                        # all notebooks
    python notebooks/build.py stability              # only notebooks/stability.ipynb

Each ``_cells/<name>.py`` is a plain Python file split into cells by ``# %%`` lines
(``# %% [markdown]`` for a markdown cell, whose lines are ``# ``-commented), the
"percent" format that editors such as VS Code and Spyder run cell by cell. Edit the
``.py`` file, then rebuild: the ``.ipynb`` files are generated, with outputs, so that
they read well on a repository page. ``tests/test_notebooks.py`` re-executes every
``.ipynb`` so that they never rot.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CELLS = HERE / "_cells"


def parse(source: str) -> list[nbformat.NotebookNode]:
    """Splits a percent-format script into notebook cells."""
    cells = []
    for chunk in re.split(r"^# %%", source, flags=re.M)[1:]:
        header, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if "[markdown]" in header:
            text = "\n".join(re.sub(r"^# ?", "", line) for line in body.splitlines())
            cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cells.append(nbformat.v4.new_code_cell(body))
    for i, cell in enumerate(cells):
        cell["id"] = f"cell-{i:02d}"  # stable ids keep rebuilds' diffs small
    return cells


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Runs ``nb`` in a fresh kernel in this folder, with the repository importable."""
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
    )
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(HERE)}},
    )
    client.execute()
    return nb


def build(name: str) -> float:
    source = (CELLS / f"{name}.py").read_text()
    nb = nbformat.v4.new_notebook(cells=parse(source))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    start = time.perf_counter()
    execute(nb)
    elapsed = time.perf_counter() - start
    nbformat.write(nb, HERE / f"{name}.ipynb")
    return elapsed


def main() -> None:
    names = sys.argv[1:] or sorted(p.stem for p in CELLS.glob("*.py"))
    for name in names:
        print(f"{name}: executed in {build(name):.1f} s", flush=True)


if __name__ == "__main__":
    main()
