"""Conversion between the Keras and PyTorch twins: weights, files, ONNX export and verification."""

import keras_impl  # noqa: F401  (first: it loads triton before TensorFlow, see PITFALLS.md)

# isort: split
from conversion.errors import ConversionError, ExportError, InputError, UserInputError, WeightFileError
from conversion.onnx_export import export_onnx, export_torch_onnx, run_onnx
from conversion.weights import (
    copy_keras_to_torch,
    copy_torch_to_keras,
    keras_to_torch,
    torch_to_keras,
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
]
