"""How far correct twins sit from their noise floor: the measurement behind ``FLOOR_MULTIPLE``.

``python -m benchmarks.noise_floor`` runs the seeded hostile twins (correct, so every difference is rounding)
through ``verify`` at several sizes and through ``verify --train`` with each optimizer, in float32 and float64,
and prints the worst ratio of error to noise floor per comparison kind. ``conversion.noise_floor.FLOOR_MULTIPLE``
must sit above these with a margin; run it once with ``TF_ENABLE_ONEDNN_OPTS=1`` and once with ``=0`` to cover
both of TensorFlow's CPU numerics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import keras_impl  # first: triton before TensorFlow, and TensorFlow's start-up lines silenced

# isort: split
import numpy as np

from conversion.arrays import seeded_images
from conversion.hostile import randomize_weights
from conversion.verify import (
    FLOOR_MULTIPLE,
    TRAIN_OPTIMIZERS,
    TrainingOptions,
    default_optimizer,
    verify_models,
    verify_training,
)
from conversion.weights import keras_to_torch

SIZES = ((32, 32), (17, 23), (48, 40), (97, 131), (224, 224))


def _twins(dtype: str, head: str | None, seed: int):
    model = keras_impl.build_resnet34(10, (None, None, 3), head, dtype)
    randomize_weights(model, seed)
    return model, keras_to_torch(model)


def inference_ratios(dtype: str, sizes: tuple[tuple[int, int], ...], seed: int = 0) -> dict[str, float]:
    """Worst floor ratio over every stage at each size, and of the training-mode BatchNorm check."""
    model, twin = _twins(dtype, None, seed)
    worst: dict[str, float] = {}
    for height, width in sizes:
        report = verify_models(model, twin, seeded_images(2, height, width, seed=seed + 1, dtype=dtype), seed=seed)
        if not report:
            raise SystemExit(f"correct twins disagree at {height}x{width} ({dtype}): {report.diagnosis}")
        worst[f"{height}x{width} stages"] = max(row.torch.floor_ratio for row in report.stages)
        if report.training_check.floor_ratio is not None:
            worst[f"{height}x{width} BatchNorm update"] = report.training_check.floor_ratio
    return worst


def training_ratios(dtype: str, optimizer: str, size: tuple[int, int], steps: int, seed: int = 0) -> dict:
    """Worst floor ratio per tensor kind over ``steps`` steps of one optimizer."""
    model, twin = _twins(dtype, "softmax", seed)
    rng = np.random.default_rng(seed + 2)
    images = np.stack([seeded_images(4, *size, seed=seed + 1 + k, dtype=dtype) for k in range(steps)])
    options = TrainingOptions(keras_optimizer=default_optimizer(optimizer, steps=steps), seed=seed)
    report = verify_training(model, twin, images, rng.integers(0, 10, (steps, 4)), options)
    return {"agree": report.agree, "ratios": report.worst_floor_ratio, "worst": report.worst}


def main(argv: list[str] | None = None) -> int:
    """Print (or --json) the worst floor ratios of correct twins."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.noise_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="training steps per optimizer (default: 6)")
    parser.add_argument("--seeds", type=int, default=1, help="weight/image seeds per case (default: 1)")
    parser.add_argument("--quick", action="store_true", help="two sizes, two optimizers, two steps")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    sizes = SIZES[:2] if args.quick else SIZES
    optimizers = ("nesterov", "adam") if args.quick else TRAIN_OPTIMIZERS
    steps = 2 if args.quick else args.steps
    results: dict = {
        "floor_multiple": FLOOR_MULTIPLE,
        "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(TensorFlow's default for this CPU)"),
        "machine": platform.processor() or platform.machine(),
        "inference": {},
        "training": {},
    }
    for seed in range(args.seeds):
        for dtype in ("float32", "float64"):
            results["inference"][f"{dtype} seed {seed}"] = inference_ratios(dtype, sizes, seed)
            for optimizer in optimizers:
                key = f"{dtype} {optimizer} 45x38 x{steps} seed {seed}"
                results["training"][key] = training_ratios(dtype, optimizer, (45, 38), steps, seed)
                print(f"done: {key}", file=sys.stderr, flush=True)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print(f"FLOOR_MULTIPLE {FLOOR_MULTIPLE}; TF_ENABLE_ONEDNN_OPTS={results['TF_ENABLE_ONEDNN_OPTS']}")
    for key, ratios in results["inference"].items():
        print(f"inference {key}: worst ratio {max(ratios.values()):.3g}")
    for key, result in results["training"].items():
        ratios = {kind: f"{value:.3g}" for kind, value in result["ratios"].items() if value is not None}
        print(f"training {key}: agree {result['agree']}, worst ratio per kind {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
