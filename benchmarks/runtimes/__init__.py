"""One module per runtime; each imports only its own framework and exposes ``setup``, ``modes``, ``make_runner``.

``RUNTIMES`` names them (in table order); importing this package imports none of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# runtime name -> module in benchmarks.runtimes
RUNTIMES = {
    "keras-tf": "benchmarks.runtimes.keras_tf",
    "keras-jax": "benchmarks.runtimes.keras_jax",
    "torch": "benchmarks.runtimes.pytorch",
    "ort": "benchmarks.runtimes.ort",
}


class BaseRunner:
    """Defaults of a runner (see ``benchmarks.common.Runner``): eager, float32, nothing built ahead."""

    dtype: str = "float32"  # compute dtype: float32, tf32, float16 or bfloat16 (picks the tolerance and peak)
    flags: str = ""  # settings that change the numbers (TF32, precision, memory format), for the table
    compiled: bool = False  # True where a compile/trace/capture happens: the row then gets compile_s
    build_s: float | None = None  # explicit one-off build time counted in compile_s (ONNX export, session)

    def load(self, images: np.ndarray) -> Any:
        """Host NHWC float32 images -> the runtime's input."""
        return images

    def __call__(self, inputs: Any) -> Any:
        """One inference, synchronised."""
        raise NotImplementedError

    def fetch(self, outputs: Any) -> np.ndarray:
        """Outputs -> host float32 logits."""
        return np.asarray(outputs, dtype=np.float32)
