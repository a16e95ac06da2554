"""PyTorch's symmetric padding for Keras: the one module of ``keras_impl`` that knows about it.

Keras pads "same" the TensorFlow way: at stride 2 on an even size the odd pixel goes to the bottom/right
(see ``torch_impl/padding.py``, this module's mirror). torchvision pads ``k // 2`` on every side, which samples
another grid: a torchvision checkpoint computes its own function only with its own padding. Where the two
agree (a 1x1 window, or stride 1 with an odd kernel) the plain Keras layer with "same" is used.
"""

from __future__ import annotations

import keras

CONVENTIONS = ("book", "torchvision")


def check_convention(convention: str) -> str:
    """``convention`` if it is one of CONVENTIONS; a ValueError naming them otherwise."""
    if convention not in CONVENTIONS:
        raise ValueError(f"Unknown convention; expected one of {CONVENTIONS}. Received: convention={convention!r}")
    return convention


def needs_explicit_padding(kernel_size: int, strides: int) -> bool:
    """True where TF "same" can differ from torch's symmetric k // 2 on some input size."""
    return not (kernel_size == 1 or (strides == 1 and kernel_size % 2 == 1))


def _pad_spatial(inputs, padding: int, value: float):
    return keras.ops.pad(inputs, [[0, 0], [padding, padding], [padding, padding], [0, 0]], constant_values=value)


def _padded_shape(input_shape: tuple, padding: int) -> tuple:
    return (input_shape[0], *(None if d is None else d + 2 * padding for d in input_shape[1:3]), input_shape[3])


@keras.saving.register_keras_serializable(package="resnet34_parity")
class SymmetricPaddingConv2D(keras.layers.Conv2D):
    """``Conv2D`` padded ``explicit_padding`` zeros on every side, like ``torch.nn.Conv2d(padding=p)``."""

    def __init__(self, filters: int, kernel_size: int, explicit_padding: int, **kwargs) -> None:
        if kwargs.pop("padding", "valid") != "valid":
            raise ValueError("SymmetricPaddingConv2D pads explicitly; its Keras padding is always 'valid'")
        super().__init__(filters, kernel_size, padding="valid", **kwargs)
        self.explicit_padding = explicit_padding

    def build(self, input_shape: tuple) -> None:
        super().build(_padded_shape(input_shape, self.explicit_padding))

    def call(self, inputs):
        return super().call(_pad_spatial(inputs, self.explicit_padding, 0.0))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return super().compute_output_shape(_padded_shape(input_shape, self.explicit_padding))

    def get_config(self) -> dict:
        return {**super().get_config(), "explicit_padding": self.explicit_padding}


@keras.saving.register_keras_serializable(package="resnet34_parity")
class SymmetricPaddingMaxPool2D(keras.layers.MaxPooling2D):
    """``MaxPooling2D`` padded with -inf on every side, like ``torch.nn.MaxPool2d(padding=p)``."""

    def __init__(self, pool_size: int, strides: int, explicit_padding: int, **kwargs) -> None:
        if kwargs.pop("padding", "valid") != "valid":
            raise ValueError("SymmetricPaddingMaxPool2D pads explicitly; its Keras padding is always 'valid'")
        super().__init__(pool_size, strides, padding="valid", **kwargs)
        self.explicit_padding = explicit_padding

    def call(self, inputs):
        # -inf, not 0: a padded cell must never win the max (torch's max-pool padding behaves so).
        return super().call(_pad_spatial(inputs, self.explicit_padding, float("-inf")))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return super().compute_output_shape(_padded_shape(input_shape, self.explicit_padding))

    def get_config(self) -> dict:
        return {**super().get_config(), "explicit_padding": self.explicit_padding}


def conv2d(filters: int, kernel_size: int, strides: int = 1, *, convention: str = "book", **kwargs):
    """A bias-free Conv2D padded as ``convention`` pads: TF "same" (book) or symmetric k // 2 (torchvision)."""
    kwargs.setdefault("use_bias", False)
    if check_convention(convention) == "torchvision" and needs_explicit_padding(kernel_size, strides):
        return SymmetricPaddingConv2D(filters, kernel_size, kernel_size // 2, strides=strides, **kwargs)
    return keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", **kwargs)


def max_pool2d(pool_size: int, strides: int, *, convention: str = "book", **kwargs):
    """A max-pool padded as ``convention`` pads: TF "same" (book) or -inf k // 2 on every side (torchvision)."""
    if check_convention(convention) == "torchvision" and needs_explicit_padding(pool_size, strides):
        return SymmetricPaddingMaxPool2D(pool_size, strides, pool_size // 2, **kwargs)
    return keras.layers.MaxPool2D(pool_size=pool_size, strides=strides, padding="same", **kwargs)
