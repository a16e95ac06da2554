"""Interleaved peer comparisons (A, B, A, B, ... in ONE process, threads pinned): the twins against torchvision.

    python -m benchmarks.peers torch   # the torch twin (and its BN-folded rewrite) vs torchvision, eager CPU
    python -m benchmarks.peers onnx    # ONNX Runtime CPU, our Keras export vs torchvision's export

Absolute times on a shared machine drift by 10-30% between runs (docs/pitfalls.md), so each comparison runs
both sides in rounds, alternating which goes first (A B B A ...), and reports the medians and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import IMAGE_SIZE, NUM_CLASSES, REPO, interleave, round_ratio_text, timed, write_json
from benchmarks.environment import cpu_count, cpu_model

PEERS_ONNX = ("ours", "ours-nchw", "torchvision")  # the last is the baseline of the ratios


def _environment(threads: int) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "threads_intra": threads,
        "threads_inter": 1,
        "load_avg_start": list(os.getloadavg()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- the torch twin vs torchvision, eager CPU --------------------------------------------


def compare_torch(args: argparse.Namespace) -> dict:
    """The twin's eager batch-N latency vs torchvision's resnet34 (same classes, symmetric padding).

    Also the twin's inference rewrite (``torch_impl.fuse``: BatchNorm folded; on a CPU its convolutions
    run as ``F.conv2d`` + ReLU), to show what folding alone buys where the convolutions dominate.
    """
    import torch
    import torchvision

    import torch_impl

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    twin = torch_impl.ResNet34(num_classes=NUM_CLASSES, classifier_activation=None).eval()
    fused = torch_impl.fuse(twin)
    reference = torchvision.models.resnet34(num_classes=NUM_CLASSES).eval()
    results = {"comparison": "torch twin vs torchvision resnet34, eager, fp32, NCHW", **_environment(args.threads)}
    results["versions"] = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    results["batches"] = {}
    with torch.inference_mode():
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, *IMAGE_SIZE)
            calls = {
                "twin": lambda x=x: twin(x),
                "twin-fused": lambda x=x: fused(x),
                "torchvision": lambda x=x: reference(x),
            }
            results["batches"][str(batch)] = interleave(calls, args.rounds, args.per_round, args.warmup)
    results["load_avg_end"] = list(os.getloadavg())
    return results


# --- ONNX Runtime, our Keras export vs torchvision's export --------------------------------


def export_peers(folder: Path) -> dict[str, float]:
    """Write ours.onnx, ours-nchw.onnx (Keras, export_onnx) and torchvision.onnx; seconds each export took."""
    import keras_impl  # first: TensorFlow then loads locally and quietly (docs/pitfalls.md)

    # isort: split
    import torch
    import torchvision

    from conversion.onnx_export import DEFAULT_OPSET, export_onnx

    seconds = {}
    model = keras_impl.build_resnet34(NUM_CLASSES, (*IMAGE_SIZE, 3), classifier_activation=None)
    seconds["ours"], _ = timed(lambda: export_onnx(model, folder / "ours.onnx"))
    seconds["ours-nchw"], _ = timed(lambda: export_onnx(model, folder / "ours-nchw.onnx", nchw=True))
    torch.manual_seed(0)
    reference = torchvision.models.resnet34(num_classes=NUM_CLASSES).eval()
    # The same opset and exporter family as ours (TorchScript; dynamo=True would need onnxscript).
    seconds["torchvision"], _ = timed(
        lambda: torch.onnx.export(
            reference,
            (torch.zeros(1, 3, *IMAGE_SIZE),),
            str(folder / "torchvision.onnx"),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=DEFAULT_OPSET,
            dynamo=False,
        )
    )
    return seconds


def compare_onnx(args: argparse.Namespace) -> dict:
    """ORT CPU latency of our Keras export vs torchvision's export; the exports run in a child process."""
    with tempfile.TemporaryDirectory(prefix="peers-onnx-") as tmp:
        folder = Path(tmp)
        # The export needs TensorFlow and torch; the timing process holds onnxruntime only.
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.peers", "_export", str(folder)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise SystemExit(f"export failed:\n{done.stderr[-3000:]}")
        export_s = json.loads(done.stdout.strip().splitlines()[-1])

        import onnxruntime as ort

        sessions = {}
        for name in PEERS_ONNX:
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sessions[name] = ort.InferenceSession(
                str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"]
            )
        results = {
            "comparison": "onnxruntime CPU EP: our Keras export (export_onnx) vs torchvision resnet34's export",
            **_environment(args.threads),
            "versions": {"onnxruntime": ort.__version__},
            "export_s": export_s,
            "inputs": {name: [str(d) for d in s.get_inputs()[0].shape] for name, s in sessions.items()},
            "batches": {},
        }
        rng = np.random.default_rng(0)
        for batch in args.batch_sizes:
            feeds = {}
            for name, session in sessions.items():
                spec = session.get_inputs()[0]
                channels_last = spec.shape[-1] == 3  # our default export takes NHWC, like Keras
                shape = (batch, *IMAGE_SIZE, 3) if channels_last else (batch, 3, *IMAGE_SIZE)
                feeds[name] = {spec.name: rng.standard_normal(shape).astype(np.float32)}
            calls = {name: lambda name=name, feeds=feeds: sessions[name].run(None, feeds[name]) for name in sessions}
            results["batches"][str(batch)] = interleave(calls, args.rounds, args.per_round, args.warmup)
    results["load_avg_end"] = list(os.getloadavg())
    return results


def _print(results: dict) -> None:
    print(results["comparison"])
    print(f"{results['cpu']}, {results['threads_intra']} intra-op / 1 inter-op threads")
    for batch, r in results["batches"].items():
        baseline = r["baseline"]
        print(f"\nbatch {batch} (medians of {r['calls'][baseline]} interleaved calls each)")
        print(f"| model | p50 ms | min ms | ratio to {baseline} | per-round ratio: median (range) |")
        print("|---|--:|--:|--:|--:|")
        for name, ms in r["median_ms"].items():
            ratio = r["ratios"].get(name)
            text = "1 (baseline) | "
            if ratio is not None:
                text = f"{ratio['ratio_of_medians']:.3f} | {round_ratio_text(ratio, 3)}"
            print(f"| {name} | {ms:.2f} | {r['min_ms'][name]:.2f} | {text} |")
    print(f"\nload average (1/5/15 min): start {results['load_avg_start']}, end {results['load_avg_end']}")


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks.peers``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("comparison", choices=("torch", "onnx", "_export"), help="which comparison to run")
    parser.add_argument("folder", nargs="?", help=argparse.SUPPRESS)  # _export only
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 1 for torch, 1 8 for onnx)",
    )
    parser.add_argument("--threads", type=int, default=cpu_count(), help="intra-op threads (default: the cores)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    parser.add_argument("--per-round", type=int, default=5, help="timed calls per side and round (default: 5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls per side first (default: 5)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one comparison, print a Markdown table (and optionally JSON)."""
    args = build_parser().parse_args(argv)
    if args.comparison == "_export":
        print(json.dumps(export_peers(Path(args.folder))))
        return 0
    if args.batch_sizes is None:
        args.batch_sizes = [1] if args.comparison == "torch" else [1, 8]
    results = compare_torch(args) if args.comparison == "torch" else compare_onnx(args)
    _print(results)
    if args.json:
        write_json(Path(args.json), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
