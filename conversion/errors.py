"""Expected failures: each says, in one line, what was expected and what was received.

The CLI prints these without a traceback and exits 2; anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Base of the failures caused by what the user gave (files, arrays, options)."""


class ConversionError(UserInputError):
    """The two objects are not the same architecture, or a tensor does not fit."""


class WeightFileError(UserInputError):
    """A weight file is missing, unreadable, of another architecture, or not finite."""


class InputError(UserInputError):
    """Images of the wrong rank, shape, channel count or dtype, or not finite."""


class ExportError(UserInputError):
    """The ONNX export cannot be done as asked (missing tf2onnx, unsupported opset, not a ResNet-34)."""
