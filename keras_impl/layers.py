"""Per-convention BatchNormalization for the Keras model; mirrored by ``torch_impl/layers.py``."""

from __future__ import annotations

import keras

from keras_impl.padding import check_convention

# book: Keras's defaults, what the book's code computes. torchvision: torch's eps 1e-5 and momentum 0.1,
# which is 0.9 in Keras's convention (Keras weighs the OLD statistic, torch the new batch).
BATCH_NORM = {"book": {"epsilon": 1e-3, "momentum": 0.99}, "torchvision": {"epsilon": 1e-5, "momentum": 0.9}}


def batch_norm(*, convention: str = "book", **kwargs) -> keras.layers.BatchNormalization:
    """``BatchNormalization`` with the epsilon and momentum of ``convention``."""
    return keras.layers.BatchNormalization(**BATCH_NORM[check_convention(convention)], **kwargs)
