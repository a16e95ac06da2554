"""Logits, not the softmax the book's head applies: saturated probabilities agree when networks do not."""

from __future__ import annotations

import keras
import numpy as np
import torch

from conversion.arrays import nhwc_to_nchw


def book_logits(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The book's model run by its own code, up to (not through) its softmax head."""
    features = images
    for layer in model.layers[:-1]:
        features = layer(features)
    head = model.layers[-1]
    return keras.ops.convert_to_numpy(keras.ops.matmul(features, head.kernel) + head.bias)


def twin_logits(twin: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """The torch twin's logits (its head without the activation)."""
    with torch.no_grad():
        return twin.forward_head(twin.forward_features(torch.from_numpy(nhwc_to_nchw(images)))).numpy()


# The losses' hostile case: CLASSES classes, BATCH samples.
CLASSES, BATCH = 5, 6
LABELS = np.array([0, 3, 1, 4, 2, 3])


def hostile_logits(dtype: str) -> np.ndarray:
    """Logits of scale 30: most probabilities underflow past 1e-7, so clipping decides the loss."""
    return (np.random.default_rng(11).standard_normal((BATCH, CLASSES)) * 30).astype(dtype)
