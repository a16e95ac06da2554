"""The book's ResNet-34 in Keras 3 (NHWC), backend-agnostic: TensorFlow, JAX or PyTorch.

Importing the package is cheap: it only makes TensorFlow load locally and quietly when it does, and the project's
layers register with Keras when it does (``_startup``); the model code is imported on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

from keras_impl import _startup

_startup.prepare()

_EXPORTS = {
    "CONVENTIONS": "keras_impl.padding",
    "ResidualUnit": "keras_impl.residual_unit",
    "STAGES": "keras_impl.resnet34",
    "build_resnet34": "keras_impl.resnet34",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
