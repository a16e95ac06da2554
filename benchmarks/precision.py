"""Where the reduced-precision tolerances come from: ``python -m benchmarks.precision``.

Runs the torch twin, with the benchmark's hostile weights and images, in emulated TF32 (conv and linear
inputs and weights rounded to a 10-bit mantissa, float32 accumulation, as tensor cores do), float16 and
bfloat16 on the CPU, and prints max_rel_err against the Keras float32 reference. The tolerances in
``benchmarks.common.TOLERANCE`` sit 5-10x above these, to leave room for the GPU kernels' own rounding.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.prepare import choose_keras_backend

choose_keras_backend()
import keras_impl  # noqa: E402, F401  (before TensorFlow loads: docs/pitfalls.md)

# isort: split
import torch  # noqa: E402
from torch import nn  # noqa: E402

import torch_impl  # noqa: E402
from benchmarks.common import TOLERANCE  # noqa: E402
from benchmarks.prepare import prepare  # noqa: E402
from conversion.arrays import max_rel_err  # noqa: E402


def round_to_tf32(tensor: torch.Tensor) -> torch.Tensor:
    """Round float32 values to TF32's 10-bit mantissa (to nearest, ties away from zero)."""
    bits = tensor.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def main() -> int:
    """Print the measured error of each reduced precision next to its tolerance."""
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        folder = Path(tmp)
        manifest = prepare(folder, seed=0, onnx=False, log=lambda _: None)
        model = torch_impl.ResNet34(num_classes=10, classifier_activation=None)
        model.load_state_dict(torch.load(folder / manifest["torch_weights"], weights_only=True))
        model.eval()
        images = np.load(folder / manifest["images"])
        reference = np.load(folder / manifest["reference"])
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    tf32 = copy.deepcopy(model)
    with torch.inference_mode():
        for module in tf32.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                module.weight.copy_(round_to_tf32(module.weight))
                module.register_forward_pre_hook(lambda _, args: (round_to_tf32(args[0]),))
        errors = {
            "float32": max_rel_err(model(x).numpy(), reference),
            "tf32": max_rel_err(tf32(x).numpy(), reference),
            "float16": max_rel_err(copy.deepcopy(model).half()(x.half()).float().numpy(), reference),
            "bfloat16": max_rel_err(copy.deepcopy(model).bfloat16()(x.bfloat16()).float().numpy(), reference),
        }
    print("| dtype | max_rel_err (torch twin, CPU, 8 hostile images) | tolerance |")
    print("|---|--:|--:|")
    for dtype, error in errors.items():
        print(f"| {dtype}{' (emulated)' if dtype == 'tf32' else ''} | {error:.1e} | {TOLERANCE[dtype]:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
