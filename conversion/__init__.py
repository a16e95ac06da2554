"""Conversion between the Keras and PyTorch twins: weights, files, ONNX export and verification."""

import keras_impl  # noqa: F401  (first: it loads triton before TensorFlow, see PITFALLS.md)

# isort: split
from conversion.errors import ConversionError, InputError, UserInputError, WeightFileError
from conversion.weights import (
    copy_keras_to_torch,
    copy_torch_to_keras,
    keras_to_torch,
    torch_to_keras,
)

__all__ = [
    "ConversionError",
    "InputError",
    "UserInputError",
    "WeightFileError",
    "copy_keras_to_torch",
    "copy_torch_to_keras",
    "keras_to_torch",
    "torch_to_keras",
]
