"""benchmarks/run.py without timing anything: on a machine without a GPU, `--device cuda` must give a
"skipped: <reason>" row per runtime/mode/batch (never a crash), exit 0, and every result file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ISSUE_KEYS = {
    "runtime",
    "mode",
    "device",
    "dtype",
    "batch",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "std_ms",
    "img_per_s",
    "compile_s",
    "max_rel_err",
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: --device cuda would really benchmark")
def test_cuda_run_without_a_gpu_skips_cleanly_and_writes_every_file(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--device", "cuda", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md", "throughput.png"]
    results = json.loads((out / "results.json").read_text())
    assert {"packages", "threads", "gpus", "cpu", "cores"} <= set(results["environment"])
    rows = results["rows"]
    assert {row["runtime"] for row in rows} == {"keras-tf", "keras-jax", "torch", "ort"}
    for row in rows:
        assert ISSUE_KEYS <= set(row), row
        assert row["status"].startswith("skipped: ") and row["p50_ms"] is None, row
    with open(out / "results.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
