"""The book's ResNet-34 in Keras 3 (NHWC), backend-agnostic: TensorFlow, JAX or PyTorch."""

import importlib.util
import os
import sys

# TensorFlow's C++ start-up chatter hides the output people came for.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _load_triton_before_tensorflow() -> None:
    # With torch's CUDA build (which ships triton), loading triton AFTER TensorFlow segfaults; loading
    # it first is fine (PITFALLS.md). Keras may import TensorFlow, so triton goes first, if installed.
    if "tensorflow" not in sys.modules and importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


_load_triton_before_tensorflow()

from keras_impl.padding import CONVENTIONS  # noqa: E402
from keras_impl.residual_unit import ResidualUnit  # noqa: E402
from keras_impl.resnet34 import STAGES, build_resnet34  # noqa: E402

__all__ = ["CONVENTIONS", "STAGES", "ResidualUnit", "build_resnet34"]
