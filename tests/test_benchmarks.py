"""`python -m benchmarks.run` without timing anything: on a machine without a GPU, `--device cuda` must give a
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
        [sys.executable, "-m", "benchmarks.run", "--device", "cuda", "--out", str(out)],
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the profile would really run")
def test_gpu_profile_without_a_gpu_exits_with_one_line_and_writes_nothing(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_profile", "--out", str(tmp_path / "profile")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == (
        "gpu_profile needs a CUDA device (torch.cuda.is_available() is False)"
    )
    assert not (tmp_path / "profile").exists()


def test_gpu_profile_sorts_kernels_into_categories():
    from benchmarks.gpu_profile import category

    assert category("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert category("void cudnn::bn_fw_inf_1C11_kernel_NCHW<__half, float, true, 1>") == "batchnorm"
    assert category("triton_poi_fused_constant_pad_nd_relu_3") == "pad"
    assert category("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize64x64x64") == "matmul"
    assert category("void at::native::vectorized_elementwise_kernel<4, at::native::launch_clamp_scalar>") == (
        "pointwise"
    )


def test_roofline_counts_the_networks_flops_and_each_ways_kernels():
    from benchmarks.common import GFLOP_PER_IMAGE_224
    from benchmarks.roofline import floor_ms, kernels

    floors = {way: floor_ms(kernels(256, way), tflops=798.0, gb_per_s=3000.0) for way in ("eager", "folded", "fused")}
    # The % peak column's 7.34 GFLOP per 224x224 image (torchvision's 3.67 GMACs, rounded up), counted from
    # the network's own shapes: 7.328 GFLOP in the convolutions and the head.
    assert floors["fused"]["gflop"] / 256 == pytest.approx(GFLOP_PER_IMAGE_224, rel=5e-3)
    # 36 convs; eager adds 36 BN, 16 adds, 33 ReLUs, 4 pads, the pool and the head; folding leaves one
    # element-wise kernel per ReLU; fusing leaves the convs, the 4 uneven pads, the pool and the head.
    assert [floors[w]["kernels"] for w in ("eager", "folded", "fused")] == [127, 72, 42]
    assert floors["eager"]["gbytes"] > floors["folded"]["gbytes"] > floors["fused"]["gbytes"]
    assert floors["fused"]["floor_ms"] < floors["folded"]["floor_ms"] < floors["eager"]["floor_ms"]
    with pytest.raises(ValueError, match="way must be one of"):
        kernels(1, "magic")


def test_peers_torch_runs_every_side_and_writes_ratios_to_the_baseline(tmp_path, torchvision):
    # A smoke run (2 rounds of 1 call): the figures themselves come from the full run in the README.
    out = tmp_path / "peers.json"
    smoke = ["--rounds", "2", "--per-round", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "torch", *smoke],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    batch = json.loads(out.read_text())["batches"]["1"]
    assert batch["baseline"] == "torchvision"
    assert set(batch["ratios"]) == {"twin", "twin-fused"}
    assert all(ms > 0 for ms in batch["median_ms"].values()) and set(batch["calls"].values()) == {2}


def test_without_matplotlib_the_report_says_so_in_one_line_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    from benchmarks import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    env = {"device": "cpu", "cpu": "test", "cores": 2, "packages": {}, "gpus": [], "date_utc": "today", "git": "abc"}
    env |= {"command": "run.py", "python": "3.11", "platform": "linux"}
    env["threads"] = {"intra_op": 2, "inter_op": 1, "env": {}}
    written = report.write_all(tmp_path, env, [])
    err = capsys.readouterr().err.strip()
    assert err == "no throughput.png: matplotlib is not installed (python3 -m pip install matplotlib)"
    assert sorted(p.name for p in written) == ["results.csv", "results.json", "results.md"]


def test_cli_startup_times_every_command_against_a_bare_interpreter_and_lists_its_imports(tmp_path, capsys):
    # A smoke run (1 round of 1 call): the figures come from the full run in benchmarks/README.md.
    from benchmarks import cli_startup

    out = tmp_path / "cli_startup.json"
    assert cli_startup.main(["--rounds", "1", "--per-round", "1", "--warmup", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    timings, imports = results["timings"], results["imports"]
    assert list(timings["median_ms"]) == list(cli_startup.COMMANDS) and timings["baseline"] == cli_startup.BASELINE
    assert set(timings["ratios"]) == set(cli_startup.COMMANDS) - {cli_startup.BASELINE}
    assert set(timings["calls"].values()) == {1} and all(ms > 0 for ms in timings["median_ms"].values())
    # Our commands import more than a bare interpreter, and none of them a framework.
    assert all(found["modules"] > imports[cli_startup.BASELINE]["modules"] for found in list(imports.values())[:-1])
    assert all(found["frameworks"] == [] for found in imports.values())
    assert "| `--help` |" in capsys.readouterr().out


def test_cli_startup_stops_in_one_line_where_a_command_gives_the_wrong_exit_status(tmp_path, monkeypatch):
    from benchmarks import cli_startup

    monkeypatch.setattr(cli_startup, "COMMANDS", {"exits 3": (("-c", "raise SystemExit(3)"), 0)})
    with pytest.raises(SystemExit, match=r"^-c raise SystemExit\(3\): exit status 3, expected 0$"):
        cli_startup.main(["--rounds", "1", "--per-round", "1", "--warmup", "0", "--json", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()
