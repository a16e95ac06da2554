"""Keras 3 on JAX: the model's ``stateless_call`` under ``jax.jit``, float32 and mixed bfloat16.

float32 rows run at ``jax_default_matmul_precision="highest"``: XLA's default lets GPUs use TF32 for
float32 convolutions, which is the separate ``jit-default-precision`` mode (dtype tf32) on a GPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from benchmarks.common import IMAGE_SIZE, NUM_CLASSES, SkipError
from benchmarks.runtimes import BaseRunner

# mode -> (Keras dtype policy, JAX default matmul precision, row dtype)
MODES = {
    "jit": ("float32", "highest", "float32"),
    "jit-default-precision": ("float32", None, "tf32"),
    "jit-mixed-bf16": ("mixed_bfloat16", None, "bfloat16"),
}
GPU_ONLY = ("jit-default-precision",)


def modes(device: str) -> tuple[str, ...]:
    """Modes measured on ``device``: the default-precision one only on a GPU (on a CPU it is float32)."""
    return tuple(m for m in MODES if device == "cuda" or m not in GPU_ONLY)


def setup(threads: int, device: str) -> dict:
    """Import JAX on the right platform and check it; the parent set XLA's CPU thread flags."""
    os.environ["KERAS_BACKEND"] = "jax"
    import jax

    platform = "gpu" if device == "cuda" else "cpu"
    try:
        devices = jax.devices(platform)
    except RuntimeError as error:
        reason = str(error).splitlines()[0][:120]
        raise SkipError(f"JAX {jax.__version__} has no {platform} backend ({reason})") from None
    import keras

    return {
        "jax": jax.__version__,
        "keras": keras.__version__,
        "devices": [str(d) for d in devices],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


class KerasJaxRunner(BaseRunner):
    """The book's model under ``jax.jit``, compiled ahead of time per batch shape."""

    compiled = True

    def __init__(self, mode: str, device: str, weights: str) -> None:
        import jax

        import keras_impl

        if mode not in MODES:
            raise SkipError(f"unknown keras-jax mode {mode!r}; expected one of {tuple(MODES)}")
        policy, precision, self.dtype = MODES[mode]
        jax.config.update("jax_default_matmul_precision", precision)
        self.jax = jax
        self.device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        model = keras_impl.build_resnet34(NUM_CLASSES, (*IMAGE_SIZE, 3), None, policy)
        model.load_weights(weights)
        self.trainable = [jax.device_put(v.value, self.device) for v in model.trainable_variables]
        self.non_trainable = [jax.device_put(v.value, self.device) for v in model.non_trainable_variables]

        def forward(trainable: list, non_trainable: list, x: Any) -> Any:
            logits, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return logits

        self.jitted = jax.jit(forward)
        self.executables: dict[tuple, Any] = {}
        self.flags = f"policy={policy}, precision={precision or 'default'}"

    def load(self, images: np.ndarray) -> Any:
        return self.jax.device_put(images, self.device)

    def compile(self, inputs: Any) -> float:
        """Lower and compile for this input shape ahead of time; the seconds it took."""
        start = time.perf_counter()
        lowered = self.jitted.lower(self.trainable, self.non_trainable, inputs)
        self.executables[inputs.shape] = lowered.compile()
        return time.perf_counter() - start

    def __call__(self, inputs: Any) -> Any:
        executable = self.executables.get(inputs.shape, self.jitted)
        return executable(self.trainable, self.non_trainable, inputs).block_until_ready()

    def fetch(self, outputs: Any) -> np.ndarray:
        return np.asarray(outputs.astype("float32"))


def make_runner(mode: str, device: str, spec: dict) -> KerasJaxRunner:
    """The runner for ``mode`` with the prepared weights."""
    return KerasJaxRunner(mode, device, spec["artifacts"]["keras_weights"])
