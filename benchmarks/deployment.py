"""Deployment precision on the CPU, interleaved: ORT fp32 against fp16 and int8 (QDQ, per-channel weights, each
calibration method) on the hostile book model at 224x224, exported NCHW (``python -m benchmarks.deployment``).

One process, one thread count, the files' sessions called in turn (A, B, C, A, B, C, ...) so that drift on a shared
machine hits every row alike; medians and ratios to ORT fp32. Also top-1 agreement with Keras on 64 seeded images
and the logits' max rel err. Records ``lscpu``'s model name and its VNNI flags (int8 kernels use VNNI where present).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from benchmarks.environment import cpu_flags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", default="minmax,entropy,percentile")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import keras_impl  # first: TensorFlow then loads locally (docs/pitfalls.md)

    # isort: split
    import onnxruntime as ort

    from conversion.arrays import max_rel_err, seeded_images
    from conversion.deploy.arithmetic import arithmetic_of
    from conversion.deploy.check import DeployedModel, keras_logits
    from conversion.deploy.lower import lower_onnx
    from conversion.hostile import randomize_weights
    from conversion.onnx_export import export_onnx

    model = keras_impl.build_resnet34(10, (args.size, args.size, 3), None)
    randomize_weights(model, 0)
    images = seeded_images(64, args.size, args.size, seed=1)
    calibration = seeded_images(16, args.size, args.size, seed=100)
    reference = np.concatenate([keras_logits(model)(images[i : i + 8]) for i in range(0, 64, 8)])
    with tempfile.TemporaryDirectory(prefix="resnet34-deployment-") as work:
        fp32 = export_onnx(model, Path(work) / "fp32.onnx", nchw=True)
        files = {"ORT fp32": fp32, "ORT fp16": lower_onnx(fp32, Path(work) / "fp16.onnx", "fp16").path}
        for method in args.methods.split(","):
            files[f"ORT int8 {method}"] = lower_onnx(
                fp32, Path(work) / f"int8_{method}.onnx", "int8", calibration=calibration, method=method
            ).path
        models = {name: DeployedModel(path, threads=args.threads) for name, path in files.items()}
        rows: dict[str, dict] = {}
        for name, deployed in models.items():
            logits = deployed.logits(images)
            rows[name] = {
                "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
                "max_rel_err": max_rel_err(logits, reference),
                "arithmetic": arithmetic_of(files[name], deployed.precision).summary,
            }
        for batch in args.batches:
            batch_images = images[:batch]
            times: dict[str, list[float]] = {name: [] for name in models}
            for deployed in models.values():
                deployed.logits(batch_images)  # warm-up
            for _ in range(args.rounds):
                for name, deployed in models.items():
                    start = time.perf_counter()
                    deployed.logits(batch_images)
                    times[name].append((time.perf_counter() - start) * 1e3)
            base = float(np.median(times["ORT fp32"]))
            for name in models:
                median = float(np.median(times[name]))
                rows[name][f"batch{batch}_ms"] = median
                rows[name][f"batch{batch}_speedup"] = base / median
    result = {
        "size": args.size,
        "threads": args.threads,
        "rounds": args.rounds,
        "onnxruntime": ort.__version__,
        "cpu": cpu_flags(),
        "rows": rows,
    }
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
