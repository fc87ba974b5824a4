"""Smoke test of the benchmark report: `python -m benchmarks --quick` writes every output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_report(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    backend = json.loads(next(tmp_path.glob("*.json")).read_text())
    name = backend["environment"]["backend"]
    for suffix in (".json", ".md", "_time.png", "_memory.png"):
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 0, suffix
    suites = {"categorical", "losses", "linear", "parallel"}
    present = {s for s in suites if (ROOT / "benchmarks" / f"bench_{s}.py").exists()}
    assert {row["suite"] for row in backend["rows"]} == present
    assert set(backend["skipped_suites"]) == suites - present
    for row in backend["rows"]:
        if "jxent_ms" in row:  # bench_linear's memory-only rows have no time
            assert row["jxent_ms"] > 0 and row["baseline_ms"] > 0, row
        assert row["jxent_temp_mib"] >= 0 and row["baseline_temp_mib"] >= 0, row
    assert {row["dtype"] for row in backend["rows"] if row["suite"] == "losses"} == {
        "float32",
        "bfloat16",
    }
    report = (tmp_path / f"{name}.md").read_text()
    assert "## categorical" in report and "| case | dtype |" in report


def test_unknown_suite_is_an_error():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nonsense"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown suite" in proc.stderr
