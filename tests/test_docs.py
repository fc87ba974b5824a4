"""The documentation site builds with warnings as errors (``python docs/build.py``).

Sphinx, MyST-NB and the theme come with the test extra, so nothing here is skipped:
a missing docs package is a failure, as a broken docstring or page is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jxent

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build(tmp_path):
    out = tmp_path / "site"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "build.py"), "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "docs/index.html" in (out / "index.html").read_text()

    # The API reference: every public name, from its docstring.
    api = (out / "docs" / "api.html").read_text()
    names = [f"jxent.{n}" for n in jxent.__all__]
    names += [f"jxent.parallel.{n}" for n in jxent.parallel.__all__]
    missing = [n for n in names if f'id="{n}"' not in api]
    assert not missing, missing
    assert "Args" in api or "Parameters" in api

    # The guides, the notebooks (with their saved outputs) and the benchmark tables.
    assert "optax name" in (out / "README.html").read_text()
    assert "The map" in (out / "DESIGN.html").read_text()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        page = (out / "notebooks" / f"{notebook.stem}.html").read_text()
        assert "highlight-ipython3" in page or "cell_input" in page, notebook.name
    assert list((out / "_images").glob("*.png")), "notebook figures not rendered"
    bench = (out / "benchmarks" / "README.html").read_text()
    assert "<table" in bench and "jxent" in bench
