"""Builds jxent's documentation site as HTML.

    pip install -e ".[docs]" && python docs/build.py --out DIR

Sphinx (autodoc + napoleon for the API reference, MyST-NB for the Markdown guides and
the notebooks, rendered with their saved outputs, not executed) with warnings as
errors (``-W``): a broken docstring, reference or page fails the build. The source
directory is the repository root with ``docs/conf.py``; the pages are ``docs/*``,
README.md, DESIGN.md, benchmarks/README.md (its tables are generated from the committed
JSON results by ``python -m benchmarks.tables``) and ``notebooks/*.ipynb``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path, *, warnings_as_errors: bool = True, quiet: bool = True) -> int:
    """Runs sphinx-build into ``out`` (doctrees in ``out/.doctrees``); its exit status."""
    from sphinx.cmd.build import build_main

    args = ["-b", "html", "-c", str(ROOT / "docs"), "-d", str(out / ".doctrees"), "-j", "1"]
    if warnings_as_errors:
        args += ["-W", "--keep-going"]
    if quiet:
        args.append("-q")
    status = build_main([*args, str(ROOT), str(out)])
    if status == 0:
        # The root page is docs/index (the sources are the repository root): a redirect
        # makes DIR/index.html the entry point.
        (out / "index.html").write_text(_REDIRECT)
    return status


_REDIRECT = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>jxent</title>
<meta http-equiv="refresh" content="0; url=docs/index.html"></head>
<body><a href="docs/index.html">jxent documentation</a></body></html>
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the HTML")
    parser.add_argument(
        "--allow-warnings", action="store_true", help="do not fail on warnings (drafts only)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    status = build(args.out.resolve(), warnings_as_errors=not args.allow_warnings)
    took = time.perf_counter() - start
    if status == 0:
        print(f"built {args.out / 'index.html'} in {took:.1f} s")
    else:
        print(f"docs build failed (exit {status}) after {took:.1f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
