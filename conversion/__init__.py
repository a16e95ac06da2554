"""Move a ResNet-34 between Keras, torch and ONNX, and prove the moves exact.

Importing the package is cheap: names and submodules are imported on first use (PEP 562), and importing it first
makes TensorFlow load locally and quietly (``keras_impl``), so that TensorFlow and torch's triton share a process.
"""

from __future__ import annotations

import importlib
from typing import Any

import keras_impl  # noqa: F401  (cheap: prepares how TensorFlow loads, before anything imports it)
from conversion.errors import ConversionError, ExportError, InputError, UserInputError, WeightFileError

_EXPORTS = {
    "copy_keras_to_torch": "conversion.weights",
    "copy_torch_to_keras": "conversion.weights",
    "keras_to_torch": "conversion.weights",
    "torch_to_keras": "conversion.weights",
    "export_onnx": "conversion.onnx_export",
    "export_torch_onnx": "conversion.onnx_export",
    "run_onnx": "conversion.onnx_export",
    "torchvision_state_dict": "conversion.state_dicts",
}
_SUBMODULES = (
    "arrays",
    "cli",
    "files",
    "hostile",
    "keras_reader",
    "onnx_export",
    "state_dicts",
    "structure",
    "training",
    "verify",
    "weights",
)
__all__ = [
    "ConversionError",
    "ExportError",
    "InputError",
    "UserInputError",
    "WeightFileError",
    "copy_keras_to_torch",
    "copy_torch_to_keras",
    "export_onnx",
    "export_torch_onnx",
    "keras_to_torch",
    "run_onnx",
    "torch_to_keras",
    "torchvision_state_dict",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
