"""The benchmark tables agree with the committed results, every result says where and how
it was measured, and `python -m benchmarks --quick` writes every output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SUITES = ("categorical", "losses", "linear", "parallel")
sys.path.insert(0, str(ROOT))

from benchmarks import tables  # noqa: E402


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _records():
    return [(p.name, json.loads(p.read_text())) for p in sorted(RESULTS.glob("*.json"))]


def test_tables_agree_with_results():
    """`python -m benchmarks.tables --check`: README.md and benchmarks/README.md hold
    exactly the tables generated from benchmarks/results, and no result is stale."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.tables", "--check"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def test_check_sees_an_edited_number():
    """A hand-edited number inside a table is a disagreement."""
    text = (ROOT / "benchmarks" / "README.md").read_text()
    res = tables.Results()
    rendered, unknown = tables.render(text, res)
    assert not unknown and rendered == text
    m = re.search(r"<!-- table:categorical -->.*?\| (\d+\.\d+) \|", text, re.S)
    assert m, "no number in the categorical table"
    edited = text[: m.start(1)] + "9" + text[m.start(1) :]
    assert tables.render(edited, res)[0] != edited


def test_every_marker_is_generated():
    """Each document's markers are known tables, and every table is used somewhere."""
    used = set()
    for doc in tables.DOCUMENTS:
        used |= {m["name"] for m in tables.MARKER.finditer(doc.read_text())}
    assert used == set(tables.GENERATORS)


@pytest.mark.parametrize("name", [p.name for p in sorted(RESULTS.glob("*.json"))])
def test_result_records_its_provenance(name):
    """Command, date, environment, machine (CPU model and ISA flags) and load."""
    record = json.loads((RESULTS / name).read_text())
    assert "python -m benchmarks" in record["command"], record["command"]
    assert re.match(r"\d{4}-\d\d-\d\dT", record["date"])
    env = record["environment"]
    for key in ("python", "jax", "jaxlib", "backend"):
        assert env.get(key), key
    machine = record["machine"]
    assert machine["cpu"] and machine["cores"] >= 1
    assert set(machine["isa_flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert len(record["load"]["loadavg_start"]) == 3
    assert record["rows"]


@pytest.mark.parametrize("suite", SUITES)
def test_rows_are_labelled_with_what_was_measured(suite):
    """Every row's shape is one its suite's configuration measured, and every number
    is positive (a zero temporary buffer is fine)."""
    record = json.loads((RESULTS / f"cpu_{suite}.json").read_text())
    cfg = record["config"]
    if suite in ("categorical", "losses"):
        allowed = {f"{cfg['rows']}x{k}" for k in cfg["classes"]}
    elif suite == "linear":
        allowed = {"x".join(map(str, s)) for s in cfg["linear_time_shapes"]}
        from benchmarks.bench_linear import SHAPES

        allowed |= {"x".join(map(str, SHAPES[k])) for k in cfg["linear_memory_shapes"]}
    else:
        n, d = cfg["parallel_tokens"], cfg["parallel_hidden"]
        allowed = {f"{n}x{d}x{v}" for v in cfg["parallel_vocabs"]}
        allowed |= {f"{n // 4}x{v}" for v in cfg["parallel_vocabs"]}
    for row in record["rows"]:
        assert row["shape"] in allowed, row["shape"]
        assert row["vocab"] == int(row["shape"].split("x")[-1])
        assert row["baseline"] in row["contenders"]
        for numbers in row["contenders"].values():
            assert numbers.get("ms", 1) > 0 and numbers["temp_mib"] >= 0, numbers
    assert (RESULTS / f"cpu_{suite}.png").stat().st_size > 0


def test_classification_sweep_is_labelled():
    """The classification sweep: every cell of its configuration, each case and dtype
    once, with the rounds' ratios that say how noisy the run was."""
    record = json.loads((RESULTS / "cpu_classification.json").read_text())
    cfg = record["config"]
    cells = {f"{n}x{k}" for n in cfg["rows"] for k in cfg["classes"]}
    seen = {(r["case"], r["dtype"], r["shape"]) for r in record["rows"]}
    assert {s for _, _, s in seen} == cells
    assert len(seen) == len(record["rows"]) == 3 * len(cfg["dtypes"]) * len(cells)
    for row in record["rows"]:
        assert row["baseline"] == "optax" and len(row["round_ratios"]) == cfg["rounds"]
        assert all(c["ms"] > 0 and c["temp_mib"] >= 0 for c in row["contenders"].values())


def test_skipped_peers_say_why():
    record = json.loads((RESULTS / "cpu_linear.json").read_text())
    measured = {n for r in record["rows"] for n in r["contenders"]}
    for peer in ("jax-cce", "tokamax xla", "tokamax chunked_xla"):
        reasons = [s["reason"] for s in record["skipped"] if s["contender"] == peer]
        assert (peer in measured) != bool(reasons), peer
        assert all(len(r) > 20 for r in reasons)


def test_quick_run(tmp_path):
    """`python -m benchmarks --quick` writes each suite's record and figure."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for suite in SUITES:
        record = json.loads((tmp_path / f"cpu_{suite}.json").read_text())
        assert record["suite"] == suite and record["rows"], suite
        assert record["machine"]["isa_flags"] and record["load"]["loadavg_end"]
        assert (tmp_path / f"cpu_{suite}.png").stat().st_size > 0, suite
        assert "| " in tables.suite_tables(record)
    classification = json.loads((tmp_path / "cpu_classification.json").read_text())
    assert classification["rows"] and "| K = 10 |" in tables.suite_tables(classification)
    linear = json.loads((tmp_path / "cpu_linear.json").read_text())
    for row in linear["rows"]:
        for name in ("jxent", "optax"):
            # float32 in, float32 accumulation: within 1e-5 of the float64 reference.
            if row["dtype"] == "float32":
                assert row["contenders"][name]["loss_rel_error"] < 1e-5, (name, row)
    assert {"jxent", "optax"} <= set(linear["rows"][0]["contenders"])


def test_unknown_suite_is_an_error():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--only", "nonsense"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "unknown suite" in proc.stderr
